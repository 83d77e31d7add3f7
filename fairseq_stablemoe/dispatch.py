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

    Attributes:
        order: ``(T_kept,)`` token indices sorted by expert (stable, so within
            an expert tokens keep their original order); skipped tokens and
            tokens over capacity are left out.
        counts: python list of ``N`` segment lengths (kept tokens per expert).
    """

    def __init__(
        self,
        expert_index: torch.Tensor,
        num_experts: int,
        capacity: Optional[int] = None,
        skip: Optional[torch.Tensor] = None,
    ):
        """Plan the dispatch.

        Args:
            expert_index: ``(T,)`` long, the expert of each token.
            num_experts: ``N``.
            capacity: max tokens per expert (``--capacity-factor``), or None.
            skip: ``(T,)`` bool, tokens that go to no expert (padding), or None.
        """
        if skip is not None:
            # padding goes to an extra bucket N that no expert reads
            expert_index = expert_index.masked_fill(skip, num_experts)
        order = torch.argsort(expert_index, stable=True)
        counts = torch.bincount(expert_index, minlength=num_experts + 1)
        sorted_experts = expert_index.index_select(0, order)
        keep_sorted = sorted_experts < num_experts
        if capacity is not None:
            # rank of each sorted token inside its expert's segment
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(expert_index.numel(), device=order.device) - starts[sorted_experts]
            keep_sorted = keep_sorted & (rank < capacity)
            counts = counts.clamp(max=capacity)
        counts = counts[:num_experts]
        if skip is not None or capacity is not None:
            order = order[keep_sorted]
        self.order = order
        self.counts: List[int] = counts.tolist()

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
        return features.index_add(0, self.order, sorted_updates)


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """Tokens per expert allowed by ``--capacity-factor`` (None: unlimited)."""
    if capacity_factor is None:
        return None
    return max(1, int(math.ceil(capacity_factor * num_tokens / num_experts)))

