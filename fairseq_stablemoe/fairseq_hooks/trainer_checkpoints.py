"""Per-process checkpoints for expert-parallel runs (a small patch of fairseq's Trainer).

fairseq writes a checkpoint on data-parallel rank 0 only and, on resume, reads
it on rank 0 and broadcasts it to the other ranks. With expert parallelism
(``W > 1`` processes, each holding ``N / W`` experts) that loses the experts
(and their optimizer state) of every rank but 0, and would load rank 0's
experts everywhere. fairseq's own BASE layers solve the same problem with
per-rank files; this module does the same for the plugin's MoE layers.

What :func:`install` changes, on :class:`fairseq.trainer.Trainer`, **only when
the trainer's model has MoE layers with experts** (:class:`modules.moe_layer.MoELayer`);
for any other model every overridden member calls fairseq's own code:

* ``should_save_checkpoint_on_current_rank``: ``True`` on every rank of an
  expert-parallel model (fairseq: rank 0 only).
* ``checkpoint_suffix``: adds ``-rank{r}-of{W}`` for an expert-parallel model,
  so ``checkpoint_last.pt`` becomes ``checkpoint_last-rank{r}-of{W}.pt`` on
  rank ``r``. fairseq's ``checkpoint_utils.save_checkpoint``/``load_checkpoint``
  use this suffix for every file name, so the saved names, ``--restore-file``
  and the clean-up of ``--keep-interval-updates``, ``--keep-last-epochs`` and
  ``--keep-best-checkpoints`` (each rank removes its own old files) all work
  per rank unchanged.
* ``save_checkpoint``: adds a small ``extra_state["stablemoe_experts"]``
  record (rank, world size, expert count, run id, update count, the names of
  the optimizer's parameters) that :mod:`checkpoints.consolidation` and the load checks
  read, then calls fairseq's method, which writes atomically (temporary file,
  then rename). Every rank creates the save directory first and, for
  fairseq's checkpoints (not ``crash.pt``), sums the routing counts over the
  ranks (:func:`modules.routing_counts.flush_routing_counts`).
* ``load_checkpoint``: checks, before anything is loaded, that every rank's
  file exists and holds that rank's experts of the same save, with a clear
  error naming the missing file or the ``stablemoe-consolidate`` command that
  converts the checkpoint; then calls fairseq's method with
  ``--load-checkpoint-on-all-dp-ranks`` forced on (as fairseq does for BASE
  layers), so every rank reads its own file and nothing is broadcast from
  rank 0. The model, the optimizer state (including the experts'), the update
  count and the frozen-router flag (a buffer of the model) are then restored
  by fairseq's own code on every rank.

The file names, the record and the checks live in :mod:`checkpoints.rank_files`; this
module is only the patch. It stays a patch because fairseq turns on per-rank
saving only for ``--base-layers``, and setting that option would make fairseq
insert its own BASE layers. fairseq's evaluation tools (eval-lm, generate,
interactive, validate) reach the same files through :mod:`.eval_tools`.

One-process runs of a MoE model keep fairseq's file names and loading; they
get the record and the checks (e.g. resuming per-rank files on one process
asks for consolidation).

Killed runs: fairseq writes each checkpoint atomically, but then *copies* it
to ``checkpoint_last.pt`` (and ``checkpoint_best.pt``), and a copy cut short by
a kill leaves a truncated file that would stop every later resume. When the
file to resume from cannot be read, ``load_checkpoint`` resumes from the
newest checkpoint of the same save directory that every rank can read if the
unreadable file is a byte prefix of it (a cut-short copy, so the same update);
any other fallback is an error naming ``STABLEMOE_ALLOW_OLDER_CHECKPOINT=1``,
the opt-in (for MoE models).
"""

import contextlib
import logging
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from fairseq.trainer import Trainer

from ..checkpoints.rank_files import (
    META_FORMAT,
    META_KEY,
    check_before_load,
    fall_back_if_unreadable,
    rank_path,
    shard_tag,
)
from ..checkpoints.reading import parse_rank_path
from ..distributed.expert_parallel import ExpertShard
from ..modules.moe_layer import MoELayer
from ..modules.routing_counts import flush_routing_counts

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- model inspection


def expert_layers(model: torch.nn.Module) -> List[Tuple[str, MoELayer]]:
    """``(state-dict prefix of the experts, layer)`` for every MoE layer with experts."""
    return [
        (f"{name}.experts." if name else "experts.", m) for name, m in model.named_modules() if isinstance(m, MoELayer)
    ]


def model_shard(trainer: Trainer) -> Optional[ExpertShard]:
    """The expert shard of the trainer's model; None when it has no MoE layer (plain fairseq)."""
    if "_stablemoe_shard" not in trainer.__dict__:
        layers = expert_layers(trainer._model)
        trainer._stablemoe_shard = layers[0][1].shard if layers else None
    return trainer._stablemoe_shard


def is_expert_parallel(trainer: Trainer) -> bool:
    shard = model_shard(trainer)
    return shard is not None and shard.is_parallel


def optimizer_param_names(trainer: Trainer) -> Optional[List[str]]:
    """Name of the parameter behind every index of the optimizer's state dict.

    fairseq's ``--fp16``/``--bf16`` optimizer steps fp32 copies: with
    ``--fp16-no-flatten-grads`` (and under ``--bf16``) one per parameter, in
    the order of the trained parameters, named here after them. None when the
    optimizer holds no per-parameter state (the flat ``--fp16`` copy: one fp32
    vector for all parameters), which cannot be split or merged by expert.
    """
    names: Dict[int, str] = {}
    for n, p in trainer._model.named_parameters():
        names.setdefault(id(p), n)
    for n, p in trainer._criterion.named_parameters():
        names.setdefault(id(p), "criterion." + n)
    fp16_params = getattr(trainer.optimizer, "fp16_params", None)
    fp32_params = getattr(trainer.optimizer, "fp32_params", None)
    if isinstance(fp32_params, list) and fp16_params is not None:
        for p16, p32 in zip(fp16_params, fp32_params):
            if id(p16) in names:
                names.setdefault(id(p32), names[id(p16)])
    try:
        groups = trainer.optimizer.optimizer.param_groups
    except (AttributeError, NotImplementedError):
        return None
    out: List[str] = []
    seen = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) not in names:
                return None
            out.append(names[id(p)])
    return out


def _run_id(trainer: Trainer, shard: ExpertShard) -> str:
    """One id per training run, the same on every rank (rank 0's)."""
    if getattr(trainer, "_stablemoe_run_id", None) is None:
        proposal = [uuid.uuid4().hex]
        if shard.is_parallel:
            dist.broadcast_object_list(proposal, src=0)
        trainer._stablemoe_run_id = proposal[0]
    return trainer._stablemoe_run_id


def describe(trainer: Trainer, shard: ExpertShard) -> Dict[str, Any]:
    """The record saved in ``extra_state[META_KEY]``."""
    return {
        "format": META_FORMAT,
        "world_size": shard.world_size,
        "rank": shard.rank,
        "num_experts": shard.num_experts,
        "expert_layers": [prefix for prefix, _ in expert_layers(trainer._model)],
        "run_id": _run_id(trainer, shard),
        "num_updates": trainer.get_num_updates(),
        "optimizer_param_names": optimizer_param_names(trainer),
    }


@contextlib.contextmanager
def _load_on_all_ranks(cfg):
    old = cfg.checkpoint.load_checkpoint_on_all_dp_ranks
    cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
    try:
        yield
    finally:
        cfg.checkpoint.load_checkpoint_on_all_dp_ranks = old


# ----------------------------------------------------------------------------- the Trainer patch

_fairseq: Dict[str, Any] = {}


def _should_save_checkpoint_on_current_rank(self) -> bool:
    if is_expert_parallel(self):
        return True  # every rank holds experts nobody else has
    return _fairseq["should_save_checkpoint_on_current_rank"].fget(self)


def _checkpoint_suffix(self) -> str:
    suffix = _fairseq["checkpoint_suffix"].fget(self)
    if is_expert_parallel(self):
        shard = model_shard(self)
        suffix += shard_tag(shard.rank, shard.world_size)
    return suffix


def _save_checkpoint(self, filename, extra_state):
    shard = model_shard(self)
    if shard is not None:
        extra_state = dict(extra_state)
        extra_state[META_KEY] = describe(self, shard)
        if shard.is_parallel:  # fairseq creates the directory on rank 0 only
            os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
            if parse_rank_path(filename) is None:
                # a name without the checkpoint suffix (fairseq's crash.pt after a FloatingPointError):
                # every rank would write the same file at once
                filename = rank_path(filename, shard.rank, shard.world_size)
            else:
                # fairseq's checkpoints (not crash.pt, which one rank may write alone) are saved by every
                # rank at the same update: sum the routing counts over the ranks (collective) into the state
                flush_routing_counts(self._model)
    return _fairseq["save_checkpoint"](self, filename, extra_state)


def _load_checkpoint(self, filename, *args, **kwargs):
    shard = model_shard(self)
    if shard is None:
        return _fairseq["load_checkpoint"](self, filename, *args, **kwargs)
    filename = fall_back_if_unreadable(filename, shard)
    check_before_load(filename, shard, [p for p, _ in expert_layers(self._model)])
    if shard.is_parallel:
        logger.info("expert parallelism: every rank loads its own checkpoint (%s on rank %d)", filename, shard.rank)
        with _load_on_all_ranks(self.cfg):
            extra_state = _fairseq["load_checkpoint"](self, filename, *args, **kwargs)
    else:
        extra_state = _fairseq["load_checkpoint"](self, filename, *args, **kwargs)
    meta = (extra_state or {}).get(META_KEY)
    if meta is not None:
        self._stablemoe_run_id = meta["run_id"]  # later saves continue the run
    else:
        _run_id(self, shard)  # a new run: agree on its id now, while every rank is here
    return extra_state


def install() -> None:
    """Patch :class:`fairseq.trainer.Trainer` (idempotent); see the module doc."""
    if _fairseq:
        return
    _fairseq.update(
        should_save_checkpoint_on_current_rank=Trainer.should_save_checkpoint_on_current_rank,
        checkpoint_suffix=Trainer.checkpoint_suffix,
        save_checkpoint=Trainer.save_checkpoint,
        load_checkpoint=Trainer.load_checkpoint,
    )
    Trainer.should_save_checkpoint_on_current_rank = property(
        _should_save_checkpoint_on_current_rank, doc=_fairseq["should_save_checkpoint_on_current_rank"].__doc__
    )
    Trainer.checkpoint_suffix = property(_checkpoint_suffix, doc=_fairseq["checkpoint_suffix"].__doc__)
    Trainer.save_checkpoint = _save_checkpoint
    Trainer.load_checkpoint = _load_checkpoint


install()
