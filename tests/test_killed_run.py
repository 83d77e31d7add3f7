"""A training process killed with SIGKILL leaves a loadable checkpoint, and the next run
resumes from it with no manual step."""

import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import warm
from corpus import binarise

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    rng = random.Random(11)
    lines = [" ".join(f"k{rng.randrange(60)}" for _ in range(rng.randint(5, 15))) for _ in range(1500)]
    return binarise(tmp, {"train": lines, "valid": lines[:100]})


def _cmd(data: Path, save: Path, max_update: int):
    return [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(data),
        "--user-dir",
        str(REPO / "fairseq_stablemoe"),
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        "--criterion",
        "stablemoe",
        "--decoder-layers",
        "2",
        "--decoder-embed-dim",
        "64",
        "--decoder-ffn-embed-dim",
        "128",
        "--decoder-attention-heads",
        "2",
        "--num-experts",
        "4",
        "--two-stage-updates",
        "6",
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--max-tokens",
        "512",
        "--tokens-per-sample",
        "32",
        "--max-update",
        str(max_update),
        "--cpu",
        "--save-dir",
        str(save),
        "--save-interval-updates",
        "3",
        "--keep-interval-updates",
        "2",
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--num-workers",
        "0",
    ]


def _loaded_update(output: str) -> int:
    m = re.search(r"Loaded checkpoint .* \(epoch \d+ @ (\d+) updates\)", output)
    assert m, output[-3000:]
    return int(m.group(1))


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(kill_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = warm.start(_cmd(kill_data, save, 150))
    deadline = time.time() + 120
    while not list(save.glob("checkpoint_*_*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.5))  # during a step or a checkpoint write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the next run is the same command: it resumes from the last complete checkpoint
    resumed = warm.run(_cmd(kill_data, save, 150))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert _loaded_update(output) >= 3
    assert "num_updates: 150 >= max_update" in output


@pytest.fixture(scope="module")
def ten_updates(kill_data, tmp_path_factory):
    """A run of 10 updates (checkpoints at 3, 6, 9 and checkpoint_last at 10), shared: each test damages a copy."""
    save = tmp_path_factory.mktemp("ten_updates") / "ckpt"
    first = warm.run(_cmd(kill_data, save, 10))
    assert first.returncode == 0, first.stderr[-3000:]
    return save


def test_truncated_checkpoint_last_does_not_fall_back_to_an_older_update_unasked(kill_data, ten_updates, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(ten_updates, save)
    last = save / "checkpoint_last.pt"  # update 10, written by itself (10 is not a multiple of 3)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    refused = warm.run(_cmd(kill_data, save, 12))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "STABLEMOE_ALLOW_OLDER_CHECKPOINT=1" in output and "checkpoint_1_9.pt" in output and "update 9" in output
    assert "Loaded checkpoint" not in output
    # the explicit opt-in resumes from the newest intact checkpoint
    env = dict(os.environ, STABLEMOE_ALLOW_OLDER_CHECKPOINT="1")
    resumed = warm.run(_cmd(kill_data, save, 12), env=env)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "an older save" in output and "checkpoint_1_9.pt" in output
    assert _loaded_update(output) == 9
    assert "num_updates: 12 >= max_update" in output


def test_copy_cut_short_resumes_from_its_source(kill_data, ten_updates, tmp_path):
    """A kill while fairseq copies checkpoint_1_9.pt to checkpoint_last.pt: the same update, no opt-in needed."""
    save = tmp_path / "ckpt"
    shutil.copytree(ten_updates, save)
    source = (save / "checkpoint_1_9.pt").read_bytes()
    (save / "checkpoint_last.pt").write_bytes(source[: len(source) // 3])
    resumed = warm.run(_cmd(kill_data, save, 12))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "the same save" in output and "checkpoint_1_9.pt" in output
    assert _loaded_update(output) == 9
