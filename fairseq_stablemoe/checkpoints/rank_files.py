"""Per-rank checkpoint files of expert-parallel runs: names, records, reading and checks.

An expert-parallel run on ``W`` processes saves ``NAME-rank{r}-of{W}.pt`` on every rank ``r``
(:mod:`fairseq_hooks.trainer_checkpoints` makes fairseq's Trainer do so). Why not fairseq's ``-rank-{r}`` (BASE layers)
or ``-shard{r}`` (FSDP): the name records the number of processes, so a file set written for W
processes is never read by a job of another size (the error names ``stablemoe-consolidate ...
--shards W``), and ``stablemoe-consolidate`` finds a run's files from any one of them.

Every file of a MoE model carries a record in ``extra_state[META_KEY]`` (:func:`meta_of`): rank,
world size, expert count, run id, update count and the names behind the optimizer's indices.
This module has what the training patch (:mod:`fairseq_hooks.trainer_checkpoints`), the evaluation tools
(:mod:`fairseq_hooks.eval_tools`), :mod:`.consolidation` and :mod:`cli.fluctuation` share: the names, one
reader (:func:`read`), the record, and the checks made before a load. It does not import
fairseq's Trainer.
"""

import glob
import logging
import os
import re
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from ..distributed.expert_parallel import ExpertShard
from .reading import (
    CheckpointLoadError,
    _readable_beside,
    load_checkpoint_file,
    parse_rank_path,
    readable_updates,
    unreadable,
)

logger = logging.getLogger(__name__)

#: key of the plugin's record in a checkpoint's ``extra_state``
META_KEY = "stablemoe_experts"
META_FORMAT = 1
#: ``<layer prefix>experts.<i>.<rest>`` in a model state dict
EXPERT_KEY = re.compile(r"^(?P<layer>.*\.experts\.)(?P<idx>\d+)(?P<rest>\..+)$")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not fit the run (or is incomplete); the message says how to fix it."""


# ----------------------------------------------------------------------------- names


def shard_tag(rank: int, world_size: int) -> str:
    return f"-rank{rank}-of{world_size}"


def rank_path(base: str, rank: int, world_size: int) -> str:
    """``dir/name.pt`` -> ``dir/name-rank{rank}-of{world_size}.pt``."""
    if not base.endswith(".pt"):
        raise ValueError(f"checkpoint names end with .pt: {base}")
    return base[:-3] + shard_tag(rank, world_size) + ".pt"


def rank_files_on_disk(base: str) -> Dict[int, List[str]]:
    """The per-rank files of ``base`` that exist, by the world size in their names."""
    found: Dict[int, List[str]] = {}
    for path in glob.glob(glob.escape(base[:-3]) + "-rank*-of*.pt"):
        parsed = parse_rank_path(path)
        if parsed is not None and parsed[0] == base:
            found.setdefault(parsed[2], []).append(path)
    return {w: sorted(p) for w, p in sorted(found.items())}


# ----------------------------------------------------------------------------- reading and records


def read(path: str, mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint on the CPU, through the plugin's one reader (:func:`.reading.load_checkpoint_file`:
    ``weights_only`` with the allow-list; an unreadable file raises ``CheckpointLoadError`` saying why).

    ``mmap=True`` leaves the tensors on disk until touched (for records and names); a file in
    the legacy (non-zip) format, which cannot be mapped, is then read whole.
    """
    return load_checkpoint_file(path, mmap=mmap)


def meta_of(state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    extra = state.get("extra_state") or {}
    return extra.get(META_KEY) if isinstance(extra, dict) else None


def experts_per_layer(model_state: Dict[str, Any]) -> Dict[str, int]:
    """Number of experts held in a model state dict, by layer prefix."""
    ids: Dict[str, set] = {}
    for key in model_state:
        m = EXPERT_KEY.match(key)
        if m is not None:
            ids.setdefault(m.group("layer"), set()).add(int(m.group("idx")))
    return {layer: len(v) for layer, v in ids.items()}


# ----------------------------------------------------------------------------- checks before a load


def shard_problem(path: str, state: Dict[str, Any], shard: ExpertShard, prefixes: List[str]) -> Optional[str]:
    """Why the checkpoint ``path`` does not fit this process's shard (None if it does)."""
    W, r = shard.world_size, shard.rank
    meta = meta_of(state)
    counts = experts_per_layer(state.get("model") or {})
    if meta is not None:
        saved_w, saved_r, saved_n = meta["world_size"], meta["rank"], meta["num_experts"]
        if saved_n != shard.num_experts:
            return (
                f"{path} was trained with {saved_n} experts per MoE layer but this run has "
                f"--num-experts {shard.num_experts}: use the run's --num-experts"
            )
        if saved_w != W:
            if saved_w == 1:
                return (
                    f"{path} is a one-process checkpoint holding all {saved_n} experts, but this run has "
                    f"{W} processes (each holds {shard.num_local}): split it into per-rank files with "
                    f"`stablemoe-consolidate {path} --shards {W}` and resume from that name (--restore-file "
                    f"{path} or its directory as --save-dir; each rank reads its -rankR-of{W} file)"
                )
            if W == 1:
                return (
                    f"{path} is the rank-{saved_r} file of a {saved_w}-process expert-parallel run "
                    f"(it holds {saved_n // saved_w} of the {saved_n} experts); to resume or evaluate on one "
                    f"process, consolidate the run's files with `stablemoe-consolidate {path}`"
                )
            return (
                f"{path} belongs to a {saved_w}-process expert-parallel run but this run has {W} processes: "
                f"re-shard it with `stablemoe-consolidate {path} --shards {W}`"
            )
        if saved_r != r:
            return (
                f"{path} holds the experts of rank {saved_r} but is being loaded by rank {r}: every rank "
                f"loads its own file (pass the name without -rankR-ofW to --restore-file)"
            )
    elif W > 1:
        return (
            f"{path} has no expert-parallel record (it was not saved per rank by fairseq-stablemoe); if it "
            f"is a one-process checkpoint, split it with `stablemoe-consolidate {path} --shards {W}`"
        )
    for prefix in prefixes:
        got = counts.get(prefix)
        if got is not None and got != shard.num_local:
            return (
                f"{path} holds {got} experts in {prefix[:-1]} but this process holds {shard.num_local} "
                f"(--num-experts {shard.num_experts} on {W} process(es)); "
                + (
                    f"split it with `stablemoe-consolidate {path} --shards {W}`"
                    if W > 1 and got == shard.num_experts
                    else "check --num-experts and the number of processes"
                )
            )
    return None


def _alternatives(filename: str, shard: ExpertShard) -> List[str]:
    """Checkpoints of the same name saved with another number of processes (what to convert)."""
    tag = shard_tag(shard.rank, shard.world_size) + ".pt" if shard.is_parallel else ".pt"
    if not filename.endswith(tag):
        return []
    base = filename[: -len(tag)] + ".pt"
    hints = []
    if shard.is_parallel and os.path.isfile(base):
        hints.append(
            f"{base} (a one-process checkpoint): split it with "
            f"`stablemoe-consolidate {base} --shards {shard.world_size}`"
        )
    for world, paths in rank_files_on_disk(base).items():
        if world == shard.world_size:
            continue
        first = rank_path(base, 0, world)
        if shard.is_parallel:
            hints.append(
                f"{first} ... (per-rank files of {world} processes): re-shard them with "
                f"`stablemoe-consolidate {first} --shards {shard.world_size}`"
            )
        else:
            hints.append(
                f"{first} ... (per-rank files of {world} processes): consolidate them with "
                f"`stablemoe-consolidate {first}`"
            )
    return hints


def _report(filename: str, shard: ExpertShard, prefixes: List[str]) -> Dict[str, Any]:
    report: Dict[str, Any] = {"rank": shard.rank, "file": filename, "exists": os.path.isfile(filename)}
    if report["exists"]:
        try:
            state = read(filename, mmap=True)
        except CheckpointLoadError as e:  # reported on every rank rather than raised on this one only
            report["problem"] = str(e)
            return report
        meta = meta_of(state) or {}
        report["run_id"] = meta.get("run_id")
        report["num_updates"] = meta.get("num_updates")
        report["problem"] = shard_problem(filename, state, shard, prefixes)
        del state
    else:
        report["alternatives"] = _alternatives(filename, shard)
    return report


def check_before_load(filename: str, shard: ExpertShard, prefixes: List[str]) -> None:
    """Raise :class:`CheckpointMismatchError` on every rank if any rank's file is wrong or missing.

    ``prefixes`` are the state-dict prefixes of the model's experts. One
    ``all_gather_object`` on an expert-parallel model, so that all ranks take
    the same decision (load, start from scratch, or stop).
    """
    mine = _report(filename, shard, prefixes)
    if shard.is_parallel:
        reports: List[Any] = [None] * shard.world_size
        dist.all_gather_object(reports, mine)
    else:
        reports = [mine]

    problems = [r["problem"] for r in reports if r["exists"] and r.get("problem")]
    if problems:
        raise CheckpointMismatchError("cannot resume from this checkpoint: " + "; ".join(dict.fromkeys(problems)))
    missing = [r for r in reports if not r["exists"]]
    if missing and len(missing) < len(reports):
        names = ", ".join(f"{r['file']} (rank {r['rank']})" for r in missing)
        have = ", ".join(r["file"] for r in reports if r["exists"])
        raise CheckpointMismatchError(
            f"missing per-rank checkpoint file(s): {names}. Every rank of an expert-parallel run needs its own "
            f"file (found: {have}); restore the missing file or resume from another checkpoint"
        )
    if missing:  # nothing to resume from, unless it was saved with another number of processes
        hints = [h for r in reports for h in r.get("alternatives", [])]
        if hints:
            wanted = reports[0]["file"] if shard.is_parallel else filename
            what = f"per-rank checkpoint files {wanted} ..." if shard.is_parallel else f"checkpoint {filename}"
            raise CheckpointMismatchError(
                f"no {what} for {shard.world_size} process(es), but found " + "; ".join(dict.fromkeys(hints))
            )
        return
    saves = {(r["run_id"], r["num_updates"]) for r in reports}
    if len(saves) > 1:
        listing = "; ".join(f"{r['file']}: run {r['run_id']} at update {r['num_updates']}" for r in reports)
        raise CheckpointMismatchError(
            f"the per-rank checkpoint files are from different runs or updates ({listing}): all ranks must "
            "resume from the files of one save"
        )


def newest_intact(filename: str, shard: ExpertShard) -> Optional[str]:
    """The newest checkpoint next to ``filename`` that every rank can read (same suffix)."""
    found = _readable_beside(filename)
    candidates = sorted(found, reverse=True)
    if shard.is_parallel:  # the newest save every rank has
        everyone: List[Any] = [None] * shard.world_size
        dist.all_gather_object(everyone, candidates)
        common = set(candidates).intersection(*map(set, everyone))
        candidates = sorted(common, reverse=True)
    return found[candidates[0]] if candidates else None


#: set to 1 to let a resume fall back to an older checkpoint than the one asked for (see fall_back_if_unreadable)
ALLOW_OLDER_ENV = "STABLEMOE_ALLOW_OLDER_CHECKPOINT"


def is_truncated_copy(path: str, source: str, chunk: int = 1 << 20) -> bool:
    """Whether ``path``'s bytes are a prefix of ``source``'s: a copy of ``source`` cut short (or whole)."""
    try:
        if os.path.getsize(path) > os.path.getsize(source):
            return False
        with open(path, "rb") as a, open(source, "rb") as b:
            while True:
                block = a.read(chunk)
                if not block:
                    return True
                if block != b.read(len(block)):
                    return False
    except OSError:
        return False


def fall_back_if_unreadable(filename: str, shard: ExpertShard) -> str:
    """The file to resume from when ``filename`` is cut short or corrupt.

    fairseq writes each checkpoint atomically and then *copies* it to
    ``checkpoint_last.pt``; a kill during the copy leaves a truncated file
    whose bytes are a prefix of the checkpoint it copies. That checkpoint holds
    the same update, and the resume uses it. Any other fallback would resume
    from an older update than the one asked for: an error, unless
    ``STABLEMOE_ALLOW_OLDER_CHECKPOINT=1``.
    """
    why = unreadable(filename)
    broken = why is not None
    if shard.is_parallel:
        flags: List[Any] = [None] * shard.world_size
        dist.all_gather_object(flags, broken)
        broken = any(flags)
    if not broken:
        return filename
    fallback = newest_intact(filename, shard)
    if fallback is None:
        raise CheckpointMismatchError(
            f"checkpoint {filename} cannot be read: it {why or 'cannot be read on another rank'}; no other "
            f"readable checkpoint is in {os.path.dirname(filename) or '.'}: delete it to start from scratch"
        )
    same = is_truncated_copy(filename, fallback)
    if shard.is_parallel:
        votes: List[Any] = [None] * shard.world_size
        dist.all_gather_object(votes, same)
        same = all(votes)
    if same:
        logger.warning(
            "%s is truncated (a run killed while fairseq copied %s to it): resuming from %s, the same save",
            filename,
            fallback,
            fallback,
        )
        return fallback
    updates = readable_updates(fallback)
    if os.environ.get(ALLOW_OLDER_ENV) == "1":
        logger.warning(
            "%s is truncated or corrupt: resuming from %s (update %s), an older save, as %s=1 allows",
            filename,
            fallback,
            updates,
            ALLOW_OLDER_ENV,
        )
        return fallback
    raise CheckpointMismatchError(
        f"checkpoint {filename} cannot be read: it {why or 'cannot be read on another rank'}; it is not a copy of "
        f"any readable checkpoint. The last readable checkpoint beside it is {fallback} (update {updates}), which "
        "may be older than the "
        f"save asked for. To resume from it, set {ALLOW_OLDER_ENV}=1 (or pass --restore-file {fallback}); to "
        f"start from scratch, delete {filename}"
    )
