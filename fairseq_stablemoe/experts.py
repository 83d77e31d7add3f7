"""Expert networks: each expert is a stack of residual FFN sublayers."""

from typing import Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils

from .expert_threads import num_workers, run_experts


def expert_seed(seed: int, expert: int) -> int:
    """The seed of global expert ``expert``'s initialisation in a layer seeded ``seed``."""
    return (seed * 1_000_003 + expert) % (2**63 - 1)


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
    ``legacy_ddp`` does not all-reduce it, and ``expert_replicas`` (how many
    processes hold a copy) for the global gradient norm (:mod:`.training_hooks`).

    Initialisation does not depend on the process layout: local expert ``i`` is
    global expert ``g = first_expert + i`` and is initialised from its own
    generator, seeded with ``(seed, g)``, so expert ``g`` starts the same on 1
    process or on any rank of ``W``, and the caller's random stream is left as
    it was (the rest of the model does not depend on ``W`` either).
    """

    def __init__(
        self,
        num_experts: int,
        embed_dim: int,
        ffn_dim: int,
        num_sublayers: int,
        activation_fn: str = "relu",
        first_expert: int = 0,
        seed: int = 0,
        replicas: int = 1,
    ):
        experts = []
        for g in range(first_expert, first_expert + num_experts):
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only (torch.manual_seed would also reseed every GPU's)
                torch.default_generator.manual_seed(expert_seed(seed, g))
                experts.append(Expert(embed_dim, ffn_dim, num_sublayers, activation_fn))
        super().__init__(experts)
        for p in self.parameters():
            p.expert = True
            p.expert_replicas = replicas

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
