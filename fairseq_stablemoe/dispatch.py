"""Sort-based token dispatch: one argsort, one gather in, one gather out.

No one-hot dispatch tensors and no per-token Python work: tokens are ordered
by expert with a stable sort, every expert reads a contiguous segment, and the
inverse permutation brings the results back.
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
        kept: ``(T,)`` bool, False for tokens that no expert processes
            (padding, or over capacity), or None when every token is kept.
        num_tokens: ``T``.
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
        self.num_tokens = expert_index.numel()
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
            rank = torch.arange(self.num_tokens, device=order.device) - starts[sorted_experts]
            keep_sorted = keep_sorted & (rank < capacity)
            counts = counts.clamp(max=capacity)
        counts = counts[:num_experts]
        self.kept: Optional[torch.Tensor] = None
        if skip is not None or capacity is not None:
            self.kept = torch.zeros(self.num_tokens, dtype=torch.bool, device=order.device)
            self.kept[order[keep_sorted]] = True
            order = order[keep_sorted]
        self.order = order
        self.counts: List[int] = counts.tolist()

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """``(T, d)`` -> ``(T_kept, d)`` sorted by expert."""
        return features.index_select(0, self.order)

    def scatter(self, sorted_values: torch.Tensor) -> torch.Tensor:
        """``(T_kept, d)`` sorted by expert -> ``(T, d)`` in token order, zeros for dropped tokens."""
        if self.kept is None:
            inverse = torch.empty_like(self.order)
            inverse[self.order] = torch.arange(self.num_tokens, device=self.order.device)
            return sorted_values.index_select(0, inverse)
        out = sorted_values.new_zeros((self.num_tokens,) + tuple(sorted_values.shape[1:]))
        return out.index_copy(0, self.order, sorted_values)


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """Tokens per expert allowed by ``--capacity-factor`` (None: unlimited)."""
    if capacity_factor is None:
        return None
    return max(1, int(math.ceil(capacity_factor * num_tokens / num_experts)))

