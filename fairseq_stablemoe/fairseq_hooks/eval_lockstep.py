"""The evaluation lockstep: every MoE forward is collective, so processes with unequal work meet.

See :mod:`.eval_tools` for how fairseq's tools use it.
"""

import datetime
import logging
import os
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..distributed.expert_parallel import world_size_and_rank
from ..modules.moe_layer import MoELayer

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "STABLEMOE_LOCKSTEP_TIMEOUT"


#: the default lockstep timeout's cap (s): under NCCL's default process-group timeout (600 s)
LOCKSTEP_TIMEOUT_CAP = 480.0


def _process_group_timeout() -> float:
    """The default process group's timeout (s): torch's default for its backend."""
    try:
        from torch.distributed.distributed_c10d import _get_default_timeout

        return _get_default_timeout(dist.get_backend()).total_seconds()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return 600.0


def _timeout() -> datetime.timedelta:
    """How long a lockstep collective waits: ``STABLEMOE_LOCKSTEP_TIMEOUT``, else below the group's timeout."""
    if TIMEOUT_ENV in os.environ:
        return datetime.timedelta(seconds=float(os.environ[TIMEOUT_ENV]))
    return datetime.timedelta(seconds=min(LOCKSTEP_TIMEOUT_CAP, 0.8 * _process_group_timeout()))


# ----------------------------------------------------------------------------- lockstep


class Lockstep:
    """Keeps the MoE forwards of ``W`` processes in step (see the module doc)."""

    def __init__(self, layers: Sequence[MoELayer]):
        self.layers = list(layers)
        self.world_size, self.rank = world_size_and_rank()
        self.dummy_forwards = 0
        self.rounds = 0
        self._waited = 0
        self._in_dummy = False
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    @property
    def device(self) -> torch.device:
        """The MoE layers' device at the time of the call, where the lockstep's tensors live (NCCL takes
        only CUDA tensors); the tools move the model to the GPU after loading it, when this was made."""
        return _fc1_weight(self.layers[0]).device

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _agree(self, want: int) -> int:
        """The layer every process runs next (-1: all have finished)."""
        mine = torch.tensor([want, self._waited], dtype=torch.long, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(everyone, mine, async_op=True)
        try:
            work.wait(_timeout())
        except RuntimeError as e:
            raise RuntimeError(
                f"rank {self.rank}: the other processes did not join the MoE lockstep within "
                f"{_timeout().total_seconds():.0f} s (set {TIMEOUT_ENV} to wait longer). Likely causes: a process "
                "stopped with an error (see its log), or a process ran a collective outside the MoE layers "
                f"(a tool this plugin does not wrap). ({e})"
            ) from e
        self.rounds += 1
        asks = [(w, waited, r) for r, (w, waited) in enumerate(torch.stack(everyone).tolist())]
        busy = [a for a in asks if a[0] >= 0]
        if not busy:
            return -1
        chosen = max(busy, key=lambda a: (a[1], -a[2]))[0]
        self._waited = 0 if (want == chosen or want < 0) else self._waited + 1
        return chosen

    def _dummy(self, index: int) -> None:
        """Join layer ``index``'s collectives with one padding token (which goes to no expert)."""
        layer = self.layers[index]
        weight = _fc1_weight(layer)
        dim = weight.shape[1]
        self._in_dummy = True
        try:
            with torch.no_grad():
                layer(
                    torch.zeros(1, dim, dtype=weight.dtype, device=weight.device),
                    torch.full((1,), layer.padding_idx, dtype=torch.long, device=weight.device),
                )
        finally:
            self._in_dummy = False
        self.dummy_forwards += 1

    def _hook(self, index: int) -> Callable:
        def before_forward(module, args):
            if self._in_dummy:
                return None
            while True:
                chosen = self._agree(index)
                if chosen == index:
                    return None
                self._dummy(chosen)

        return before_forward

    def finish(self) -> None:
        """Join the others' MoE forwards until every process has finished."""
        while True:
            chosen = self._agree(-1)
            if chosen < 0:
                return
            self._dummy(chosen)

    def total_dummy_forwards(self) -> int:
        """All processes' forwards on one padding token (collective)."""
        t = torch.tensor([self.dummy_forwards], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())


def _fc1_weight(layer: MoELayer) -> torch.Tensor:
    for name, p in layer.named_parameters():
        if name.endswith("fc1.weight"):
            return p
    raise RuntimeError(f"{layer.layer_name}: cannot find the model dimension of its experts (no fc1.weight)")


#: the lockstep of the models loaded in this process (one per process, for every model of an ensemble)
_active: List[Lockstep] = []


def active() -> Optional[Lockstep]:
    return _active[0] if _active else None


def install_lockstep(models: Sequence[torch.nn.Module]) -> Optional[Lockstep]:
    """Lockstep for the MoE layers of ``models`` when they are expert-parallel; None otherwise."""
    layers = [m for model in models for m in model.modules() if isinstance(m, MoELayer)]
    if not layers or not layers[0].shard.is_parallel:
        return None
    for lock in _active:
        lock.remove()
    _active[:] = [Lockstep(layers)]
    logger.info(
        "expert parallelism: %d MoE layers kept in step across %d processes", len(layers), _active[0].world_size
    )
    return _active[0]


def finish_all() -> None:
    """End of a tool's work on this process: serve the others' MoE forwards until all are done."""
    lock = active()
    if lock is not None:
        lock.finish()


# ----------------------------------------------------------------------------- loading per-rank files
