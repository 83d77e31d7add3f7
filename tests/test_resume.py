"""Exact resume: 2N updates in one run == resuming from that run's checkpoint at update N and training N
more (bit-for-bit on CPU)."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import warm
from corpus import markov_corpus

import fairseq_stablemoe  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    return markov_corpus(
        tmp_path_factory.mktemp("resume"), 800, 100, vocab=80, seed=5, prefix="t", mult=3, min_len=5, max_len=15
    )


def _train(data: Path, save: Path, max_update: int, two_stage: int, *extra: str):
    cmd = [
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
        "32",
        "--decoder-ffn-embed-dim",
        "64",
        "--decoder-attention-heads",
        "2",
        "--num-experts",
        "4",
        "--two-stage-updates",
        str(two_stage),
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--weight-decay",
        "0.01",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "5",
        "--dropout",
        "0.1",
        "--max-tokens",
        "256",
        "--tokens-per-sample",
        "32",
        "--max-update",
        str(max_update),
        "--cpu",
        "--save-dir",
        str(save),
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--seed",
        "7",
        "--num-workers",
        "0",
        *extra,
    ]
    out = warm.run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = {}
    for line in (out.stdout + out.stderr).splitlines():
        m = re.search(r"\| train_inner \| (\{.*\})$", line)
        if m:
            rec = json.loads(m.group(1))
            losses[int(rec["num_updates"])] = (rec["loss"], rec["balance_loss"], rec["distill_loss"])
    return losses


@pytest.mark.parametrize(
    "boundary",
    [pytest.param(15, marks=pytest.mark.slow), 10],
    ids=["boundary-inside-second-half", "boundary-at-resume"],
)
def test_resume_is_bit_exact(resume_data, tmp_path, boundary):
    straight = _train(resume_data, tmp_path / "straight", 20, boundary, "--save-interval-updates", "10")
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoint_1_10.pt", tmp_path / "resumed" / "checkpoint_last.pt")
    second = _train(resume_data, tmp_path / "resumed", 20, boundary)
    assert sorted(straight) == list(range(1, 21)) and sorted(second) == list(range(11, 21))
    for u in range(11, 21):
        assert second[u] == straight[u], f"update {u}"
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 20
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert b["model"]["decoder.layers.1.moe.distill_router.frozen"].item()
