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
    constructor sorts the tokens and counts them per expert on the device
    (:attr:`load`); once the (global) counts are on the host, :meth:`keep`
    fixes the tokens each expert runs.

    Attributes:
        order: ``(T_kept,)`` token indices sorted by expert (stable, so within
            an expert tokens keep their original order); skipped tokens (and,
            after :meth:`keep`, tokens over capacity) are left out.
        load: ``(N,)`` long, tokens per expert before capacity (skipped ones
            not counted), on the device.
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
        ones = torch.ones_like(expert_index)
        # index_add, not bincount: bincount's output size needs a host sync on CUDA
        self.load = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_index.device).index_add_(
            0, expert_index, ones
        )[:num_experts]
        self._expert_index = expert_index

    def keep(self, kept: List[int], capacity: Optional[int] = None) -> None:
        """Keep ``kept[i]`` tokens of expert ``i`` (python ints: :attr:`load` capped at ``capacity``)."""
        num_kept = sum(kept)
        if capacity is not None and num_kept < self.order.numel():
            # rank of each sorted token inside its expert's segment; the first `capacity` stay
            sorted_experts = self._expert_index.index_select(0, self.order)
            starts = torch.cumsum(self.load, 0) - self.load
            starts = torch.cat([starts, starts.new_zeros(1)])  # the padding bucket
            rank = torch.arange(self.order.numel(), device=self.order.device) - starts[sorted_experts]
            dropped = (rank >= capacity) | (sorted_experts == self.num_experts)
            # kept tokens first, still sorted by expert (no boolean indexing: it syncs)
            self.order = self.order.index_select(0, torch.argsort(dropped.to(torch.uint8), stable=True))
        self.order = self.order[:num_kept]
        self._expert_index = None

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """``(T, d)`` -> ``(T_kept, d)`` sorted by expert."""
        return features.index_select(0, self.order)

    def combine(self, features: torch.Tensor, sorted_updates: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        """``features + gate * update`` in token order, in one ``index_add``.

        Args:
            features: ``(T, d)`` the layer's input (the residual stream).
            sorted_updates: ``(T_kept, d)`` expert updates, sorted by expert.
            gate: ``(T,)`` per-token gate in token order, or None (gate 1).
        Returns:
            ``(T, d)``; tokens no expert processed keep ``features`` unchanged.
        """
        if gate is not None:
            sorted_updates = gate.index_select(0, self.order).to(sorted_updates.dtype).unsqueeze(1) * sorted_updates
        # under autocast the experts' output may be half precision while the residual stream is not
        return features.index_add(0, self.order, sorted_updates.to(features.dtype))


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """Tokens per expert allowed by ``--capacity-factor`` (None: unlimited)."""
    if capacity_factor is None:
        return None
    return max(1, int(math.ceil(capacity_factor * num_tokens / num_experts)))

