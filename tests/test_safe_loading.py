"""Checkpoint loading in the plugin's commands: allow-listed weights_only loads, clear refusals."""

import decimal
import random
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import warm
from corpus import markov_corpus

import fairseq_stablemoe  # noqa: F401
from fairseq_stablemoe.checkpoints.reading import CheckpointLoadError, load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_stablemoe")


def test_allow_listed_fairseq_types_load(tmp_path):
    from argparse import Namespace

    from omegaconf import OmegaConf

    path = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": OmegaConf.create({"a": 1}), "args": Namespace(x=1)}, path)
    state = load_checkpoint_file(str(path))
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_refuses_unlisted_types_and_names_the_opt_in(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "extra": decimal.Decimal("1.5")}, path)
    with pytest.raises(CheckpointLoadError) as err:
        load_checkpoint_file(str(path))
    msg = str(err.value)
    assert str(path) in msg and "decimal.Decimal" in msg and "--trust-checkpoint" in msg
    assert load_checkpoint_file(str(path), trusted=True)["extra"] == decimal.Decimal("1.5")


def good_checkpoint(path: Path, updates: int) -> bytes:
    torch.save({"model": {"w": torch.randn(1000)}, "optimizer_history": [{"num_updates": updates}]}, path)
    return path.read_bytes()


def bad_files(directory: Path):
    """``{kind: (file, words the message must hold)}``: the unreadable files a user meets, beside two good
    checkpoints (updates 3 and 5: the message names the later one)."""
    good_checkpoint(directory / "checkpoint_1_3.pt", 3)
    whole = good_checkpoint(directory / "checkpoint_1_5.pt", 5)
    files = {
        "truncated": (whole[: len(whole) // 2], "is truncated: a zip archive"),
        "random": (random.Random(0).randbytes(5000), "is not a torch checkpoint"),
        "empty": (b"", "is empty"),
    }
    out = {}
    for kind, (data, words) in files.items():
        path = directory / f"checkpoint_{kind}.pt"
        path.write_bytes(data)
        out[kind] = (path, words)
    # a file of a newer torch: the archive's format version beyond what this torch reads
    newer = directory / "checkpoint_newer.pt"
    with zipfile.ZipFile(directory / "checkpoint_1_5.pt") as src, zipfile.ZipFile(newer, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, b"99\n" if info.filename.endswith("/version") else data)
    out["newer"] = (newer, "is from an incompatible torch")
    return out


def assert_explains(message: str, path: Path, words: str, last_good: Path) -> None:
    assert str(path) in message and words in message, message
    assert f"The last readable checkpoint beside it is {last_good} (update 5)" in message, message
    assert "weights_only" not in message and "Traceback" not in message, message


def test_unreadable_files_say_why_and_name_the_last_good_one(tmp_path):
    for kind, (path, words) in bad_files(tmp_path).items():
        for mmap in (False, True):
            with pytest.raises(CheckpointLoadError) as err:
                load_checkpoint_file(str(path), mmap=mmap)
            assert_explains(str(err.value), path, words, tmp_path / "checkpoint_1_5.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_file(str(tmp_path / "nope.pt"))


def test_unreadable_without_a_good_one_beside_it(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointLoadError) as err:
        load_checkpoint_file(str(path))
    assert "is not a torch checkpoint" in str(err.value) and "last readable" not in str(err.value)


def run_tool(*cmd):
    out = warm.run([sys.executable, *map(str, cmd)], timeout=300)
    return out.returncode, out.stdout + out.stderr


def last_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "cannot be read" in line]
    assert lines, text[-3000:]
    return lines[-1]


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_eval_lm_path_names_the_file_before_loading(tmp_path, kind):
    """fairseq-eval-lm --path (fairseq's own tool, the plugin as --user-dir), one process."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dict.txt").write_text("a 1\nb 1\n")
    path, words = bad_files(tmp_path)[kind]
    code, text = run_tool(
        "-m", "fairseq_cli.eval_lm", tmp_path / "data", "--path", path, "--cpu", "--user-dir", USER_DIR
    )
    assert code != 0
    assert_explains(last_error_line(text), path, words, tmp_path / "checkpoint_1_5.pt")
    assert "weights_only" not in text  # nor torch's advice anywhere in the output


def test_consolidate_names_the_file(tmp_path):
    """A random file given whole, a truncated one as one of a per-rank set."""
    files = bad_files(tmp_path)
    path, words = files["random"]
    code, text = run_tool("-m", "fairseq_stablemoe.cli.consolidate", path, "--shards", "2")
    assert code == 2 and "Traceback" not in text
    assert_explains(last_error_line(text), path, words, tmp_path / "checkpoint_1_5.pt")
    path, words = files["truncated"]
    (tmp_path / "x-rank0-of2.pt").write_bytes(path.read_bytes())
    (tmp_path / "x-rank1-of2.pt").write_bytes(path.read_bytes())
    code, text = run_tool("-m", "fairseq_stablemoe.cli.consolidate", tmp_path / "x.pt")
    assert code == 2 and "Traceback" not in text and "weights_only" not in text
    assert f"{tmp_path / 'x-rank0-of2.pt'} cannot be read: it {words}" in text, text[-3000:]


def test_fluctuation_cli_reports_an_unreadable_checkpoint(tmp_path):
    """A truncated checkpoint given whole, a random one as one rank's file of an expert-parallel run."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dict.txt").write_text("a 1\n")
    files = bad_files(tmp_path)
    path, words = files["truncated"]
    code, text = run_tool(
        "-m", "fairseq_stablemoe.cli.fluctuation", tmp_path / "data", path, tmp_path / "checkpoint_1_5.pt"
    )
    assert code == 2 and "Traceback" not in text
    assert_explains(last_error_line(text), path, words, tmp_path / "checkpoint_1_5.pt")
    # one rank's file of an expert-parallel run (merged in memory): the same explanation
    path, words = files["random"]
    (tmp_path / "run-rank0-of2.pt").write_bytes(path.read_bytes())
    (tmp_path / "run-rank1-of2.pt").write_bytes(path.read_bytes())
    code, text = run_tool(
        "-m", "fairseq_stablemoe.cli.fluctuation", tmp_path / "data", tmp_path / "run-rank0-of2.pt", path
    )
    assert code == 2 and "Traceback" not in text and "weights_only" not in text
    assert f"{tmp_path / 'run-rank0-of2.pt'} cannot be read: it {words}" in text, text[-3000:]


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_restore_file_names_the_file_before_training(tmp_path, kind):
    """fairseq-train --restore-file on a MoE model (the plugin's Trainer patch), one process."""
    data = markov_corpus(tmp_path, 60, 10, vocab=30, seed=1)
    save = tmp_path / "ckpt"
    save.mkdir()
    good_checkpoint(save / "checkpoint_1_5.pt", 5)
    if kind == "random":
        bad, words = save / "checkpoint_bad.pt", "is not a torch checkpoint"
        bad.write_bytes(random.Random(1).randbytes(4000))
    else:  # cut short, and not a copy of the good one (a copy of it would resume from it: test_killed_run)
        whole = good_checkpoint(tmp_path / "other.pt", 9)
        bad, words = save / "checkpoint_bad.pt", "is truncated: a zip archive"
        bad.write_bytes(whole[: len(whole) // 2])
    code, text = run_tool(
        "-m", "fairseq_cli.train", data, "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", "stablemoe_lm", "--criterion", "stablemoe", "--decoder-layers", "1", "--decoder-embed-dim", "16",
        "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--tokens-per-sample", "16",
        "--max-tokens", "128", "--optimizer", "adam", "--lr", "0.001", "--max-update", "1", "--cpu",
        "--save-dir", save, "--restore-file", bad,
    )  # fmt: skip
    assert code != 0
    line = last_error_line(text)
    assert str(bad) in line and words in line, line
    assert f"The last readable checkpoint beside it is {save / 'checkpoint_1_5.pt'} (update 5)" in line, line
    assert "weights_only" not in text and "| train_inner |" not in text
