"""Expert parallelism over fairseq's data-parallel processes.

Layouts (``W`` processes, ``N`` experts), as in fairseq's BASE layers the
expert-parallel group is the default (global) process group:

* ``N`` a multiple of ``W``: process ``r`` holds the ``L = N / W`` experts
  ``r * L ... r * L + L - 1``.
* ``W`` a multiple of ``N`` (expert replicas, as fairseq's moe branch, Tutel
  and DeepSpeed): every expert lives on ``R = W / N`` processes, process ``r``
  holds expert ``r // R``. A process's tokens go to the replicas in its own
  *replica group* (the processes with the same ``r % R``), so every replica
  serves ``N`` processes' tokens; the replicas' gradients are then summed
  among themselves (:func:`reduce_replica_gradients`), never with another
  expert's.

Tokens travel to their expert's process with ``all_to_all`` (fairseq's
autograd ``All2All``) and come back in their original order. The split sizes
come from one ``all_gather`` of every process's per-expert counts
(:func:`gather_counts`), which also gives the global load for the balance
losses and the logged statistics: one collective and one host sync per
forward for all of it.

Gradients: expert parameters carry ``expert = True`` so ``--ddp-backend
legacy_ddp`` does not all-reduce them. Their gradient on the owning process
sums the contributions of every token it served, but fairseq then multiplies
every gradient by ``W / sample_size`` (it assumes DDP averaged them), so
:func:`scale_expert_gradients` divides expert gradients by ``W`` in a backward
hook: after the replicas' sum the result equals the single-process gradient.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from fairseq.modules.base_layer import All2All


def world_size_and_rank() -> Tuple[int, int]:
    """``(W, rank)`` of the default process group, ``(1, 0)`` outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def layout_problem(num_experts: int, world_size: int) -> str:
    """Why ``N`` experts cannot be laid out on ``W`` processes ("" if they can)."""
    if num_experts < 1 or num_experts % world_size == 0 or world_size % num_experts == 0:
        return ""
    fits = [n for n in range(1, 4 * max(num_experts, world_size) + 1) if n % world_size == 0 or world_size % n == 0]
    nearest = sorted(fits, key=lambda n: (abs(n - num_experts), n))[:3]
    return (
        f"--num-experts {num_experts} does not fit {world_size} data-parallel processes: the experts must be a "
        f"multiple of the processes (each holds N / W experts) or a divisor of them (each expert has W / N "
        f"replicas). Use --num-experts {' or '.join(map(str, sorted(nearest)))}, or a number of processes that "
        f"divides or is a multiple of {num_experts}"
    )


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this process holds, and where every other expert lives."""

    world_size: int
    rank: int
    num_experts: int

    def __post_init__(self):
        problem = layout_problem(self.num_experts, self.world_size)
        if problem:
            raise ValueError(problem)

    @property
    def replicas(self) -> int:
        """``R``: processes holding each expert (1 unless ``W > N``)."""
        return max(1, self.world_size // self.num_experts)

    @property
    def num_local(self) -> int:
        """``L``: experts held by each process."""
        return max(1, self.num_experts // self.world_size)

    @property
    def first_expert(self) -> int:
        """Global id of this process's first expert (``experts.<i>`` is ``first_expert + i``)."""
        return self.first_expert_of(self.rank)

    def first_expert_of(self, rank: int) -> int:
        return (rank // self.replicas) * self.num_local

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def replica_ranks(self) -> List[int]:
        """The processes holding the same experts as this one (itself included)."""
        start = (self.rank // self.replicas) * self.replicas
        return list(range(start, start + self.replicas))

    def serves(self, sender: int, receiver: int) -> bool:
        """Whether ``receiver`` runs ``sender``'s tokens for ``receiver``'s experts (same replica group)."""
        return sender % self.replicas == receiver % self.replicas

    @classmethod
    def current(cls, num_experts: int) -> "ExpertShard":
        """The shard of this process in the running job (1 process if none)."""
        world_size, rank = world_size_and_rank()
        return cls(world_size, rank, num_experts)


class Splits:
    """Every size the all-to-all exchange needs, from the ``(W, N)`` kept-count matrix (python ints)."""

    def __init__(self, kept: Sequence[Sequence[int]], shard: ExpertShard):
        W, L, me = shard.world_size, shard.num_local, shard.rank
        mine = slice(shard.first_expert, shard.first_expert + L)
        #: tokens this process sends to each process
        self.send = [
            sum(kept[me][shard.first_expert_of(d) : shard.first_expert_of(d) + L]) if shard.serves(me, d) else 0
            for d in range(W)
        ]
        #: ``(W, L)`` tokens received from each process for each local expert
        self.recv_by_expert = [list(kept[s][mine]) if shard.serves(s, me) else [0] * L for s in range(W)]
        #: tokens received from each process
        self.recv = [sum(row) for row in self.recv_by_expert]
        #: tokens each local expert runs
        self.per_expert = [sum(col) for col in zip(*self.recv_by_expert)]


def collective_device(group=None) -> torch.device:
    """The device of the tensors that code outside a model hands to ``group``'s collectives.

    The host where the group's backend takes host tensors (gloo), else the process's current CUDA
    device (NCCL takes only CUDA tensors; fairseq sets each process's device with
    ``torch.cuda.set_device``): the rule torch's own object collectives follow. Outside a
    distributed job: the host.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    try:
        from torch.distributed.distributed_c10d import _get_object_coll_device

        kind = _get_object_coll_device(group)
    except (ImportError, AttributeError, RuntimeError, ValueError):  # torch's private helper moved
        kind = "cpu" if "cpu" in str(dist.get_backend(group)) or dist.get_backend(group) == "gloo" else "cuda"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def gather_counts(counts: torch.Tensor, world_size: int) -> torch.Tensor:
    """``(W, K)`` every process's ``(K,)`` count vector (all_gather; no autograd)."""
    if world_size == 1:
        return counts.unsqueeze(0)
    parts = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(parts, counts)
    return torch.stack(parts)


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
    splits: Splits,
    shard: ExpertShard,
    run_local_experts: Callable[[torch.Tensor, List[int]], torch.Tensor],
) -> torch.Tensor:
    """Send tokens to their experts' processes, run them there, and bring them back.

    Args:
        sorted_features: ``(T_kept, d)`` this process's tokens sorted by global expert id
            (so also by destination process).
        splits: the exchange's sizes (:class:`Splits`).
        shard: this process's experts.
        run_local_experts: ``(tokens sorted by local expert, per-local-expert counts)``
            -> outputs in the same order.
    Returns:
        ``(T_kept, d)`` outputs, in the order of ``sorted_features``.
    """
    received = All2All.apply(sorted_features, splits.send, splits.recv)
    L = shard.num_local
    if L == 1 or sum(1 for n in splits.recv if n) <= 1:
        out = run_local_experts(received, splits.per_expert)
    else:
        # received: grouped by source process, then local expert; regroup by local expert
        device = sorted_features.device
        recv_counts = torch.tensor(splits.recv_by_expert, dtype=torch.long).reshape(-1).to(device, non_blocking=True)
        local_expert = torch.arange(L, device=device).repeat(shard.world_size)
        token_expert = torch.repeat_interleave(local_expert, recv_counts, output_size=sum(splits.recv))
        perm = torch.argsort(token_expert, stable=True)
        out = run_local_experts(received.index_select(0, perm), splits.per_expert)
        out = out.index_select(0, _inverse(perm))
    return All2All.apply(out, splits.recv, splits.send)


# ----------------------------------------------------------------------------- replicas

_replica_groups: Dict[Tuple[int, int], object] = {}


def replica_group(shard: ExpertShard):
    """The process group of this process's replicas (None without replicas).

    Made once per layout; ``new_group`` is collective, so every process creates
    every group, in the same order (at model construction, on every process).
    """
    if shard.replicas == 1:
        return None
    key = (shard.world_size, shard.num_experts)
    if key not in _replica_groups:
        groups = [
            dist.new_group(list(range(start, start + shard.replicas)))
            for start in range(0, shard.world_size, shard.replicas)
        ]
        _replica_groups[key] = groups
    return _replica_groups[key][shard.rank // shard.replicas]


def reduce_replica_gradients(layers: Sequence[torch.nn.Module]) -> None:
    """Sum the expert gradients of replicas among themselves (after fairseq's own all-reduce).

    ``layers``: MoE layers (with ``shard`` and ``experts``). One flat
    all-reduce per layer.
    """
    for layer in layers:
        group = replica_group(layer.shard)
        if group is None:
            continue
        params = [p for p in layer.experts.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            else:
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
