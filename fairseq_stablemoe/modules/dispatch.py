"""Sort-based token dispatch: one argsort, one gather in, one ``index_add`` out.

No one-hot dispatch tensors and no per-token Python work: tokens are ordered
by expert with a stable sort, every expert reads a contiguous segment, and the
results are added back onto the residual stream at their tokens' positions.
"""

import math
from typing import List, Optional

import torch


class Dispatch:
    """The plan for sending ``T`` tokens to ``N`` experts.

    Made in two steps so that the layer needs a single host sync: the
    constructor sorts the tokens on the device; once the (global) counts are
    on the host, :meth:`keep` fixes the tokens each expert runs. The counts
    themselves are the caller's (:meth:`MoELayer._count`).

    Attributes:
        order: ``(T_kept,)`` token indices sorted by expert (stable, so within
            an expert tokens keep their original order); skipped tokens (and,
            after :meth:`keep`, tokens over capacity) are left out.
    """

    def __init__(self, expert_index: torch.Tensor, num_experts: int, skip: Optional[torch.Tensor] = None):
        """Sort the tokens by expert.

        Args:
            expert_index: ``(T,)`` long, the expert of each token.
            num_experts: ``N``.
            skip: ``(T,)`` bool, tokens that go to no expert (padding), or None.
        """
        if skip is not None:
            # padding goes to an extra bucket N, sorted last, that no expert reads
            expert_index = expert_index.masked_fill(skip, num_experts)
        self.num_experts = num_experts
        self.order = torch.argsort(expert_index, stable=True)
        self._expert_index = expert_index

    def keep(self, kept: List[int], sent: List[int]) -> None:
        """Keep ``kept[i]`` of the ``sent[i]`` tokens of expert ``i`` (python ints, ``sent`` not counting skipped ones).

        Where some expert keeps fewer tokens than it got (capacity), which
        ones stay is drawn uniformly at random (torch's generator of the
        device), whatever their position in the sequence. Kept tokens stay
        sorted by expert, and by position within an expert.
        """
        num_kept = sum(kept)
        if list(kept) != list(sent):
            device = self.order.device
            num_tokens = self._expert_index.numel()
            # each expert's tokens in a random order: a random permutation, then a stable sort by expert
            perm = torch.randperm(num_tokens, device=device)
            shuffled = perm.index_select(0, torch.argsort(self._expert_index.index_select(0, perm), stable=True))
            experts = self._expert_index.index_select(0, shuffled)
            starts = [0]
            for n in sent:
                starts.append(starts[-1] + n)
            starts[-1] = 0  # the padding bucket
            rank = torch.arange(num_tokens, device=device) - torch.tensor(starts).to(device, non_blocking=True)[experts]
            quota = torch.tensor(list(kept) + [0], dtype=torch.long).to(device, non_blocking=True)
            dropped = torch.empty_like(rank, dtype=torch.bool).index_put_((shuffled,), rank >= quota[experts])
            # kept tokens first, still sorted by expert and position (no boolean indexing: it syncs)
            self.order = self.order.index_select(
                0, torch.argsort(dropped.index_select(0, self.order).to(torch.uint8), stable=True)
            )
        # padding (the last bucket of the sort) and dropped tokens are past the first num_kept
        if num_kept != self.order.numel():
            self.order = self.order[:num_kept]
        self._expert_index = None

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """``(T, d)`` -> ``(T_kept, d)`` sorted by expert."""
        return features.index_select(0, self.order)

    def combine(
        self, features: torch.Tensor, sorted_updates: torch.Tensor, gate: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``features + gate * update`` in token order, in one ``index_add``.

        Args:
            features: ``(T, d)`` the layer's input (the residual stream).
            sorted_updates: ``(T_kept, d)`` expert updates, sorted by expert.
            gate: ``(T, 1)`` per-token gate in token order, or None (gate 1).
        Returns:
            ``(T, d)``; tokens no expert processed keep ``features`` unchanged.
        """
        if gate is not None:
            sorted_updates = gate.index_select(0, self.order).to(sorted_updates.dtype) * sorted_updates
        # under autocast the experts' output may be half precision while the residual stream is not
        return features.index_add(0, self.order, sorted_updates.to(features.dtype))


def capacity_split(counts: List[List[int]], capacity_factor: Optional[float]) -> List[List[int]]:
    """Tokens each process keeps for each expert under ``--capacity-factor`` (python ints).

    Every expert runs at most ``C = max(1, ceil(capacity_factor * n / N))``
    tokens, ``n`` the non-pad tokens of the global batch (all processes). An
    expert that gets more shares ``C`` among the senders in proportion to
    what they sent (largest remainders, ties to the lower rank), so every
    process computes the same split from the same matrix.

    Args:
        counts: ``(W, N)`` tokens sent by each process to each expert.
        capacity_factor: None: no limit (``counts`` itself).
    Returns:
        ``(W, N)`` kept tokens, each at most its count.
    """
    kept = [list(row) for row in counts]
    if capacity_factor is None:
        return kept
    num_experts = len(counts[0])
    capacity = max(1, int(math.ceil(capacity_factor * sum(map(sum, counts)) / num_experts)))
    for i in range(num_experts):
        column = [row[i] for row in counts]
        total = sum(column)
        if total <= capacity:
            continue
        share = [c * capacity // total for c in column]
        left = capacity - sum(share)
        for w in sorted(range(len(column)), key=lambda w: (-(column[w] * capacity % total), w))[:left]:
            share[w] += 1
        for w, s in enumerate(share):
            kept[w][i] = s
    return kept
