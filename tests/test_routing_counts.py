"""Exact distillation's counts, windows and refit table against a direct computation.

A StableMoE layer is trained through stage 1 on random tokens (its hidden
states drawn anew every update, so an id's backbone expert varies); the test
records every non-pad token's backbone choice (``argmax h . E``) itself and
computes, with plain Python counters, each window's ceiling and churn, the
refit window's majority map (ties to the distilled router's own choice) and
the hand-over statistics, then compares them with what the layer logs, saves
and freezes.
"""

from collections import Counter, defaultdict

import pytest
import torch
from fairseq.logging import metrics

from fairseq_stablemoe.layer import StableMoELayer
from fairseq_stablemoe.routing_counts import not_counted

V, N, PAD, D = 40, 3, 1, 8
BOUNDARY, REFIT, WINDOW = 9, 4, 3


def make_layer(refit=True, **kwargs):
    torch.manual_seed(0)
    return StableMoELayer(
        D,
        16,
        N,
        1,
        vocab_size=V,
        padding_idx=PAD,
        two_stage_updates=BOUNDARY,
        distill_refit=refit,
        refit_updates=REFIT,
        routing_window=WINDOW,
        **kwargs,
    ).train()


def step_inputs(u, T=10, B=3):
    g = torch.Generator().manual_seed(100 + u)
    tokens = torch.randint(4, V, (T, B), generator=g)
    tokens[-2:, 0] = PAD  # padding is never counted
    h = torch.randn(T, B, D, generator=g)
    return h, tokens


def backbone_pairs(layer, h, tokens):
    """(id, expert) of every non-pad token, computed directly from the centroids."""
    choice = (h.reshape(-1, D) @ layer.backbone.expert_centroids.detach().t()).argmax(1)
    return [(int(t), int(e)) for t, e in zip(tokens.reshape(-1), choice) if int(t) != PAD]


def train_step(layer, u):
    """The layer's part of fairseq's update u+1: set_num_updates(u), forward, backward."""
    layer.set_num_updates(u)
    h, tokens = step_inputs(u)
    pairs = backbone_pairs(layer, h, tokens)
    out, stats = layer(h.requires_grad_(), tokens)
    (out.sum() + stats["distill_loss"] + stats["balance_loss"]).backward()
    return pairs


def ceiling_of(pairs):
    by_id = defaultdict(Counter)
    for t, e in pairs:
        by_id[t][e] += 1
    return sum(max(c.values()) for c in by_id.values()) / len(pairs), by_id


def first_majority(counter):
    top = max(counter.values())
    return min(e for e, n in counter.items() if n == top)


def test_windows_log_the_ceiling_and_churn_of_their_tokens():
    layer = make_layer(refit=False)
    windows, current = [], []
    logged = {}
    for u in range(BOUNDARY):
        current += train_step(layer, u)
        with metrics.aggregate(new_root=True) as agg:
            layer.set_num_updates(u + 1)  # what the plugin's trainer hook does after the step
        values = agg.get_smoothed_values()
        if (u + 1) % WINDOW == 0 or u + 1 == BOUNDARY:
            windows.append(current)
            current = []
            logged[len(windows)] = values
        else:
            assert "agree_ceiling" not in values
    assert len(windows) == 3
    last, prev_window, carried_total = {}, set(), 0
    for k, pairs in enumerate(windows, 1):
        ceiling, by_id = ceiling_of(pairs)
        assert logged[k]["agree_ceiling"] == pytest.approx(round(ceiling, 3), abs=1e-9)
        majority = {t: first_majority(c) for t, c in by_id.items()}
        compared = [t for t, _ in pairs if t in last]
        carried = [t for t in compared if t not in prev_window]  # compared with an older window's majority
        carried_total += len(carried)
        if k == 1:
            assert "route_churn" not in logged[k]
        else:
            churn = sum(1 for t in compared if majority[t] != last[t]) / len(compared)
            assert logged[k]["route_churn"] == pytest.approx(round(churn, 3), abs=1e-9)
        last.update(majority)
        prev_window = set(majority)
    assert carried_total > 0, "the test needs ids that skip a window"


@pytest.mark.parametrize("refit", [True, False])
def test_boundary_freezes_the_refit_windows_majority(refit):
    layer = make_layer(refit=refit)
    window = []
    for u in range(BOUNDARY):
        pairs = train_step(layer, u)
        if u >= BOUNDARY - REFIT:
            window += pairs
    layer.set_num_updates(BOUNDARY)  # the freeze
    router = layer.distill_router
    assert router.is_frozen
    own = router.own_table().tolist()
    ceiling, by_id = ceiling_of(window)
    expected, own_wins_tie, unseen = [], 0, 0
    for t in range(V):
        c = by_id.get(t)
        if not c:
            expected.append(own[t])  # never seen in the window: the distilled router's choice
            unseen += t not in (PAD, 0, 2, 3)
            continue
        top = max(c.values())
        expected.append(own[t] if c.get(own[t], 0) == top else first_majority(c))
        own_wins_tie += c.get(own[t], 0) == top and own[t] != first_majority(c)
    assert own_wins_tie > 0 and unseen > 0, "the test needs ties won by the router's own choice and unseen ids"
    table = router.choice_table()[0].tolist()
    assert table == (expected if refit else own)
    # the routing after the boundary is the table
    h, tokens = step_inputs(99)
    layer.set_num_updates(BOUNDARY + 1)
    routed = layer.assignment(h, tokens).reshape(-1).tolist()
    assert routed == [table[t] for t in tokens.reshape(-1).tolist()]
    # the hand-over statistics, kept in the state dict
    stats = layer.counts.handover_dict()
    n = len(window)
    agree_majority = sum(1 for t, _ in window if table[t] == expected[t]) / n
    agree_backbone = sum(1 for t, e in window if table[t] == e) / n
    assert stats["tokens"] == n and stats["refit_updates"] == REFIT
    assert stats["ceiling"] == pytest.approx(ceiling, rel=1e-12)
    assert stats["agree_majority"] == pytest.approx(agree_majority, rel=1e-12)
    assert stats["agree_backbone"] == pytest.approx(agree_backbone, rel=1e-12)
    if refit:
        assert stats["agree_majority"] == 1.0 and stats["agree_backbone"] == pytest.approx(ceiling, rel=1e-12)
    assert torch.equal(layer.state_dict()["counts.handover"], layer.counts.handover)


def test_refit_table_survives_save_and_load_and_unfreezes_below_the_boundary():
    layer = make_layer()
    for u in range(BOUNDARY):
        train_step(layer, u)
    layer.set_num_updates(BOUNDARY)
    table = layer.distill_router.choice_table()[0].clone()
    assert not torch.equal(table, layer.distill_router.own_table()), "the test needs a refit that changes ids"
    fresh = make_layer()
    fresh.load_state_dict(layer.state_dict())
    fresh.set_num_updates(BOUNDARY + 3)
    assert torch.equal(fresh.distill_router.choice_table()[0], table)
    assert torch.equal(fresh.counts.refit_counts, layer.counts.refit_counts)
    fresh.set_num_updates(2)  # a reset below the boundary drops the frozen table
    assert not fresh.distill_router.is_frozen and fresh.distill_router.refit_choice.lt(0).all()


def test_a_checkpoint_without_counts_loads():
    layer = make_layer()
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("counts.") and "refit_choice" not in k}
    fresh = make_layer()
    fresh.load_state_dict(state)
    assert fresh.counts.window_counts.sum() == 0 and fresh.distill_router.refit_choice.lt(0).all()


def test_dummy_batches_are_not_counted():
    layer = make_layer()
    layer.set_num_updates(0)
    h, tokens = step_inputs(0)
    with not_counted():
        layer(h, tokens)
    assert layer.counts.window_counts.sum() == 0
    layer(h, tokens)
    assert layer.counts.window_counts.sum() == tokens.ne(PAD).sum()


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_refit_needs_a_token_id_router(kind):
    with pytest.raises(ValueError, match="--distill-refit.*--distill-router wordemb"):
        make_layer(distill_router=kind)


def test_half_precision_keeps_the_hand_over_exact():
    layer = make_layer()
    for u in range(BOUNDARY):
        train_step(layer, u)
    layer.set_num_updates(BOUNDARY)
    before = layer.counts.handover.clone()
    layer.half()
    assert layer.counts.handover.dtype == torch.float64 and torch.equal(layer.counts.handover, before)
    assert layer.state_dict()["counts.handover"].dtype == torch.float64
