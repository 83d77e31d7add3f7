"""End to end with fairseq's own commands: fairseq-train across the stage boundary,
fairseq-eval-lm, hub loading (sample, score) and incremental decoding."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fairseq_stablemoe  # noqa: F401
from corpus import markov_corpus

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_stablemoe")
BOUNDARY = 12


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_e2e")
    data = markov_corpus(tmp, 1500, 150, vocab=100, seed=4)
    (data / "test.bin").write_bytes((data / "valid.bin").read_bytes())
    (data / "test.idx").write_bytes((data / "valid.idx").read_bytes())
    save = tmp / "ckpt"
    out = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "language_modeling",
         "--arch", "stablemoe_lm", "--criterion", "stablemoe", "--decoder-layers", "2", "--decoder-embed-dim", "48",
         "--decoder-ffn-embed-dim", "96", "--decoder-attention-heads", "2", "--num-experts", "4",
         "--two-stage-updates", str(BOUNDARY), "--optimizer", "adam", "--lr", "0.005", "--weight-decay", "0.01",
         "--max-tokens", "512", "--tokens-per-sample", "32", "--max-update", "40", "--cpu", "--save-dir", str(save),
         "--save-interval-updates", "4", "--keep-interval-updates", "-1", "--no-epoch-checkpoints",
         "--log-format", "json", "--log-interval", "1", "--seed", "2", "--num-workers", "0"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # every saved checkpoint by its update count (an interval save that falls on an epoch end is
    # saved as checkpoint_last only)
    ckpts = {}
    for p in sorted(save.glob("checkpoint*.pt")):
        ckpts.setdefault(torch.load(p, weights_only=True)["optimizer_history"][-1]["num_updates"], p)
    return data, save, ckpts, out.stdout + out.stderr


def test_stage_losses_in_the_json_log(lm_run):
    _, _, _, log = lm_run
    records = [json.loads(m.group(1)) for m in re.finditer(r"\| train_inner \| (\{.*\})", log)]
    assert len(records) == 40
    for rec in records:
        update = int(rec["num_updates"])
        if update <= BOUNDARY:  # logged after the step: updates 1..12 ran in stage 1
            assert rec["stage"] == "1"
            assert float(rec["balance_loss"]) != 0.0 and float(rec["distill_loss"]) > 0.0
        else:
            assert rec["stage"] == "2"
            assert float(rec["balance_loss"]) == 0.0 and float(rec["distill_loss"]) == 0.0


def test_router_frozen_between_checkpoints_after_the_boundary(lm_run):
    _, _, ckpts, _ = lm_run
    states = {u: torch.load(p, weights_only=True)["model"] for u, p in ckpts.items()}
    router = [k for k in states[40] if "router" in k and torch.is_floating_point(states[40][k])
              and not k.endswith("frozen")]
    assert router
    for k in router:
        assert not torch.equal(states[4][k], states[12][k]), f"{k} trains in stage 1"
        for u in (16, 24, 32, 40):
            assert torch.equal(states[12][k], states[u][k]), (k, u)
    for k in ("decoder.layers.1.moe.backbone.expert_centroids", "decoder.layers.1.moe.experts.0.0.fc1.weight"):
        assert not torch.equal(states[16][k], states[40][k]), f"{k} keeps training"


def _eval_ppl(data, ckpt):
    out = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.eval_lm", str(data), "--user-dir", USER_DIR, "--path", str(ckpt),
         "--gen-subset", "test", "--cpu", "--tokens-per-sample", "32", "--max-tokens", "2048"],
        capture_output=True, text=True,
    )
    m = re.search(r"Perplexity: ([0-9.]+)", out.stdout + out.stderr)
    assert out.returncode == 0 and m, out.stderr[-3000:]
    return float(m.group(1))


def test_eval_lm(lm_run):
    data, save, ckpts, _ = lm_run
    vocab = len((data / "dict.txt").read_text().splitlines()) + 4
    last, first = _eval_ppl(data, save / "checkpoint_last.pt"), _eval_ppl(data, ckpts[4])
    assert last < first and last < vocab / 4


def test_hub_loading_sample_and_score(lm_run):
    data, save, _, _ = lm_run
    from fairseq_stablemoe.model import StableMoELanguageModel

    hub = StableMoELanguageModel.from_pretrained(str(save), checkpoint_file="checkpoint_last.pt",
                                                 data_name_or_path=str(data)).eval()
    out = hub.sample("w1 w7", beam=1, sampling=True, sampling_topk=5, max_len_b=6)
    assert out.startswith("w1 w7") and len(out.split()) > 2
    scores = hub.score("w1 w7 w49 w43")["positional_scores"]
    assert scores.shape[0] == 4 and torch.isfinite(scores).all()  # one score per token


def test_incremental_decoding_equals_full_forward(lm_run):
    data, save, _, _ = lm_run
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(data)}
    )
    model = models[0].eval()
    task.load_dataset("valid")
    tokens = torch.stack([task.dataset("valid")[i]["source"][:12] for i in range(4)])
    with torch.no_grad():
        full = model.get_normalized_probs(model(tokens), log_probs=True)
        state = {}
        steps = []
        for t in range(tokens.shape[1]):
            out = model.decoder(tokens[:, : t + 1], incremental_state=state)
            steps.append(model.get_normalized_probs(out, log_probs=True)[:, -1])
        incremental = torch.stack(steps, dim=1)
        _, extra = model.decoder.extract_features(tokens, None)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)
    assert (extra["moe"][0]["load"] > 0).sum() > 1, "routing should use several experts"
