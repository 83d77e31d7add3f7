"""router.py: the frozen wordemb router's token -> expert table and the chosen-column affinity.

References are per-token loops over the router's own weights (python floats, first maximum on
ties), independent of the vectorised code.
"""

import math

import pytest
import torch

from fairseq_stablemoe.modules.moe_layer import reading_moe_stats
from fairseq_stablemoe.modules.router import chosen_affinity, finite_affinities
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

PAD, VOCAB, N, D, T = 1, 23, 5, 6, 40


def make_layer(seed=0):
    torch.manual_seed(seed)
    layer = StableMoELayer(
        embed_dim=8,
        ffn_dim=16,
        num_experts=N,
        num_sublayers=1,
        vocab_size=VOCAB,
        padding_idx=PAD,
        distill_dim=D,
        two_stage_updates=3,
    )
    with torch.no_grad():
        layer.distill_router.centroids.normal_()
        layer.backbone.expert_centroids.normal_()
    return layer


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (T,), generator=g)
    tokens[[3, 17]] = PAD
    return torch.randn(T, 8, generator=g), tokens


def loop_table(emb, centroids):
    """Every id's expert by loops: affinities, non-finite ones replaced by the table's smallest finite
    affinity (0 if none), first maximum; and every id's number of non-finite affinities."""
    rows = [[float(emb[v].double() @ centroids[i].double()) for i in range(N)] for v in range(VOCAB)]
    finite = [x for row in rows for x in row if math.isfinite(x)]
    fill = min(finite) if finite else 0.0
    choice, bad = [], []
    for row in rows:
        fixed = [x if math.isfinite(x) else fill for x in row]
        choice.append(max(range(N), key=lambda i: fixed[i]))  # max keeps the first of equal keys
        bad.append(sum(not math.isfinite(x) for x in row))
    return choice, bad


def routed(layer, h, tokens, training):
    """(choice, stats) of a forward in stage 2 training or at inference (with its statistics)."""
    layer.train(training)
    choice = layer.assignment(h, tokens, training_routing=training)
    with torch.no_grad(), reading_moe_stats():
        _, stats = layer(h, tokens)
    return choice, stats


@pytest.mark.parametrize("training", [True, False], ids=["stage2", "inference"])
def test_frozen_wordemb_routes_by_the_table_of_a_per_token_loop(training):
    layer = make_layer()
    router = layer.distill_router
    emb, centroids = router.embed_tokens.weight.detach().clone(), router.centroids.detach().clone()
    layer.set_num_updates(3)  # the boundary: frozen
    assert router.routes_by_table
    h, tokens = inputs()
    choice, stats = routed(layer, h, tokens, training)
    table, _ = loop_table(emb, centroids)
    want = torch.tensor([table[t] for t in tokens.tolist()])
    assert torch.equal(choice, want)
    valid = tokens.ne(PAD)
    assert stats["load"].tolist() == [float((want[valid] == i).sum()) for i in range(N)]
    assert stats["stage"].item() == 2.0 and stats["nonfinite"].item() == 0
    assert len(set(want.tolist())) > 1


def test_table_is_the_routing_of_stage2_and_inference_alike():
    layer = make_layer()
    layer.set_num_updates(5)
    h, tokens = inputs()
    stage2, _ = routed(layer, h, tokens, True)
    inference, _ = routed(layer, h, tokens, False)
    layer.eval()
    with torch.no_grad():
        plain = layer.assignment(h, tokens, training_routing=False)
    assert torch.equal(stage2, inference) and torch.equal(inference, plain)
    assert torch.equal(inference, layer.distill_router.choice_table()[0][tokens])


def test_table_follows_the_routers_weights():
    layer = make_layer()
    router = layer.distill_router
    layer.set_num_updates(3)
    h, tokens = inputs()
    first, _ = routed(layer, h, tokens, False)
    # changed in place: the snapshot that routes (its version counter)
    with torch.no_grad():
        router.snapshot_centroids.mul_(-1.0)
        router.snapshot_embed_tokens_weight[5].fill_(float("nan"))
    emb, centroids = router.snapshot_embed_tokens_weight.clone(), router.snapshot_centroids.clone()
    second, stats = routed(layer, h, tokens, False)
    table, bad = loop_table(emb, centroids)
    assert 5 in tokens.tolist() and bad[5] == N
    assert torch.equal(second, torch.tensor([table[t] for t in tokens.tolist()]))
    assert not torch.equal(first, second)
    backbone = (h @ layer.backbone.expert_centroids.detach().t()).isfinite().logical_not().sum()
    assert stats["nonfinite"].item() == sum(bad[t] for t in tokens.tolist()) + backbone.item()
    # loaded weights (copied into the parameters in place; the frozen flag re-takes the snapshot)
    other = make_layer(seed=7)
    other.set_num_updates(3)
    layer.load_state_dict(other.state_dict())
    third, _ = routed(layer, h, tokens, False)
    assert torch.equal(third, routed(other, h, tokens, False)[0])
    table, _ = loop_table(other.distill_router.embed_tokens.weight.detach(), other.distill_router.centroids.detach())
    assert torch.equal(third, torch.tensor([table[t] for t in tokens.tolist()]))
    # the parameters changed in place and the router frozen again (a new snapshot)
    with torch.no_grad():
        router.centroids.copy_(centroids)
        router.embed_tokens.weight.copy_(emb)
    router.freeze()
    assert torch.equal(routed(layer, h, tokens, False)[0], second)
    # unfrozen (a resume before the boundary): the live affinities route again, no table
    layer.set_num_updates(0)
    assert not router.routes_by_table
    with torch.no_grad():
        router.embed_tokens.weight[5] = 0.0
        router.centroids.mul_(2.0)
    live = (router.embed_tokens.weight[tokens] @ router.centroids.t()).argmax(1)
    assert torch.equal(routed(layer, h, tokens, False)[0], live)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_contextual_routers_keep_their_affinities(kind):
    torch.manual_seed(0)
    layer = StableMoELayer(
        8, 16, N, 1, vocab_size=VOCAB, padding_idx=PAD, distill_dim=D, two_stage_updates=1, distill_router=kind
    )
    layer.set_num_updates(1)
    assert layer.distill_router.is_frozen and not layer.distill_router.routes_by_table
    layer.eval()
    h, tokens = inputs()
    with torch.no_grad():
        want = layer.distill_router(tokens).argmax(1)
        assert torch.equal(layer.assignment(h, tokens, training_routing=False), want)


@pytest.mark.parametrize("bad", ["none", "nan", "posinf", "neginf", "all"])
def test_chosen_affinity_is_finite_affinities_at_the_chosen_column(bad):
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(30, N, generator=g)
    if bad == "all":
        raw.fill_(float("nan"))
    elif bad != "none":
        value = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf")}[bad]
        raw[::3, 1] = value
        raw[4] = value
    choice = torch.randint(0, N, (30,), generator=g)
    choice[::3] = 1
    raw.requires_grad_()
    want, _ = finite_affinities(raw)
    want = want.gather(1, choice.unsqueeze(1))
    got = chosen_affinity(raw, choice)
    assert got.shape == (30, 1) and torch.equal(got, want) and torch.isfinite(got).all()
    weights = torch.randn(30, 1, generator=g)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), raw)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), raw)
    assert torch.equal(got_grad, want_grad)
    with torch.no_grad():
        assert torch.equal(chosen_affinity(raw, choice), want)
