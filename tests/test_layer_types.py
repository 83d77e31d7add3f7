"""Baseline routing types (switch, base, hash) against hand computations."""

import math

import pytest
import torch

from fairseq_stablemoe.modules.baseline_layers import BaseLayer, HashLayer, SwitchLayer, hash_symbols

PAD = 1


def _randomise(layer, seed=0):
    torch.manual_seed(seed)
    for p in layer.experts.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        layer.backbone.expert_centroids.normal_()
    return layer


def _inputs(T=24, d=4, seed=1, pads=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    tokens = torch.randint(2, 30, (T,), generator=g)
    for p in pads:
        tokens[p] = PAD
    return h, tokens


def test_switch_gate_and_load_balancing_loss():
    N = 3
    layer = _randomise(SwitchLayer(4, 6, N, 1, PAD))
    layer.train()
    h, tokens = _inputs(pads=(0, 7))
    out, stats = layer(h, tokens)
    E = layer.backbone.expert_centroids.detach()
    valid = [t for t in range(24) if t not in (0, 7)]
    probs = {t: torch.softmax(h[t] @ E.t(), 0) for t in range(24)}
    choice = {t: int(probs[t].argmax()) for t in range(24)}
    f = [sum(choice[t] == i for t in valid) / len(valid) for i in range(N)]
    P = [sum(float(probs[t][i]) for t in valid) / len(valid) for i in range(N)]
    switch_loss = N * sum(fi * pi for fi, pi in zip(f, P))
    # a sum over tokens: divided by the token count it is the Switch loss
    assert stats["balance_loss"].item() / len(valid) == pytest.approx(switch_loss, rel=1e-5)
    for t in valid:
        a = choice[t]
        y = layer.experts[a](h[t : t + 1])[0] - h[t]
        torch.testing.assert_close(out[t], h[t] + probs[t][a] * y, rtol=1e-5, atol=1e-5)
    # the gate carries the router's gradient
    out.sum().backward()
    assert layer.backbone.expert_centroids.grad.abs().sum() > 0


def test_switch_capacity_drops_overflow_and_counts_it():
    layer = _randomise(SwitchLayer(4, 6, 2, 1, PAD, capacity_factor=0.5))
    layer.train()
    h, tokens = _inputs(T=20)
    out, stats = layer(h, tokens)
    unchanged = sum(torch.equal(out[t], h[t]) for t in range(20))
    assert stats["dropped"].item() == unchanged > 0
    assert sum(stats["load"].tolist()) == 20  # load counts routing decisions


def test_base_balanced_in_training_greedy_at_inference():
    N = 4
    layer = _randomise(BaseLayer(4, 6, N, 1, PAD))
    h, tokens = _inputs(T=26, pads=(3, 9))  # 24 non-pad tokens: 6 per expert
    h[:, 0] += 3.0  # skew the affinities so greedy routing is unbalanced
    layer.train()
    _, stats = layer(h, tokens)
    assert stats["load"].tolist() == [6.0] * N
    assert "balance_loss" not in stats
    layer.eval()
    with torch.no_grad():
        _, stats_eval = layer(h, tokens)
    E = layer.backbone.expert_centroids.detach()
    greedy = torch.zeros(N)
    for t in range(26):
        if t not in (3, 9):
            greedy[int((h[t] @ E.t()).argmax())] += 1
    assert stats_eval["load"].tolist() == greedy.tolist()
    assert greedy.max() > 6, "the example should be unbalanced under greedy routing"


def test_base_assignment_maximises_total_affinity_on_small_case():
    layer = _randomise(BaseLayer(4, 6, 2, 1, PAD), seed=3)
    layer.train()
    h, tokens = _inputs(T=6, seed=4)
    choice = layer.assignment(h, tokens)
    E = layer.backbone.expert_centroids.detach()
    s = h @ E.t()
    got = sum(float(s[t, choice[t]]) for t in range(6))
    # brute force over all balanced assignments (3 tokens per expert)
    import itertools

    best = max(
        sum(float(s[t, 0 if t in group else 1]) for t in range(6)) for group in itertools.combinations(range(6), 3)
    )
    assert got == pytest.approx(best, rel=1e-5)


def test_hash_routes_by_token_string_not_dictionary_order():
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "the", "king", "queen", "crown", "sword"]
    layer = HashLayer(4, 6, 3, 1, PAD, symbols=symbols)
    reordered = symbols[:4] + list(reversed(symbols[4:]))
    other = HashLayer(4, 6, 3, 1, PAD, symbols=reordered)
    for i, sym in enumerate(symbols):
        j = reordered.index(sym)
        assert layer.token_to_expert[i] == other.token_to_expert[j]
    assert len(set(layer.token_to_expert.tolist())) > 1
    # a plain, independent recomputation of the hash
    import hashlib

    want = [int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "little") % 3 for s in symbols]
    assert hash_symbols(symbols, 3).tolist() == want
    # routing follows the map; no gate: output = h + FFN_a(h)
    h = torch.randn(5, 4)
    toks = torch.tensor([4, 5, 6, 7, 8])
    out, stats = layer(h, toks)
    for t in range(5):
        a = int(layer.token_to_expert[toks[t]])
        torch.testing.assert_close(out[t], layer.experts[a](h[t : t + 1])[0], rtol=1e-6, atol=1e-6)
    # saved in the state dict; a dictionary of another size is refused clearly
    assert "token_to_expert" in layer.state_dict()
    small = HashLayer(4, 6, 3, 1, PAD, symbols=symbols[:6])
    with pytest.raises(ValueError, match="dict.txt"):
        small.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("cls", [SwitchLayer, BaseLayer])
def test_all_padding_batch_is_finite(cls):
    layer = _randomise(cls(4, 6, 3, 1, PAD))
    layer.train()
    h = torch.randn(6, 4, requires_grad=True)
    tokens = torch.full((6,), PAD)
    out, stats = layer(h, tokens)
    assert torch.equal(out, h)
    for v in stats.values():
        assert torch.isfinite(v).all()
    assert math.isfinite(float(stats.get("balance_loss", torch.tensor(0.0))))
