"""Expert networks: each expert is a stack of residual FFN sublayers."""

from typing import Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils

from .expert_threads import num_workers, run_experts


class FFNSublayer(nn.Module):
    """``x + W2 act(W1 LN(x))``, with ``W2`` initialised to zero (as the paper's code)."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str = "relu"):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        nn.init.zeros_(self.fc2.weight)
        self.activation_fn: Callable = utils.get_activation_fn(activation_fn)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone, ``W2 act(W1 LN(x))``: ``(T, d)`` -> ``(T, d)``."""
        return self.fc2(self.activation_fn(self.fc1(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(T, d)`` -> ``(T, d)``."""
        return x + self.residual(x)


class Expert(nn.Sequential):
    """``num_sublayers`` stacked :class:`FFNSublayer` s."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_sublayers: int, activation_fn: str = "relu"):
        super().__init__(*[FFNSublayer(embed_dim, ffn_dim, activation_fn) for _ in range(num_sublayers)])

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``Expert(x) - x`` as the sum of the sublayers' updates (no cancellation): ``(T, d)`` -> ``(T, d)``."""
        sublayers = iter(self)
        r = next(sublayers).residual(x)
        total = r
        for sublayer in sublayers:
            x = x + r
            r = sublayer.residual(x)
            total = total + r
        return total


class Experts(nn.ModuleList):
    """The experts held by this process.

    Each expert is its own module (``experts.<i>.<sublayer>.fc1.weight``), so its
    gradient is its own buffer: no full-size gradient per expert from slicing a
    stacked weight. Every parameter carries ``expert = True`` so that fairseq's
    ``legacy_ddp`` does not all-reduce it and grad clipping treats it as
    unshared.
    """

    def __init__(
        self,
        num_experts: int,
        embed_dim: int,
        ffn_dim: int,
        num_sublayers: int,
        activation_fn: str = "relu",
    ):
        super().__init__(
            [Expert(embed_dim, ffn_dim, num_sublayers, activation_fn) for _ in range(num_experts)]
        )
        for p in self.parameters():
            p.expert = True

    def forward(self, sorted_features: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Run each expert on its contiguous segment of tokens.

        On a CPU with several intra-op threads the experts run side by side
        (see :mod:`.expert_threads`), else one after the other.

        Args:
            sorted_features: ``(T, d)`` tokens sorted by expert.
            counts: ``len(self)`` segment lengths (python ints), summing to ``T``.
        Returns:
            ``(T, d)``: each expert's output minus its input (the residual
            update ``FFN_i(h)`` that the gate scales), in the same order.
        """
        chunks = torch.split(sorted_features, list(counts))
        busy = [i for i, chunk in enumerate(chunks) if chunk.shape[0] > 0]
        if not busy:
            # no token here (T = 0): return the empty input itself, not a new tensor, so
            # the result stays in the autograd graph and every process runs the same
            # all-to-alls in the backward (a detached result would leave the others waiting)
            return sorted_features
        workers = num_workers(sorted_features, len(busy))
        if workers > 1:
            return run_experts(self, chunks, busy, sorted_features, workers)
        outputs: List[torch.Tensor] = [self[i].update(chunks[i]) for i in busy]
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat(outputs, dim=0)
