"""StableMoELayer maths against an independent, loop-by-loop reference."""

import math

import pytest
import torch

from fairseq_stablemoe.modules.moe_layer import reading_moe_stats
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

PAD = 1
VOCAB = 12


def make_layer(num_experts=3, d=4, f=6, sublayers=2, two_stage=10, capacity_factor=None, seed=0):
    torch.manual_seed(seed)
    layer = StableMoELayer(
        embed_dim=d,
        ffn_dim=f,
        num_experts=num_experts,
        num_sublayers=sublayers,
        vocab_size=VOCAB,
        padding_idx=PAD,
        distill_dim=5,
        two_stage_updates=two_stage,
        capacity_factor=capacity_factor,
    )
    # non-zero second linear layers so every expert does something
    for p in layer.experts.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        layer.backbone.expert_centroids.normal_()
        layer.distill_router.centroids.normal_()
    return layer


def ref_expert(layer, e, x):
    """One expert's stack by hand: LayerNorm formula, ReLU, two affine maps, residual."""
    y = x.clone()
    for sub in layer.experts[e]:
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        z = (y - mu) / torch.sqrt(var + sub.norm.eps) * sub.norm.weight + sub.norm.bias
        hidden = torch.clamp(z @ sub.fc1.weight.t() + sub.fc1.bias, min=0)
        y = y + hidden @ sub.fc2.weight.t() + sub.fc2.bias
    return y - x


def reference(layer, h, tokens, route_with):
    """Per-token loops: assignment, gate, output, balance and distillation losses."""
    E = layer.backbone.expert_centroids.detach()
    D = layer.distill_router.embed_tokens.weight.detach()
    Ed = layer.distill_router.centroids.detach()
    N = E.shape[0]
    out = h.clone()
    valid = [t for t in range(h.shape[0]) if tokens[t].item() != PAD]
    s = {t: [float(h[t] @ E[i]) for i in range(N)] for t in range(h.shape[0])}
    sd = {t: [float(D[tokens[t]] @ Ed[i]) for i in range(N)] for t in range(h.shape[0])}
    a_backbone = {t: max(range(N), key=lambda i: s[t][i]) for t in s}
    a_distill = {t: max(range(N), key=lambda i: sd[t][i]) for t in sd}
    assign = a_backbone if route_with == "backbone" else a_distill
    for t in valid:
        a = assign[t]
        gate = 1 / (1 + math.exp(-s[t][a]))
        out[t] = h[t] + gate * ref_expert(layer, a, h[t : t + 1])[0]
    n = len(valid)
    counts = [sum(1 for t in valid if a_backbone[t] == i) for i in range(N)]
    balance = 0.0
    for i in range(N):
        members = [t for t in valid if a_backbone[t] == i]
        balance += (counts[i] - n / N) / (n / N) * sum(1 / (1 + math.exp(-s[t][i])) for t in members)
    distill = 0.0
    for t in valid:
        logz = math.log(sum(math.exp(v) for v in sd[t]))
        distill += logz - sd[t][a_backbone[t]]
    load = [sum(1 for t in valid if assign[t] == i) for i in range(N)]
    agree = sum(1 for t in valid if a_backbone[t] == a_distill[t])
    return out, balance, distill, load, agree, assign


def inputs(T=16, d=4, pad_positions=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    tokens = torch.randint(2, VOCAB, (T,), generator=g)
    for p in pad_positions:
        tokens[p] = PAD
    return h, tokens


@pytest.mark.parametrize("pads", [(), (0, 5, 6, 15)])
def test_stage1_matches_reference(pads):
    layer = make_layer()
    layer.train()
    layer.set_num_updates(0)
    h, tokens = inputs(pad_positions=pads)
    out, stats = layer(h, tokens)
    ref_out, balance, distill, load, agree, assign = reference(layer, h, tokens, "backbone")
    for p in pads:  # padding goes to no expert
        assert torch.equal(out[p], h[p])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert stats["balance_loss"].item() == pytest.approx(balance, rel=1e-5, abs=1e-6)
    assert stats["distill_loss"].item() == pytest.approx(distill, rel=1e-5)
    assert stats["load"].tolist() == load
    assert stats["agree"].item() == agree
    assert stats["num_tokens"].item() == 16 - len(pads)
    assert len(set(assign.values())) > 1, "the example should use several experts"
    assert balance != 0.0


def test_stage1_gradients_flow_to_the_right_places():
    layer = make_layer()
    layer.train()
    h, tokens = inputs()
    out, stats = layer(h, tokens)
    # the distillation loss trains the distilled router only
    stats["distill_loss"].backward(retain_graph=True)
    assert layer.distill_router.centroids.grad.abs().sum() > 0
    assert layer.backbone.expert_centroids.grad is None
    # the balance loss reaches the backbone centroids; counts are constants
    stats["balance_loss"].backward(retain_graph=True)
    assert layer.backbone.expert_centroids.grad.abs().sum() > 0
    # the gate passes the LM gradient to the centroids too
    layer.zero_grad()
    out.sum().backward()
    assert layer.backbone.expert_centroids.grad.abs().sum() > 0
    assert layer.distill_router.centroids.grad is None


def test_stage2_routes_with_distilled_router_and_has_no_losses():
    layer = make_layer(two_stage=10)
    layer.train()
    layer.set_num_updates(10)
    h, tokens = inputs(pad_positions=(3,))
    out, stats = layer(h, tokens)
    ref_out, *_, load, agree, assign = reference(layer, h, tokens, "distill")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert "balance_loss" not in stats and "distill_loss" not in stats
    assert stats["load"].tolist() == load
    out.sum().backward()
    assert layer.distill_router.centroids.grad is None
    assert layer.distill_router.embed_tokens.weight.grad is None
    assert layer.backbone.expert_centroids.grad.abs().sum() > 0  # the gate keeps training it


def test_inference_routes_with_distilled_router_in_stage1():
    layer = make_layer(two_stage=10)
    layer.set_num_updates(0)
    layer.eval()
    h, tokens = inputs()
    with torch.no_grad():
        out, _ = layer(h, tokens)
    ref_out, *_ = reference(layer, h, tokens, "distill")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    ref_backbone, *_ = reference(layer, h, tokens, "backbone")
    assert not torch.allclose(out, ref_backbone), "example must tell the two routers apart"


@pytest.mark.parametrize("updates", [0, 10])
def test_plain_inference_skips_losses_and_diagnostics(updates):
    """Plain inference computes the output alone; validation (inside ``reading_moe_stats``, as the
    criterion runs the model) also gets the losses and diagnostics, with the same output."""
    layer = make_layer(two_stage=10)
    layer.set_num_updates(updates)
    layer.eval()
    h, tokens = inputs(pad_positions=(2, 7))
    with torch.no_grad():
        out, stats = layer(h, tokens)
        with reading_moe_stats():
            out_stats, full = layer(h, tokens)
    assert torch.equal(out, out_stats)
    assert set(stats) == {"num_tokens", "global_tokens", "load", "dropped"}
    assert torch.equal(stats["load"], full["load"]) and stats["num_tokens"].item() == 14
    ref_out, _, distill, load, agree, _ = reference(layer, h, tokens, "distill")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert full["agree"].item() == agree and full["stage"].item() == (2.0 if updates else 1.0)
    assert full["nonfinite"].item() == 0
    assert ("distill_loss" in full) == (updates == 0) and "balance_loss" not in full
    if updates == 0:
        assert full["distill_loss"].item() == pytest.approx(distill, rel=1e-5)
    _, _, _, backbone_load, *_ = reference(layer, h, tokens, "backbone")
    assert full["backbone_load"].tolist() == backbone_load


def test_router_frozen_across_stage2_updates_even_with_zero_filled_grads():
    layer = make_layer(two_stage=2)
    layer.train()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    snapshots = {}
    for step in range(6):
        layer.set_num_updates(step)  # fairseq does this at the start of every train step
        h, tokens = inputs(seed=step)
        out, stats = layer(h, tokens)
        loss = out.pow(2).sum() + sum(stats.get(k, 0) for k in ("balance_loss", "distill_loss"))
        opt.zero_grad()
        loss.backward()
        # legacy_ddp fills missing gradients with zeros: Adam's momentum and the weight
        # decay would then move the router unless the freeze undoes it
        for p in layer.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        snapshots[step] = {k: v.clone() for k, v in layer.state_dict().items()}
    router_keys = [k for k in snapshots[0] if "router" in k and k.endswith(("weight", "centroids"))]
    assert router_keys
    for k in router_keys:
        assert not torch.equal(snapshots[0][k], snapshots[2][k]), f"{k} should train in stage 1"
        for step in (3, 4, 5):  # every state dict after the boundary holds the frozen values
            assert torch.equal(snapshots[2][k], snapshots[step][k]), k
    for k in ("backbone.expert_centroids", "experts.0.0.fc1.weight"):
        assert not torch.equal(snapshots[3][k], snapshots[5][k]), f"{k} should keep training"
    # the routing itself uses the frozen values
    layer.set_num_updates(6)
    assert torch.equal(layer.distill_router.centroids, snapshots[2]["distill_router.centroids"])


def test_freeze_survives_reload():
    layer = make_layer(two_stage=1)
    layer.set_num_updates(1)
    state = layer.state_dict()
    assert state["distill_router.frozen"].item()
    fresh = make_layer(two_stage=1, seed=5)
    fresh.load_state_dict(state)
    assert fresh.distill_router.is_frozen
    with torch.no_grad():
        fresh.distill_router.centroids.add_(1.0)  # an optimizer drift
    fresh.set_num_updates(7)
    assert torch.equal(fresh.distill_router.centroids, state["distill_router.centroids"])
    # loading a stage-1 state into a frozen layer unfreezes it
    early = make_layer(two_stage=1)
    fresh.load_state_dict(early.state_dict())
    assert not fresh.distill_router.is_frozen


def test_capacity_factor_passes_overflow_tokens_through():
    layer = make_layer(num_experts=2, capacity_factor=0.5)
    layer.train()
    h, tokens = inputs(T=16)
    out, stats = layer(h, tokens)
    _, _, _, load, _, assign = reference(layer, h, tokens, "backbone")
    capacity = math.ceil(0.5 * 16 / 2)  # per expert, over the batch's non-pad tokens
    dropped = 0
    for e in (0, 1):
        mine = [t for t in range(16) if assign[t] == e]
        unchanged = [t for t in mine if torch.equal(out[t], h[t])]
        # the tokens over capacity (drawn at random, see tests/test_capacity.py) pass through unchanged
        assert len(unchanged) == max(0, len(mine) - capacity), (e, mine, unchanged)
        dropped += len(unchanged)
    assert dropped > 0
    assert stats["dropped"].item() == dropped


def test_nonfinite_affinities_are_replaced_and_counted():
    layer = make_layer()
    layer.train()
    h, tokens = inputs()
    h[2, 0] = float("nan")
    h[4, 1] = float("inf")
    out, stats = layer(h, tokens)
    assert stats["nonfinite"].item() >= 2
    finite_rows = [t for t in range(16) if t not in (2, 4)]
    assert torch.isfinite(out[finite_rows]).all()
    assert torch.isfinite(stats["distill_loss"])


def test_frozen_router_routes_with_snapshot_even_if_parameters_drift():
    """An optimizer step after the last restore (e.g. Adam momentum under legacy_ddp) must not
    change routing before the next restore, e.g. in a validation between two train steps."""
    layer = make_layer(two_stage=1)
    layer.set_num_updates(1)
    layer.eval()
    h, tokens = inputs()
    with torch.no_grad():
        before = layer.assignment(h, tokens, training_routing=False)
        layer.distill_router.centroids.mul_(-1.0)  # a drift that would flip every argmax
        after = layer.assignment(h, tokens, training_routing=False)
    assert torch.equal(before, after)
    layer.distill_router.unfreeze()  # the same drift does change an unfrozen router
    with torch.no_grad():
        assert not torch.equal(before, layer.assignment(h, tokens, training_routing=False))


@pytest.mark.parametrize("kind", ["stablemoe", "switch"])
def test_routing_stays_fp32_under_autocast(kind):
    """Under --amp (autocast) the experts run in half precision, but routing affinities, gates
    and auxiliary losses are computed in fp32: equal to the forward without autocast."""
    from fairseq_stablemoe.modules.baseline_layers import SwitchLayer
    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    torch.manual_seed(0)
    if kind == "switch":
        layer = SwitchLayer(16, 32, 4, 1, padding_idx=1)
    else:
        layer = StableMoELayer(16, 32, 4, 1, vocab_size=40, padding_idx=1, two_stage_updates=10)
    with torch.no_grad():
        layer.backbone.expert_centroids.normal_()
    layer.train()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 16, generator=g) * 3
    tokens = torch.randint(2, 40, (50,), generator=g)
    _, want = layer(h, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got = layer(h, tokens)
        # without autocast off, the affinities would be bfloat16: the check below can fail
        half = h @ layer.backbone.expert_centroids.t()
    assert out.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert not torch.allclose(half.float(), h @ layer.backbone.expert_centroids.t(), rtol=1e-4, atol=0)
    for key in ("balance_loss", "load") + (("distill_loss", "agree") if kind == "stablemoe" else ()):
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key].detach(), want[key].detach()), key
