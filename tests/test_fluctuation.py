"""stablemoe-fluctuation: the analysis maths and real runs of every routed type."""

import json
import sys
from pathlib import Path

import pytest
import torch
import warm
from corpus import markov_corpus

from fairseq_stablemoe.cli.fluctuation import CheckpointRouting, analyse

REPO = Path(__file__).resolve().parents[1]


def test_analyse_by_hand():
    # 2 layers x 4 tokens, checkpoints at updates 10, 20, 40
    runs = [
        CheckpointRouting("a", 10, [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 1, 1])]),
        CheckpointRouting("b", 20, [torch.tensor([0, 1, 0, 3]), torch.tensor([1, 0, 1, 1])]),
        CheckpointRouting("c", 40, [torch.tensor([0, 2, 0, 3]), torch.tensor([1, 0, 1, 1])]),
    ]
    r = analyse(runs)
    assert [p["ratio"] for p in r["pairs"]] == [2 / 8, 1 / 8]
    assert r["pairs"][0]["per_layer"] == [0.25, 0.25]
    assert r["pairs"][1]["per_layer"] == [0.25, 0.0]
    assert (r["pairs"][0]["from_update"], r["pairs"][0]["to_update"]) == (10, 20)
    # last differing checkpoint vs the final one, per token (layer 0: -, b, a, -; layer 1: -, a, -, -)
    # -> settled at: 0%, 100%, 50%, 0% | 0%, 50%, 0%, 0%
    assert r["last_fluctuation"]["update_pct"] == [25.0, 50.0, 100.0]
    assert r["last_fluctuation"]["cumulative_share"] == [5 / 8, 7 / 8, 1.0]
    assert r["share_last_fluctuation_after_20pct"] == 3 / 8
    with pytest.raises(ValueError, match="at least two"):
        analyse(runs[:1])


@pytest.fixture(scope="module")
def fluct_data(tmp_path_factory):
    return markov_corpus(tmp_path_factory.mktemp("fluct"), 1000, 200, vocab=120, seed=0)


def _train(data: Path, save: Path, moe_type: str) -> list:
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
        "--moe-type",
        moe_type,
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
        "10",
        "--optimizer",
        "adam",
        "--lr",
        "0.005",
        "--max-tokens",
        "512",
        "--tokens-per-sample",
        "32",
        "--max-update",
        "40",
        "--cpu",
        "--save-dir",
        str(save),
        "--save-interval-updates",
        "10",
        "--keep-interval-updates",
        "10",
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--log-format",
        "json",
        "--seed",
        "3",
    ]
    out = warm.run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {int(p.stem.split("_")[-1]): p for p in save.glob("checkpoint_*_*.pt")}
    assert sorted(found) == [10, 20, 30, 40], sorted(found)
    return [found[u] for u in (10, 20, 30, 40)]


def _fluctuation(data: Path, ckpts, tmp: Path, *extra):
    out_json = tmp / "f.json"
    cmd = [
        sys.executable,
        "-m",
        "fairseq_stablemoe.cli.fluctuation",
        str(data),
        *map(str, ckpts),
        "--split",
        "valid",
        "--json",
        str(out_json),
        "--plot",
        str(tmp / "f.png"),
        "--user-dir",
        str(REPO / "fairseq_stablemoe"),
        *extra,
    ]
    out = warm.run(cmd)
    return out, (json.loads(out_json.read_text()) if out.returncode == 0 else None)


@pytest.fixture(scope="module")
def trained(fluct_data, tmp_path_factory):
    """``trained(moe_type)``: the checkpoints of one run of that type, trained once for the module."""
    runs = {}

    def get(moe_type: str) -> list:
        if moe_type not in runs:
            runs[moe_type] = _train(fluct_data, tmp_path_factory.mktemp(f"fluct_{moe_type}"), moe_type)
        return runs[moe_type]

    return get


@pytest.mark.parametrize(
    "moe_type",
    ["stablemoe", pytest.param("switch", marks=pytest.mark.slow), pytest.param("base", marks=pytest.mark.slow)],
)
def test_fluctuation_on_real_runs(fluct_data, trained, tmp_path, moe_type):
    ckpts = trained(moe_type)
    out, result = _fluctuation(fluct_data, ckpts, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [(p["from_update"], p["to_update"]) for p in result["pairs"]] == [(10, 20), (20, 30), (30, 40)]
    assert result["num_tokens"] > 1000
    assert (tmp_path / "f.png").stat().st_size > 0
    if moe_type == "stablemoe":
        # the boundary is at update 10: every checkpoint from then on routes with the frozen router
        assert all(p["ratio"] == 0.0 for p in result["pairs"])
    else:
        assert all(p["ratio"] > 0.0 for p in result["pairs"])


def test_fluctuation_refuses_mixed_runs_and_single_checkpoints(fluct_data, trained, tmp_path):
    a, b = trained("stablemoe"), trained("switch")
    out, _ = _fluctuation(fluct_data, [a[0], b[1]], tmp_path)
    assert out.returncode != 0 and "same run" in out.stderr
    out, _ = _fluctuation(fluct_data, [a[0]], tmp_path)
    assert out.returncode != 0 and "at least two checkpoints" in out.stderr
    out, _ = _fluctuation(fluct_data, a[:2], tmp_path, "--split", "test")
    assert out.returncode != 0 and "test" in out.stderr
