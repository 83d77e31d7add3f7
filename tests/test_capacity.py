"""``--capacity-factor``: capacity per expert over the global batch, split among the senders, and
overflow tokens drawn at random (not the latest positions), against direct computations."""

import math
import random

import torch

from fairseq_stablemoe.modules.baseline_layers import HashLayer
from fairseq_stablemoe.modules.dispatch import capacity_split

PAD = 1


def test_split_against_a_direct_computation():
    rng = random.Random(0)
    for _ in range(300):
        W, N = rng.randint(1, 5), rng.randint(1, 6)
        counts = [[rng.choice([0, 0, 1, 3, 7, 20]) for _ in range(N)] for _ in range(W)]
        cf = rng.choice([0.25, 0.5, 1.0, 1.5, 2.0])
        kept = capacity_split(counts, cf)
        n = sum(map(sum, counts))
        C = max(1, math.ceil(cf * n / N))
        for i in range(N):
            col = [counts[w][i] for w in range(W)]
            got = [kept[w][i] for w in range(W)]
            assert sum(got) == min(sum(col), C), (counts, cf, i)
            for w in range(W):
                assert 0 <= got[w] <= col[w]
                if sum(col) > C:  # proportional to what each process sent, to within one token
                    assert abs(got[w] - col[w] * C / sum(col)) < 1
        assert capacity_split(counts, cf) == kept  # deterministic: every process gets the same
    assert capacity_split([[3, 4], [5, 6]], None) == [[3, 4], [5, 6]]
    # a worked example: 40 tokens, 2 experts, factor 0.5 -> C = 10 per expert
    # expert 0 gets 6 + 24 = 30 -> 10 * 6/30 = 2, 10 * 24/30 = 8; expert 1 gets 10 -> all kept
    assert capacity_split([[6, 4], [24, 6]], 0.5) == [[2, 4], [8, 6]]


def hash_layer(capacity_factor, num_experts=2):
    torch.manual_seed(0)
    symbols = [f"s{i}" for i in range(40)]
    layer = HashLayer(4, 8, num_experts, 1, PAD, symbols=symbols, capacity_factor=capacity_factor)
    for p in layer.experts.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    return layer


def test_overflow_is_random_not_positional():
    layer = hash_layer(0.5)
    e0 = [t for t in range(2, 40) if layer.token_to_expert[t] == 0]
    T, B = 12, 2
    tokens = torch.tensor([e0[i % len(e0)] for i in range(T * B)]).view(T, B)  # all to expert 0
    tokens[-2:, 1] = PAD  # 22 non-pad tokens: C = ceil(0.5 * 22 / 2) = 6
    h = torch.randn(T, B, 4)
    ref = layer.experts[0](h.view(-1, 4)).view(T, B, 4)
    dropped_at = torch.zeros(T, B)
    for seed in range(200):
        torch.manual_seed(seed)
        out, stats = layer(h, tokens)
        same = (out == h).all(-1)
        kept = ~same & tokens.ne(PAD)
        assert int(kept.sum()) == 6 and stats["dropped"].item() == 16
        torch.testing.assert_close(out[kept], ref[kept])  # kept tokens: the expert, exactly
        assert torch.equal(out[tokens.eq(PAD)], h[tokens.eq(PAD)])
        dropped_at += (same & tokens.ne(PAD)).float()
    share = dropped_at[tokens.ne(PAD)] / 200
    # every non-pad position is dropped about 16/22 of the time, the first ones as often as the last
    assert share.min() > 0.5 and share.max() < 0.92, share
    assert abs(share[:4].mean() - share[-4:].mean()) < 0.15


def test_no_capacity_keeps_every_token():
    layer = hash_layer(None)
    tokens = torch.randint(2, 40, (10, 3))
    h = torch.randn(10, 3, 4)
    out, stats = layer(h, tokens)
    assert stats["dropped"].item() == 0
    assert not (out == h).all(-1).any()
