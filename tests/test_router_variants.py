"""Distilled-router variants (``--distill-router wordemb|cnn|transformer``, the paper's Table 6) and
the balanced stage-1 assignment (``--stage1-assignment balanced``, Table 5).

Unit level: the cnn router against a loop over its window, causality (a later token never changes
an earlier token's routing), incremental decoding (the prefix, one step at a time) against a full
forward, the freeze covering every parameter, and the balanced assignment against an optimal
assignment from scipy. End to end: fairseq-train across the boundary with every variant, the
router unchanged in every checkpoint after it and after a resume, and the fluctuation tool.
"""

import json
import sys

import pytest
import torch
import warm
from conftest import BOUNDARY, run_cli, train_args
from scipy.optimize import linear_sum_assignment

from fairseq_stablemoe.modules.router import CNN_WINDOW, DistilledRouter
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

PAD = 1
VOCAB = 30
KINDS = ["wordemb", "cnn", "transformer"]


def router(kind, seed=0, layers=2):
    torch.manual_seed(seed)
    r = DistilledRouter(VOCAB, 8, 4, PAD, kind=kind, layers=layers, heads=2)
    with torch.no_grad():
        r.centroids.normal_()
    return r


def test_cnn_router_against_a_loop_over_its_window():
    r = router("cnn")
    seq = torch.randint(2, VOCAB, (9, 3))
    got = r(seq).view(9, 3, 4)
    emb, kernel, E = r.embed_tokens.weight.detach(), r.kernel.detach(), r.centroids.detach()
    for b in range(3):
        for t in range(9):
            feat = sum(kernel[j] * emb[seq[t - j, b]] for j in range(CNN_WINDOW) if t - j >= 0)
            torch.testing.assert_close(got[t, b], feat @ E.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_later_token_never_changes_earlier_routing(kind):
    r = router(kind)
    seq = torch.randint(2, VOCAB, (10, 4))
    base = r(seq).view(10, 4, 4)
    for t in range(10):
        changed = seq.clone()
        changed[t] = (changed[t] + 1 - 2) % (VOCAB - 2) + 2  # another non-pad id
        out = r(changed).view(10, 4, 4)
        assert torch.equal(out[:t], base[:t]), (kind, t)
        assert not torch.allclose(out[t], base[t]), (kind, t)  # the current token matters
        if kind != "wordemb" and t + 1 < 10:
            assert not torch.allclose(out[t + 1], base[t + 1]), (kind, t)  # and earlier ones too


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_left_padding_does_not_change_routing(kind):
    """Left-padded source sentences (fairseq's translation default) route as unpadded ones."""
    r = router(kind)
    seq = torch.randint(2, VOCAB, (6, 1))
    padded = torch.cat([torch.full((3, 1), PAD), seq])
    torch.testing.assert_close(r(padded).view(9, 4)[3:], r(seq).view(6, 4), rtol=1e-5, atol=1e-6)


def make_layer(kind, two_stage=5, **kwargs):
    torch.manual_seed(0)
    layer = StableMoELayer(
        embed_dim=8,
        ffn_dim=16,
        num_experts=4,
        num_sublayers=1,
        vocab_size=VOCAB,
        padding_idx=PAD,
        distill_dim=8,
        two_stage_updates=two_stage,
        distill_router=kind,
        distill_router_layers=2,
        **kwargs,
    )
    for p in layer.experts.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        layer.distill_router.centroids.normal_()
    return layer


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_equals_full_forward(kind):
    """One step at a time with the whole prefix as context, as the decoder does, vs one forward."""
    layer = make_layer(kind).eval()
    T, B = 8, 3
    x = torch.randn(T, B, 8)
    seq = torch.randint(2, VOCAB, (T, B))
    with torch.no_grad():
        full, full_stats = layer(x, seq)
        steps, load = [], torch.zeros(4)
        for t in range(T):
            out, stats = layer(x[t : t + 1], seq[t : t + 1], context=seq[: t + 1])
            steps.append(out)
            load += stats["load"]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)
    assert torch.equal(load, full_stats["load"])


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_covers_every_parameter_of_the_variant(kind):
    layer = make_layer(kind)
    layer.train()
    x, seq = torch.randn(6, 2, 8), torch.randint(2, VOCAB, (6, 2))
    layer.set_num_updates(5)  # the boundary: frozen
    with torch.no_grad():
        before = layer.assignment(x, seq)
        frozen = {k: v.clone() for k, v in layer.distill_router.state_dict().items()}
        for p in layer.distill_router.parameters():  # an optimizer drift of every parameter
            p.add_(torch.randn_like(p))
    assert torch.equal(layer.assignment(x, seq), before)  # the snapshot routes
    saved = layer.distill_router.state_dict()
    for k in frozen:
        assert torch.equal(saved[k], frozen[k]), k  # the state dict holds the snapshot
    layer.set_num_updates(6)  # before every step: the snapshot is written back
    for name, p in layer.distill_router.named_parameters():
        assert torch.equal(p, frozen[name]), name
    fresh = make_layer(kind)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.distill_router.is_frozen
    fresh.set_num_updates(6)
    with torch.no_grad():
        fresh.distill_router.kernel.add_(1.0) if kind == "cnn" else fresh.distill_router.centroids.add_(1.0)
    assert torch.equal(fresh.assignment(x, seq), before)


def test_balanced_stage1_assignment_is_an_optimal_balanced_assignment():
    layer = make_layer("wordemb", two_stage=100, stage1_assignment="balanced").train()
    T = 32
    x = torch.randn(T, 8)
    seq = torch.randint(2, VOCAB, (T,))
    routing = layer.route(x, seq, torch.ones(T))
    load = torch.bincount(routing.choice, minlength=4)
    assert load.tolist() == [T // 4] * 4
    scores = layer.backbone(x).detach()
    # optimal: every expert as T/4 slots, maximise the total affinity
    slots = scores.repeat_interleave(T // 4, dim=1).numpy()
    rows, cols = linear_sum_assignment(slots, maximize=True)
    best = slots[rows, cols].sum()
    got = scores.gather(1, routing.choice.unsqueeze(1)).sum().item()
    assert got >= best - 1e-3 * abs(best) - 1e-3, (got, best)
    # the distillation target stays the backbone's top-1 (the paper's code)
    greedy = scores.argmax(1)
    assert not torch.equal(routing.choice, greedy)
    expected = torch.nn.functional.cross_entropy(layer.distill_router(seq), greedy, reduction="sum")
    torch.testing.assert_close(routing.stats["distill_loss"], expected)
    # stage 2 and inference: the distilled router, greedy
    assert torch.equal(layer.eval().route(x, seq, torch.ones(T)).choice, layer.distill_router(seq).argmax(1))


# ----------------------------------------------------------------------------- end to end


def router_state(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if ".distill_router." in k}


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--distill-router", "cnn"], marks=pytest.mark.slow),
        pytest.param(["--distill-router", "transformer", "--distill-router-layers", "2"], marks=pytest.mark.slow),
        ["--stage1-assignment", "balanced", "--balance-factor", "0"],
    ],
    ids=["cnn", "transformer2", "balanced"],
)
def test_trained_across_the_boundary_the_router_stays_frozen_and_resumes(markov_data, tmp_path, flags):
    save = tmp_path / "ckpt"
    end = BOUNDARY + 15
    run_cli("train", *train_args(markov_data.data_dir, save, "--max-update", str(end), *flags))
    at = {
        u: router_state(save / f"checkpoint_1_{u}.pt") for u in (15, 30, 45) if (save / f"checkpoint_1_{u}.pt").exists()
    }
    assert set(at) == {15, 30, 45}, sorted(p.name for p in save.iterdir())
    keys = [k for k in at[45] if not k.endswith(".frozen")]
    if flags[1] == "cnn":
        assert any(k.endswith("distill_router.kernel") for k in keys)
    if flags[1] == "transformer":
        assert any(".distill_router.blocks.1." in k for k in keys)
    assert not bool(at[15][next(k for k in at[15] if k.endswith(".frozen"))])
    assert bool(at[45][next(k for k in at[45] if k.endswith(".frozen"))])
    assert any(not torch.equal(at[15][k], at[30][k]) for k in keys), "stage 1 should train the router"
    # resume past the boundary: still the same router
    run_cli("train", *train_args(markov_data.data_dir, save, "--max-update", str(end + 10), *flags))
    last = router_state(save / "checkpoint_last.pt")
    for k in keys:
        assert torch.equal(at[30][k], at[45][k]) and torch.equal(at[45][k], last[k]), k
    if flags[1] == "transformer":
        # the fluctuation tool reads the variant's routing: stage-2 pairs never change
        js = tmp_path / "fl.json"
        warm.run(
            [
                sys.executable,
                "-m",
                "fairseq_stablemoe.cli.fluctuation",
                str(markov_data.data_dir),
                *[str(save / f"checkpoint_1_{u}.pt") for u in (15, 30, 45)],
                str(save / "checkpoint_last.pt"),
                "--split",
                "valid",
                "--json",
                str(js),
                "--cpu",
            ],
            check=True,
        )
        pairs = json.loads(js.read_text())["pairs"]
        stage2 = [p for p in pairs if p["from_update"] > BOUNDARY]
        assert stage2 and all(p["ratio"] == 0.0 for p in stage2), pairs
