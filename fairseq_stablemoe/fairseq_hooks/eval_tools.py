"""fairseq-eval-lm, -generate, -interactive and -validate on W processes, from per-rank files.

An expert-parallel run on ``W`` processes saves ``NAME-rank{r}-of{W}.pt`` on
every rank (:mod:`.trainer_checkpoints`). Under torchrun (``python -m
fairseq_stablemoe.launch eval-lm|generate|interactive|validate ...``, or the
tool with fairseq's distributed flags) this module lets fairseq's own tools
use them, with the logical name (``--path DIR/checkpoint_last.pt``):

* **Loading.** fairseq's ``checkpoint_utils.load_model_ensemble_and_task``
  (which every tool calls) is wrapped: when ``NAME`` (with fairseq's
  ``--checkpoint-suffix``) has per-rank files, each process loads its own, after
  one ``all_gather_object`` that checks, before the first batch, that every
  rank's file exists, that all are from the same save, and that they were
  written for this number of processes (otherwise the error names the missing
  file or the ``stablemoe-consolidate ... --shards W`` command). Other
  checkpoints load as fairseq loads them.
* **Lockstep.** Every forward of an MoE layer is collective, but processes
  hold different batches: eval-lm skips the empty filler batches of shorter
  shards, beam search ends at different steps, a process runs out of
  sentences first. :class:`Lockstep` puts a forward pre-hook on every MoE
  layer: before each forward the processes exchange which layer each wants to
  run next (one small ``all_gather``; ``-1`` for a process that has finished);
  the processes that want the chosen layer run it, the others run it on one
  padding token (a forward that sends nothing) and ask again. A process that
  finishes its work keeps answering (:meth:`Lockstep.finish`) until every
  process has finished. The choice goes to the process that has waited
  longest, so no process waits for another's whole shard. Without
  ``--capacity-factor`` (the default) a token's MoE output depends on that
  token alone, so results do not depend on which forwards meet; with it, the
  capacity is computed over the tokens of the forwards that meet, so which
  tokens overflow can differ from one process on the consolidated file.
* **Totals.** fairseq shards the split by batches, so a process may get fewer
  batches than the others, or none. ``fairseq-eval-lm`` computes its loss per
  process; here the summed log-probabilities and token counts are all-reduced,
  so every process reports the perplexity of the whole split.
  ``fairseq-generate`` prints each process's sentences (its shard of the split,
  as fairseq shards it); with ``--results-path`` each process writes
  ``generate-SUBSET-rank{r}-of{W}.txt``. Their summary lines (``Evaluated N
  tokens``, ``Translated N sentences``, the BLEU line) give totals over all
  processes, and a process with no batch does not divide by zero
  (:mod:`.eval_totals`).
  ``fairseq-generate`` itself never starts a distributed job; here it does
  (``call_main``) when the distributed flags or torchrun's environment are
  there. On CPU, fairseq's ``call_main`` finds no torchrun job (it sizes it by
  the CUDA devices); here it gets torchrun's (:func:`_call_main`), so plain
  ``torchrun ... fairseq-eval-lm|generate|validate|train ... --cpu --user-dir
  ...`` works as the launcher does. ``fairseq-interactive`` decodes every input on every process (each
  holds only its experts) and prints on rank 0 only. ``fairseq-validate``
  skips the empty filler batches it would otherwise crash on, and its
  closing ``all_gather_list`` works on CPU (fairseq's allocates a CUDA tensor).

Every tensor this module hands to a collective lives on the MoE layers' device (the lockstep) or
on the device of the process group's collectives (the totals, :func:`distributed.expert_parallel.collective_device`):
NCCL takes only CUDA tensors. Every lockstep collective waits at most ``STABLEMOE_LOCKSTEP_TIMEOUT``
seconds (default: 80% of the process group's timeout, at most 480 s, so that it stops before NCCL's
own 600 s watchdog) and then stops with an error naming the likely cause.
"""

import logging
import math
import os
import sys
from argparse import Namespace
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils

from ..checkpoints.rank_files import CheckpointMismatchError, meta_of, rank_files_on_disk, rank_path, read
from ..checkpoints.reading import CheckpointLoadError
from ..distributed.expert_parallel import collective_device, world_size_and_rank
from ..distributed.torchrun import torchrun_settings
from .eval_lockstep import active, finish_all, install_lockstep
from .eval_totals import Totals, generate_totals, swapped

logger = logging.getLogger(__name__)


def _under_torchrun_without_job() -> Optional[int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if world > 1 and not (dist.is_available() and dist.is_initialized()) else None


def resolve(path: str, world: int, rank: int) -> Dict[str, Any]:
    """What this process would load for the logical checkpoint ``path``: a small report."""
    report: Dict[str, Any] = {"rank": rank, "path": path, "file": None, "problem": None, "missing": None}
    on_disk = rank_files_on_disk(path)
    if world > 1 and world in on_disk:
        mine = rank_path(path, rank, world)
        if not os.path.isfile(mine):
            report["missing"] = mine
            return report
        report["file"] = mine
        try:
            meta = meta_of(read(mine, mmap=True)) or {}
        except CheckpointLoadError as e:
            report["problem"] = str(e)
            return report
        report["save"] = (meta.get("run_id"), meta.get("num_updates"))
        if (meta.get("world_size"), meta.get("rank")) != (world, rank):
            report["problem"] = (
                f"{mine} records rank {meta.get('rank')} of {meta.get('world_size')} processes: the file was "
                "renamed or copied from another run"
            )
        return report
    if world == 1 and os.path.isfile(path):
        try:
            read(path, mmap=True)  # an ordinary checkpoint: fairseq loads it (and the model reports a mismatch)
        except CheckpointLoadError as e:
            report["problem"] = str(e)  # before fairseq's torch.load, whose error names no file
        return report
    if on_disk:
        w_other = sorted(on_disk)[0]
        report["problem"] = (
            f"{path} was saved as per-rank files of {w_other} processes ({on_disk[w_other][0]} ...) but this job "
            f"has {world} process(es): "
            + (
                f"write files for {world} processes with `stablemoe-consolidate {path} --shards {world}`"
                if world > 1
                else f"consolidate them into one file with `stablemoe-consolidate {path}`"
            )
        )
        torchrun = _under_torchrun_without_job()
        if world == 1 and torchrun:
            report["problem"] += (
                f"; or, as this runs under torchrun with WORLD_SIZE={torchrun} but fairseq started no "
                "distributed job, launch with `python -m fairseq_stablemoe.launch <tool> ...` (it adds "
                "--distributed-init-method env:// --distributed-world-size ... --distributed-rank ...)"
            )
        return report
    if world > 1 and os.path.isfile(path):
        try:
            meta = meta_of(read(path, mmap=True))
        except CheckpointLoadError as e:
            report["problem"] = str(e)
            return report
        if meta is not None and meta.get("world_size") == 1 and meta.get("num_experts", 0) > 1:
            report["problem"] = (
                f"{path} holds all {meta['num_experts']} experts (one process) but this job has {world} processes, "
                f"each holding its share: split it with `stablemoe-consolidate {path} --shards {world}` "
                "(add -o DIR/ to write elsewhere), or run on one process"
            )
    return report


def resolve_all(filenames: Sequence[str], suffix: str) -> List[str]:
    """The file each logical name stands for on this process; raises before anything is loaded."""
    world, rank = world_size_and_rank()
    resolved = []
    for name in filenames:
        logical = checkpoint_utils.get_maybe_sharded_checkpoint_filename(name, suffix, 0, 1)
        mine = resolve(logical, world, rank)
        reports = [mine]
        if world > 1:
            reports = [None] * world
            dist.all_gather_object(reports, mine)
        problems = [r["problem"] for r in reports if r.get("problem")]
        if problems:
            raise CheckpointMismatchError("; ".join(dict.fromkeys(problems)))
        missing = [r["missing"] for r in reports if r["missing"]]
        have = [r for r in reports if r["file"] is not None]
        if missing:
            names = ", ".join(missing)
            raise CheckpointMismatchError(
                f"missing per-rank checkpoint file(s) {names} of {logical}: every one of the {world} processes "
                f"loads its own file (found: {', '.join(r['file'] for r in have) or 'none'})"
            )
        if have:
            saves = {r["save"] for r in have}
            if len(saves) > 1:
                listing = "; ".join(f"{r['file']}: run {r['save'][0]} at update {r['save'][1]}" for r in have)
                raise CheckpointMismatchError(
                    f"the per-rank files of {logical} are from different saves ({listing}): every rank must load "
                    "the files of one save"
                )
            logger.info("expert parallelism: rank %d loads %s", rank, mine["file"])
            resolved.append(mine["file"])
        else:
            resolved.append(logical)
    return resolved


_fairseq: Dict[str, Any] = {}


def _load_model_ensemble_and_task(
    filenames, arg_overrides=None, task=None, strict=True, suffix="", num_shards=1, state=None
):
    if state is None and num_shards == 1:
        filenames, suffix = resolve_all(filenames, suffix), ""
    out = _fairseq["load_model_ensemble_and_task"](
        filenames,
        arg_overrides=arg_overrides,
        task=task,
        strict=strict,
        suffix=suffix,
        num_shards=num_shards,
        state=state,
    )
    if install_lockstep(out[0]) is not None:
        _skip_empty_valid_batches(out[2])
    return out


def _skip_empty_valid_batches(task) -> None:
    """fairseq-validate runs the empty filler batches of shorter shards; the lockstep covers them instead."""
    valid_step = task.valid_step

    def valid_step_skipping_fillers(sample, model, criterion, *args, **kwargs):
        if not sample or "net_input" not in sample:
            return torch.tensor(0.0), 0, {}
        return valid_step(sample, model, criterion, *args, **kwargs)

    task.valid_step = valid_step_skipping_fillers


# ----------------------------------------------------------------------------- the tools


def _distributed_main(i, main, cfg, kwargs):
    def main_then_finish(cfg, **kw):
        result = main(cfg, **kw)
        finish_all()  # before fairseq's closing barrier: the others may still run MoE forwards
        lock = active()
        if lock is not None:
            total = lock.total_dummy_forwards()
            logger.info("expert parallelism: %d forwards on a padding token kept the processes in step", total)
        return result

    return _fairseq["distributed_main"](i, main_then_finish, cfg, kwargs)


def _all_gather_list(data, group=None, max_size=16384):
    """fairseq's ``all_gather_list`` by ``all_gather_object``, on CPU and GPU alike.

    fairseq's version packs every process's pickled ``data`` into a ``max_size`` buffer (16 KB by
    default, a CUDA tensor): fairseq-validate's logging outputs of more than a few batches exceed
    it, and it fails on CPU. ``all_gather_object`` has no size limit and puts its tensors on the
    device the group's backend needs.
    """
    finish_all()  # fairseq-validate gathers its logs after its loop: the others may still run MoE forwards
    group = group if group is not None else distributed_utils.get_global_group()
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, data, group=group)
    return out


class _Tally:
    """Sum of log-probabilities and token count as ``fairseq_cli.eval_lm.eval_lm`` computes them.

    The sums stay on the scores' device (no host sync per sentence), and the hypotheses are only
    read: fairseq's own loop merges the BPE pieces' scores in place after this has read them.
    """

    def __init__(self, dictionary, post_process: Optional[str], remove_bos: bool):
        self.score_sum: Any = 0.0  # a float64 tensor once a hypothesis is added
        self.count: Any = 0  # an int64 tensor once a hypothesis is added
        self.remove_bos = remove_bos
        self.continues = None  # (V,) bool: the token continues into the next one (a BPE piece)
        if post_process in {"subword_nmt", "@@ "}:
            cont = post_process.rstrip()
            self.continues = torch.tensor([dictionary[i].endswith(cont) for i in range(len(dictionary))])

    def add(self, hypos) -> None:
        for hypos_i in hypos:
            hypo = hypos_i[0]
            tokens = hypo["tokens"]
            tgt_len = tokens.numel()
            scores = hypo["positional_scores"].float()  # may be the hypothesis' own tensor: never written
            if self.remove_bos:
                tokens, scores = tokens[1:], scores[1:]
            n, skipped = scores.numel(), None
            if self.continues is not None and n > 0:
                # fairseq's loop: for i < tgt_len - 1, a continuing piece i adds its score to i + 1 and
                # is zeroed (and not counted); a run of pieces ends in the piece after it
                if self.continues.device != tokens.device:
                    self.continues = self.continues.to(tokens.device)
                visited = min(tgt_len - 1, n - 1)
                cont = torch.zeros(n, dtype=torch.bool, device=scores.device)
                cont[:visited] = self.continues[tokens[:visited]]
                ends = ~cont
                run = torch.cumsum(ends.long(), 0) - ends.long()  # (n,) index of the run each piece is in
                totals = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, run, scores)
                scores = torch.where(ends, totals[run], torch.zeros_like(scores))
                skipped = cont.sum()
            finite = ~torch.isinf(scores)  # fairseq drops the infinite scores (and keeps a NaN)
            total = torch.where(finite, scores, torch.zeros_like(scores)).double().sum()
            count = finite.sum() if skipped is None else finite.sum() - skipped
            self.score_sum = self.score_sum + total
            self.count = self.count + count


def _eval_lm(
    models,
    source_dictionary,
    batch_iterator,
    post_process=None,
    output_word_probs=False,
    output_word_stats=False,
    target_dictionary=None,
    softmax_batch=0,
    remove_bos_token=False,
    device=None,
):
    original = _fairseq["eval_lm"]
    names = original.__globals__  # fairseq_cli.eval_lm's namespace: the SequenceScorer and timer eval_lm builds
    kwargs = dict(
        post_process=post_process,
        output_word_probs=output_word_probs,
        output_word_stats=output_word_stats,
        target_dictionary=target_dictionary,
        softmax_batch=softmax_batch,
        remove_bos_token=remove_bos_token,
        device=device,
    )
    if world_size_and_rank()[0] == 1:
        return original(models, source_dictionary, batch_iterator, **kwargs)
    tally = _Tally(source_dictionary, post_process, remove_bos_token)
    scorer_class = names["SequenceScorer"]

    class TallyingScorer(scorer_class):
        def generate(self, *args, **kw):
            hypos = super().generate(*args, **kw)
            tally.add(hypos)
            return hypos

    # --output-word-stats: eval_lm's `word_stats = dict()` is this dict, merged over the processes when
    # the shard ends (before eval_lm prints it), so its statistics are the whole split's, as its perplexity
    word_stats: Dict[str, Any] = {}

    def on_end() -> None:
        finish_all()
        if output_word_stats:
            _merge_word_stats(word_stats, names["WordStat"])

    totals = Totals(on_end)
    with swapped(names, SequenceScorer=TallyingScorer, StopwatchMeter=totals.timer, dict=lambda: word_stats):
        # the "Evaluated N tokens" line eval_lm prints after its loop reports the totals (see .eval_totals)
        original(models, source_dictionary, totals.wrap(batch_iterator), **kwargs)
    device = collective_device()
    sums = torch.stack([torch.as_tensor(x, dtype=torch.float64).to(device) for x in (tally.score_sum, tally.count)])
    dist.all_reduce(sums)
    score_sum, count = sums.tolist()
    loss = -score_sum / count / math.log(2) if count > 0 else 0.0
    logger.info(
        "expert parallelism: %d processes scored %d tokens in all: loss (base 2) %.8f, perplexity %.6f",
        totals.world_size,
        int(count),
        loss,
        2**loss,
    )
    return {"loss": loss, "perplexity": 2**loss}


def _merge_word_stats(word_stats: Dict[str, Any], word_stat) -> None:
    """Make ``word_stats`` (word -> fairseq's ``WordStat``) hold every process's counts (collective)."""
    fields = ("log_prob", "next_word_prob", "count", "missing_next_words")
    mine = [(w, s.is_bpe, *(float(getattr(s, f)) for f in fields)) for w, s in word_stats.items()]
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: Dict[str, Any] = {}
    for stats in everyone:
        for w, is_bpe, *values in stats:
            if w not in merged:
                merged[w] = word_stat(w, is_bpe)
            for f, v in zip(fields, values):
                setattr(merged[w], f, getattr(merged[w], f) + (int(v) if f in ("count", "missing_next_words") else v))
    word_stats.clear()
    word_stats.update(merged)


def _wants_distributed(cfg) -> bool:
    dt = cfg.distributed_training
    if dist.is_available() and dist.is_initialized():
        return False
    if dt.distributed_init_method is not None:
        return True
    torchrun = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    return torchrun and max(dt.distributed_world_size, int(os.environ.get("WORLD_SIZE", "1"))) > 1


def _call_main(cfg, main, **kwargs):
    """fairseq's ``call_main``; under torchrun, in the job torchrun started (:mod:`distributed.torchrun`).

    fairseq sizes a torchrun job by the CUDA devices a process sees, so on CPU, or with one visible
    GPU per process, a plain ``torchrun fairseq-eval-lm|generate|validate|train ...`` would run W
    one-process jobs (and fairseq-generate, which the plugin makes distributed, would call itself
    without end). Here it gets the settings ``python -m fairseq_stablemoe.launch`` adds.
    """
    from omegaconf import open_dict

    dt = cfg.distributed_training
    if dt.distributed_init_method is None:
        cpu = bool(cfg.common.cpu) or not torch.cuda.is_available()
        settings = torchrun_settings(os.environ, cpu=cpu, device_count=0 if cpu else torch.cuda.device_count())
        with open_dict(dt):
            for key, value in settings.items():
                setattr(dt, key, value)
    return _fairseq["call_main"](cfg, main, **kwargs)


def _generate_main(cfg):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if isinstance(cfg, Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    if _wants_distributed(cfg):  # fairseq-generate never starts a distributed job itself
        return distributed_utils.call_main(cfg, _generate_main)
    world, rank = world_size_and_rank()
    if world == 1:
        return _fairseq["generate_main"](cfg)
    names = _fairseq["generate_main"].__globals__  # fairseq_cli.generate's namespace
    with generate_totals(names, Totals(finish_all)):  # the summary: totals (see .eval_totals)
        results = cfg.common_eval.results_path
        if results is None:
            return _fairseq["generate_main"](cfg)
        os.makedirs(results, exist_ok=True)
        out = os.path.join(results, f"generate-{cfg.dataset.gen_subset}-rank{rank}-of{world}.txt")
        with open(out, "w", buffering=1, encoding="utf-8") as h:
            return names["_main"](cfg, h)


def _interactive_main(cfg, **kwargs):
    """Every process decodes every input (the MoE layers need all of them); rank 0 alone prints."""
    world, rank = world_size_and_rank()
    if world == 1 or rank == 0:
        return _fairseq["interactive_main"](cfg, **kwargs)
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            return _fairseq["interactive_main"](cfg, **kwargs)
        finally:
            sys.stdout = stdout


def _tool_modules(name: str) -> List[Any]:
    """The loaded module ``name``, and ``__main__`` when it is that module run with ``python -m``."""
    found = []
    if name in sys.modules:
        found.append(sys.modules[name])
    main = sys.modules.get("__main__")
    if main is not None and getattr(getattr(main, "__spec__", None), "name", None) == name:
        found.append(main)
    return found


def install() -> None:
    """Wrap fairseq's loading, ``distributed_main`` and the tools' entry points (idempotent)."""
    if not _fairseq:
        _fairseq.update(
            load_model_ensemble_and_task=checkpoint_utils.load_model_ensemble_and_task,
            distributed_main=distributed_utils.distributed_main,
            all_gather_list=distributed_utils.all_gather_list,
            call_main=distributed_utils.call_main,
        )
        checkpoint_utils.load_model_ensemble_and_task = _load_model_ensemble_and_task
        distributed_utils.distributed_main = _distributed_main
        distributed_utils.all_gather_list = _all_gather_list
        distributed_utils.call_main = _call_main
    for module in _tool_modules("fairseq_cli.eval_lm"):
        if module.eval_lm is not _eval_lm:
            _fairseq.setdefault("eval_lm", module.eval_lm)
            module.eval_lm = _eval_lm
    for module in _tool_modules("fairseq_cli.interactive"):
        if module.main is not _interactive_main:
            _fairseq.setdefault("interactive_main", module.main)
            module.main = _interactive_main
    for module in _tool_modules("fairseq_cli.generate"):
        if module.main is not _generate_main:
            _fairseq.setdefault("generate_main", module.main)
            module.main = _generate_main


install()
