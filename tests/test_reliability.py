"""Degenerate batches (property-based), half precision, collapse warning."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_stablemoe.modules.baseline_layers import SwitchLayer
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

PAD = 1
VOCAB = 20


def _layer(num_experts, stage2=False, seed=0, cls=StableMoELayer):
    torch.manual_seed(seed)
    if cls is StableMoELayer:
        layer = StableMoELayer(
            4, 8, num_experts, 2, vocab_size=VOCAB, padding_idx=PAD, distill_dim=3, two_stage_updates=1
        )
        with torch.no_grad():
            layer.distill_router.centroids.normal_()
    else:
        layer = cls(4, 8, num_experts, 2, PAD)
    for p in layer.experts.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        layer.backbone.expert_centroids.normal_()
    layer.train()
    layer.set_num_updates(1 if stage2 else 0)
    return layer


def _reference_output(layer, h, tokens, choice, gate):
    """Dense reference: every token through its expert by itself."""
    rows = []
    for t in range(h.shape[0]):
        if tokens[t] == PAD:
            rows.append(h[t])
            continue
        x = h[t : t + 1]
        y = layer.experts[int(choice[t])](x)[0] - h[t]
        rows.append(h[t] + (gate[t] if gate is not None else 1.0) * y)
    return torch.stack(rows)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    num_tokens=st.integers(1, 24),
    num_experts=st.sampled_from([1, 2, 3, 5]),
    pad_mask=st.lists(st.booleans(), min_size=24, max_size=24),
    stage2=st.booleans(),
    collapse=st.booleans(),
    seed=st.integers(0, 5),
)
def test_layer_matches_per_token_reference(num_tokens, num_experts, pad_mask, stage2, collapse, seed):
    layer = _layer(num_experts, stage2=stage2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (num_tokens,), generator=g)
    tokens[torch.tensor(pad_mask[:num_tokens])] = PAD
    if collapse:  # every token on one expert: huge first coordinate + aligned centroid
        with torch.no_grad():
            layer.backbone.expert_centroids.zero_()
            layer.backbone.expert_centroids[0, 0] = 1.0
            layer.distill_router.centroids.zero_()
            layer.distill_router.centroids[0] = 1.0
            layer.distill_router.embed_tokens.weight.abs_()
        if stage2:  # the router routes with the snapshot taken at the freeze: take it again
            layer.distill_router.freeze()
    h = torch.randn(num_tokens, 4, generator=g)
    if collapse:
        h[:, 0] = h[:, 0].abs() + 5
    h.requires_grad_()
    out, stats = layer(h, tokens)

    scores = h.detach() @ layer.backbone.expert_centroids.detach().t()
    distill = layer.distill_router.embed_tokens.weight.detach()[tokens] @ layer.distill_router.centroids.detach().t()
    choice = (distill if stage2 else scores).argmax(1)
    h_ref = h.detach().clone().requires_grad_()
    ref = _reference_output(
        layer,
        h_ref,
        tokens,
        choice,
        torch.sigmoid((h_ref @ layer.backbone.expert_centroids.t()).gather(1, choice[:, None]).squeeze(1)),
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    valid = tokens.ne(PAD)
    assert stats["num_tokens"].item() == valid.sum().item()
    assert stats["load"].sum().item() == valid.sum().item()
    for v in stats.values():
        assert torch.isfinite(v).all()

    # gradients w.r.t. the input and an expert weight equal the reference's
    w = torch.randn(num_tokens, 4, generator=g)
    loss = (out * w).sum() + sum(stats.get(k, 0) for k in ("balance_loss", "distill_loss"))
    (grad_h,) = torch.autograd.grad(loss, h, retain_graph=False)
    ref_loss = (ref * w).sum()
    if not stage2:
        # the balance loss term's own input gradient, recomputed independently
        counts = torch.zeros(num_experts).index_add_(0, choice, valid.float())
        n = valid.sum()
        mean = n / num_experts
        weight = (counts - mean) / mean.clamp(min=1e-9)
        s_ref = h_ref @ layer.backbone.expert_centroids.detach().t()
        ref_loss = (
            ref_loss + (weight[choice] * torch.sigmoid(s_ref.gather(1, choice[:, None]).squeeze(1)) * valid).sum()
        )
    (ref_grad,) = torch.autograd.grad(ref_loss, h_ref)
    torch.testing.assert_close(grad_h, ref_grad, rtol=1e-4, atol=1e-5)


def test_all_padding_batch_and_single_token():
    layer = _layer(3)
    h = torch.randn(5, 4, requires_grad=True)
    out, stats = layer(h, torch.full((5,), PAD))
    assert torch.equal(out, h)
    assert stats["balance_loss"].item() == 0.0 and stats["distill_loss"].item() == 0.0
    (out.sum() + stats["balance_loss"] + stats["distill_loss"]).backward()
    assert torch.isfinite(h.grad).all()
    out, stats = layer(torch.randn(1, 4), torch.tensor([5]))
    assert stats["load"].sum().item() == 1 and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [StableMoELayer, SwitchLayer])
def test_half_precision_extreme_activations_keep_routing_finite(dtype, cls):
    layer = _layer(4, cls=cls).to(dtype)
    h = (torch.randn(32, 4).clamp(-2, 2) * 3e4).to(dtype)  # finite, but h . E overflows fp16
    assert torch.isfinite(h).all()
    tokens = torch.randint(2, VOCAB, (32,))
    out, stats = layer(h, tokens)
    assert stats["nonfinite"].item() == 0, "affinities must be computed in fp32"
    for key in ("balance_loss", "distill_loss"):
        if key in stats:
            assert stats[key].dtype == torch.float32 and torch.isfinite(stats[key])
    assert stats["load"].sum().item() == 32


def test_collapse_warns_once_naming_the_layer(caplog):
    layer = _layer(4)
    layer.layer_name = "MoE layer 7"
    layer.collapse.patience = 3
    with torch.no_grad():
        layer.backbone.expert_centroids.zero_()
        layer.backbone.expert_centroids[2, 0] = 1.0
    h = torch.randn(16, 4)
    h[:, 0] = h[:, 0].abs() + 1
    tokens = torch.randint(2, VOCAB, (16,))
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe.modules.health"):
        for step in range(10):
            layer.set_num_updates(0)
            layer(h, tokens)
        layer.set_num_updates(0)
    warnings = [r for r in caplog.records if "collapse" in r.getMessage()]
    assert len(warnings) == 1
    assert "MoE layer 7" in warnings[0].getMessage()
    # a balanced layer never warns
    caplog.clear()
    balanced = _layer(4)
    balanced.collapse.patience = 3
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe.modules.health"):
        for step in range(10):
            balanced.set_num_updates(0)
            balanced(torch.randn(64, 4), torch.randint(2, VOCAB, (64,)))
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]
