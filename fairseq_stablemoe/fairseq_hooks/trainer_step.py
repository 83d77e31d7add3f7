"""What the plugin changes in fairseq's training step: one gradient norm for the whole model, and
the update count that StableMoE's routing counts read.

fairseq leaves parameters with ``expert = True`` out of the gradient norm
(``fairseq.utils.clip_grad_norm_``), and its flat ``--fp16``/``--bf16`` master
copy drops the attribute altogether. For an expert-parallel MoE that makes the
norm differ between processes (fairseq's cross-process check,
``Trainer._check_grad_norms``, then stops the run on GPUs), lets an inf in one
process's expert gradients past the loss scaler, and clips with a norm that is
not the model's (the paper's code adds the experts' part, all-reduced).

With this module imported, for models whose parameters come from this plugin
(they carry ``expert_replicas``), the norm that fairseq clips with, logs as
``gnorm``, checks across processes and tests for overflow is::

    sqrt(||shared grads||^2 + all_reduce_sum(||local expert grads||^2 / replicas))

the same value on every process (the shared gradients are identical after
``legacy_ddp``'s all-reduce, the experts' part is one all-reduced scalar), and
non-finite on every process if any process's gradients are. The fairseq code
it relies on, each a small wrapper that calls fairseq's own:

* ``fairseq.utils.clip_grad_norm_``, called by every fairseq optimizer's
  ``clip_grad_norm`` (fp32, ``FP16Optimizer``, ``MemoryEfficientFP16Optimizer``,
  ``AMPOptimizer``): replaced by :func:`clip_grad_norm_`, which calls
  fairseq's original for any model without this plugin's experts;
* ``_FP16OptimizerMixin.build_fp32_params`` (the fp32 master copy of
  ``--fp16``/``--bf16``): records where the experts lie in the flat vector
  (``expert_slices``; fairseq's flat copy has no ``expert`` attribute), or
  copies ``expert_replicas`` to the per-parameter copies;
* ``AMPOptimizer.clip_grad_norm`` (:func:`_amp_clip_grad_norm`, which replaces
  fairseq's instead of wrapping it, keeping its overflow check and messages): fairseq
  unscales the gradients with ``scaler.unscale_(self.optimizer)`` (the torch
  optimizer) but steps with ``scaler.step(self.fp32_optimizer)`` (its fairseq
  wrapper); torch's ``GradScaler`` keeps its state per optimizer object, so the
  step divided the gradients by the loss scale a second time. Here they are
  unscaled once, on the object ``step`` receives (the scaler records it as
  unscaled and ``step`` does not divide again). The scaler then decides to skip
  the step from the process's *own* gradients; when the global norm is not
  finite, its inf flag for this step is set on this process too, so every
  process skips the step and lowers the scale together;
* ``LegacyDistributedDataParallel.all_reduce_grads``: after fairseq's
  all-reduce of the shared gradients, expert replicas sum their gradients
  among themselves (:func:`distributed.expert_parallel.reduce_replica_gradients`);
* ``Trainer._log_oom`` (:func:`_log_oom`): on an out-of-memory error fairseq
  skips the micro-batch (training) or retries the batch (validation) on that
  process alone; under expert parallelism the MoE layers' collectives would
  then pair with other calls on the other processes (a hang until the process
  group's timeout, or wrong split sizes). After fairseq's memory report the
  process stops with :class:`ExpertParallelOOMError`, which names what to
  lower; the others stop when their collectives lose it.

Two more, for StableMoE's routing counts (:mod:`modules.routing_counts`):

* ``Trainer.set_num_updates``: fairseq passes the update count to the model
  only at the start of the next step; here the plugin's models also get it
  right after each step, so a logging window ends (and its ``agree_ceiling``
  is logged) in the step that completes it, and the stage boundary (the
  router's freeze, the refit table) takes effect before the validation and
  the checkpoint of the boundary update;
* ``FairseqTask.train_step``: fairseq's dummy batch (a process with no batch
  left repeats its first one with the loss zeroed, ``ignore_grad``) runs
  inside :func:`modules.routing_counts.not_counted`, so the counts hold only real
  tokens, as the logged statistics do.
"""

from typing import Iterable, List, Tuple

import torch
from fairseq import utils
from fairseq.distributed.legacy_distributed_data_parallel import LegacyDistributedDataParallel
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.amp_optimizer import logger as amp_logger
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from fairseq.tasks import FairseqTask
from fairseq.trainer import Trainer

from ..distributed.expert_parallel import all_reduce_sum, reduce_replica_gradients
from ..modules.moe_layer import MoELayer
from ..modules.routing_counts import not_counted

_fairseq = {}


def _owned(p: torch.Tensor) -> bool:
    return hasattr(p, "expert_replicas") or hasattr(p, "expert_slices")


def _split(params: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[Tuple[torch.Tensor, int]], List[torch.Tensor]]:
    """``(shared grads, (expert grad, replicas) pairs, every grad)`` of ``params``."""
    shared, experts, every = [], [], []
    for p in params:
        if getattr(p, "grad", None) is None:
            continue
        g = p.grad.detach()
        every.append(g)
        if hasattr(p, "expert_slices"):  # fairseq's flat fp32 copy of the whole model
            flat = g.view(-1)
            experts.extend((flat[a:b], r) for a, b, r in p.expert_slices)
            shared.extend(flat[a:b] for a, b in p.shared_slices)
        elif hasattr(p, "expert_replicas"):
            experts.append((g, p.expert_replicas))
        elif not hasattr(p, "expert"):  # another module's `expert` parameters: fairseq's rule
            shared.append(g)
    return shared, experts, every


def _sum_sq(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, aggregate_norm_fn=None) -> torch.Tensor:
    """fairseq's ``clip_grad_norm_`` over the whole model, experts included (see the module doc)."""
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not any(_owned(p) for p in params):
        return _fairseq["clip_grad_norm_"](params, max_norm, aggregate_norm_fn)
    shared, experts, every = _split(params)
    if not every:
        return params[0].new_tensor(0.0) if params else torch.tensor(0.0)  # not for a collective: no parameter
    device = every[0].device
    shared_sq = _sum_sq(shared, device)
    if aggregate_norm_fn is not None:  # fairseq's FSDP aggregation of the shared part
        shared_sq = aggregate_norm_fn(shared_sq.sqrt()) ** 2
    by_replicas = {}
    for g, r in experts:
        by_replicas.setdefault(r, []).append(g)
    expert_sq = sum((_sum_sq(gs, device) / r for r, gs in by_replicas.items()), _sum_sq([], device))
    all_reduce_sum(expert_sq)
    total_norm = (shared_sq + expert_sq).sqrt()
    if max_norm > 0:
        clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
        torch._foreach_mul_(every, clip_coef)
    return total_norm


def _mark_flat(fp32_params, params: List[torch.nn.Parameter]) -> None:
    """Record on fairseq's flat fp32 copy where this plugin's experts lie in it."""
    for device, flat in fp32_params.items():
        members = params if len(fp32_params) == 1 else [p for p in params if p.device.index == device]
        experts, shared, offset = [], [], 0
        for p in members:
            end = offset + p.numel()
            if hasattr(p, "expert_replicas"):
                experts.append((offset, end, p.expert_replicas))
            else:
                shared.append((offset, end))
            offset = end
        if experts:
            flat.expert_slices = _merge(experts)
            flat.shared_slices = [(a, b) for a, b, _ in _merge([(a, b, None) for a, b in shared])]


def _merge(slices):
    """Adjacent ``(start, end, tag)`` slices with the same tag merged into one."""
    out = []
    for a, b, r in slices:
        if out and out[-1][1] == a and out[-1][2] == r:
            out[-1] = (out[-1][0], b, r)
        else:
            out.append((a, b, r))
    return out


def _build_fp32_params(cls, args, params, flatten=True):
    params = list(params)
    fp32_params = _fairseq["build_fp32_params"].__func__(cls, args, params, flatten=flatten)
    if flatten:
        _mark_flat(fp32_params, params)
    else:  # fairseq copies `expert` to the fp32 copies, not the replica count
        for p, p32 in zip(params, fp32_params):
            if hasattr(p, "expert_replicas"):
                p32.expert_replicas = p.expert_replicas
    return fp32_params


def _amp_clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
    """fairseq's ``AMPOptimizer.clip_grad_norm``, with the loss scale divided out once.

    The gradients (of ``self.fp32_optimizer.params``) are unscaled on
    ``self.fp32_optimizer``, the object fairseq's ``step`` hands the scaler, so
    ``scaler.step`` finds them unscaled; a non-finite (global) norm sets the
    scaler's inf flag of this step on this process, so ``scaler.step`` skips the
    update and ``scaler.update`` lowers the scale on every process. Returns the
    norm (0-dim tensor), as fairseq's does.
    """
    scaler = self.scaler
    scaler.unscale_(self.fp32_optimizer)
    grad_norm = self.fp32_optimizer.clip_grad_norm(max_norm, aggregate_norm_fn)
    if not torch.isfinite(grad_norm).all():
        if scaler.is_enabled():
            # the scaler found its infs in this process's own gradients: make it agree with the norm
            # (GradScaler's per-optimizer inf flags, read by its step() and update(); a private accessor)
            for found_inf in scaler._found_inf_per_device(self.fp32_optimizer).values():
                found_inf.fill_(1.0)
        new_loss_scale = self.next_loss_scale
        if new_loss_scale <= self.min_loss_scale:  # fairseq's own check and messages
            raise FloatingPointError(
                f"AMP: Minimum loss scale reached ({self.min_loss_scale}). Your loss is probably exploding. "
                f"Try restarting training or use fp32. {new_loss_scale}"
            )
        amp_logger.info(f"AMP: overflow detected, setting scale to {new_loss_scale}")
    return grad_norm


class ExpertParallelOOMError(RuntimeError):
    """An out-of-memory error under expert parallelism: it cannot be skipped on one process."""


def _log_oom(self, exc):
    _fairseq["log_oom"](self, exc)  # fairseq's message and CUDA memory summary
    layers = [m for m in self.get_model().modules() if isinstance(m, MoELayer)]
    if layers and layers[0].shard.is_parallel:
        # the message avoids fairseq's "out of memory" test, so no handler of fairseq retries on it
        raise ExpertParallelOOMError(
            f"rank {self.data_parallel_rank}: an out-of-memory error cannot be skipped under expert parallelism "
            f"({layers[0].shard.world_size} processes): fairseq would skip or retry the batch on this process "
            "alone, while every MoE layer's all-to-all needs every process, so the run stops here (the last "
            "checkpoint stands). Lower --max-tokens (or --batch-size) and raise --update-freq to keep the tokens "
            "per update; for validation lower --max-tokens-valid (or --batch-size-valid); or use fewer experts "
            "per process"
        ) from exc


def _all_reduce_grads(self):
    _fairseq["all_reduce_grads"](self)
    if "_stablemoe_layers" not in self.__dict__:
        self._stablemoe_layers = [m for m in self.module.modules() if isinstance(m, MoELayer)]
    reduce_replica_gradients(self._stablemoe_layers)


def _set_num_updates(self, num_updates):
    _fairseq["set_num_updates"](self, num_updates)
    model = self.get_model()
    if any(isinstance(m, MoELayer) for m in model.modules()):
        model.set_num_updates(num_updates)


def _task_train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
    step = _fairseq["task_train_step"]
    if not ignore_grad:
        return step(self, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)
    with not_counted():
        return step(self, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)


def install() -> None:
    """Install the wrappers (idempotent)."""
    if _fairseq:
        return
    _fairseq.update(
        clip_grad_norm_=utils.clip_grad_norm_,
        build_fp32_params=_FP16OptimizerMixin.__dict__["build_fp32_params"],
        all_reduce_grads=LegacyDistributedDataParallel.all_reduce_grads,
        set_num_updates=Trainer.set_num_updates,
        task_train_step=FairseqTask.train_step,
        log_oom=Trainer._log_oom,
    )
    utils.clip_grad_norm_ = clip_grad_norm_
    _FP16OptimizerMixin.build_fp32_params = classmethod(_build_fp32_params)
    AMPOptimizer.clip_grad_norm = _amp_clip_grad_norm
    LegacyDistributedDataParallel.all_reduce_grads = _all_reduce_grads
    Trainer.set_num_updates = _set_num_updates
    FairseqTask.train_step = _task_train_step
    Trainer._log_oom = _log_oom


install()
