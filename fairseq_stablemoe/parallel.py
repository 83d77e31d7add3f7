"""Expert parallelism over fairseq's data-parallel processes.

With ``W`` processes and ``N`` experts, process ``r`` owns the experts
``r * N/W ... (r + 1) * N/W - 1``. Tokens travel to their expert's process
with ``all_to_all`` (fairseq's autograd ``All2All``, uneven splits exchanged
first) and come back in their original order. As fairseq's BASE layers, the
expert-parallel group is the default (global) process group.

Gradients: expert parameters carry ``expert = True`` so ``--ddp-backend
legacy_ddp`` does not all-reduce them. Their gradient on the owning process
already sums the contributions of every process's tokens, but fairseq then
multiplies every gradient by ``world_size / sample_size`` (it assumes DDP
averaged them), so :func:`scale_expert_gradients` divides expert gradients by
``W`` in a backward hook: the result equals the single-process gradient.
"""

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist
from fairseq.modules.base_layer import All2All


def world_size_and_rank() -> Tuple[int, int]:
    """``(W, rank)`` of the default process group, ``(1, 0)`` outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this process holds."""

    world_size: int
    rank: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world_size

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls, num_experts: int) -> "ExpertShard":
        """The shard of this process in the running job (1 process if none)."""
        world_size, rank = world_size_and_rank()
        if num_experts % world_size != 0:
            raise ValueError(
                f"--num-experts {num_experts} is not a multiple of the {world_size} data-parallel "
                f"processes: every process holds num_experts / world_size experts. Use a multiple "
                f"of {world_size} experts or a number of processes that divides {num_experts}"
            )
        return cls(world_size, rank, num_experts)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place, no autograd); identity on 1 process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def scale_expert_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Divide the gradients of expert parameters by ``world_size`` (see module doc)."""
    if world_size <= 1:
        return
    scale = 1.0 / world_size
    for p in params:
        p.register_hook(lambda grad: grad * scale)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def exchange(
    sorted_features: torch.Tensor,
    counts: List[int],
    shard: ExpertShard,
    run_local_experts: Callable[[torch.Tensor, List[int]], torch.Tensor],
) -> torch.Tensor:
    """Send tokens to their experts' processes, run them there, and bring them back.

    Args:
        sorted_features: ``(T_kept, d)`` this process's tokens sorted by global expert id.
        counts: ``N`` tokens per global expert (python ints).
        shard: this process's experts.
        run_local_experts: ``(tokens sorted by local expert, per-local-expert counts)``
            -> outputs in the same order.
    Returns:
        ``(T_kept, d)`` outputs, in the order of ``sorted_features``.
    """
    W, L = shard.world_size, shard.num_local
    device = sorted_features.device
    send_counts = torch.tensor(counts, dtype=torch.long, device=device)
    # tell every process how many tokens of each of its experts to expect from us
    recv_counts = All2All.apply(send_counts, [L] * W, [L] * W).view(W, L)
    input_splits = send_counts.view(W, L).sum(1).tolist()
    output_splits = recv_counts.sum(1).tolist()
    received = All2All.apply(sorted_features, input_splits, output_splits)
    # received: grouped by source process, then local expert; regroup by local expert
    local_expert = torch.arange(L, device=device).repeat(W)
    token_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1))
    perm = torch.argsort(token_expert, stable=True)
    out = run_local_experts(received.index_select(0, perm), recv_counts.sum(0).tolist())
    out = out.index_select(0, _inverse(perm))
    return All2All.apply(out, output_splits, input_splits)


def shard_slice(shard: ExpertShard) -> Tuple[int, int]:
    """Global expert ids ``[start, stop)`` held by ``shard``."""
    return shard.first_expert, shard.first_expert + shard.num_local
