"""Checkpoint loading in the plugin's commands: allow-listed weights_only loads, clear refusals."""

import decimal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fairseq_stablemoe  # noqa: F401
from fairseq_stablemoe.safe_globals import CheckpointLoadError, load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]


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


def test_truncated_and_missing_files_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointLoadError, match="truncated.pt is truncated or corrupt"):
        load_checkpoint_file(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_file(str(tmp_path / "nope.pt"))


def test_fluctuation_cli_reports_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dict.txt").write_text("a 1\n")
    for name in ("c1.pt", "c2.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_stablemoe.fluctuation",
            str(tmp_path / "data"),
            str(tmp_path / "c1.pt"),
            str(tmp_path / "c2.pt"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "c1.pt is truncated or corrupt" in out.stderr
    assert "Traceback" not in out.stderr
