"""stablemoe-consolidate: merge an expert-parallel run's per-rank checkpoints, or split one.

An expert-parallel run on ``W`` processes saves ``NAME-rank{r}-of{W}.pt`` on
every rank ``r`` (see :mod:`.rank_files`): the shared parameters, the rank's
``N / W`` experts (``experts.<i>`` = global expert ``r * N / W + i``) and its
optimizer state.

* ``stablemoe-consolidate DIR/NAME.pt`` (or any one of the rank files) writes
  ``DIR/NAME.pt``: an ordinary one-process fairseq checkpoint with all ``N``
  experts, for ``fairseq-eval-lm``, ``fairseq-generate``, hub loading or a
  one-process resume.
* ``stablemoe-consolidate DIR/NAME.pt --shards W2`` writes
  ``DIR/NAME-rank{r}-of{W2}.pt`` for ``r < W2`` (``W2`` divides ``N``, or is
  a multiple of it: replicas) from a one-process checkpoint, or from per-rank
  files of another ``W``, so that ``fairseq-train --save-dir DIR`` (or
  ``--restore-file DIR/NAME.pt``) resumes, and the evaluation tools run, on
  ``W2`` processes.

Memory: per-rank inputs are streamed (:func:`reshard_files`): at most one input
file is in memory at a time, plus the output file being built, whether merging
or re-sharding to another ``W``; a one-process input is read once and its parts
share its tensors. The tool prints its peak resident memory next to the largest
input's size.

The optimizer state is merged/split by parameter name (each checkpoint of this
plugin records the name behind every optimizer index); fairseq's flat
``--fp16``/``--bf16`` optimizer state cannot be, so use ``--no-optimizer``
there (and ``--reset-optimizer`` when resuming). Shared parameters and
everything else (update count, data iterator, lr scheduler, metrics) come from
rank 0, whose copies equal every other rank's.
"""

import copy
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..distributed.expert_parallel import ExpertShard, layout_problem
from .rank_files import (
    EXPERT_KEY,
    META_FORMAT,
    META_KEY,
    experts_per_layer,
    meta_of,
    rank_files_on_disk,
    rank_path,
    read,
)
from .reading import num_updates_of, parse_rank_path

logger = logging.getLogger(__name__)

State = Dict[str, Any]


class ConsolidateError(RuntimeError):
    """Input that cannot be merged or split; the message says why and what to do."""


FLAT_OPTIMIZER = (
    "holds fairseq's flat --fp16 optimizer state (one fp32 vector for all of a rank's parameters), "
    "which cannot be merged or split by expert: run again with --no-optimizer and resume training with "
    "--reset-optimizer (or train with --fp16-no-flatten-grads or --memory-efficient-fp16, whose optimizer "
    "state is per parameter)"
)


#: how an input is read whole (one name, so that tests can watch the reads)
load_file = read


# ----------------------------------------------------------------------------- name bookkeeping


def layout(world: int, num_experts: int) -> List[ExpertShard]:
    """Every rank's shard of a ``world``-process run (replicas included)."""
    return [ExpertShard(world, r, num_experts) for r in range(world)]


def merge_order(name_lists: Sequence[Sequence[str]], shards: Sequence[ExpertShard]) -> List[Tuple[str, int, str]]:
    """``(global name, rank, local name)`` in the order of a one-process model.

    Walks rank 0's names; at the first expert entry of a layer it emits the
    layer's experts of the ranks in order (their local ids shifted by the
    rank's first expert; of an expert's replicas, the first), which is where
    a one-process model (experts ``0 .. N-1`` in one list) has them. Shared
    names come from rank 0.
    """
    out: List[Tuple[str, int, str]] = []
    done = set()
    for name in name_lists[0]:
        m = EXPERT_KEY.match(name)
        if m is None:
            out.append((name, 0, name))
            continue
        layer = m.group("layer")
        if layer in done:
            continue
        done.add(layer)
        for rank, names in enumerate(name_lists):
            if shards[rank].rank % shards[rank].replicas:
                continue  # a replica: the first copy is taken
            for local in names:
                lm = EXPERT_KEY.match(local)
                if lm is not None and lm.group("layer") == layer:
                    glob = shards[rank].first_expert + int(lm.group("idx"))
                    out.append((f"{layer}{glob}{lm.group('rest')}", rank, local))
    return out


def split_order(names: Sequence[str], shard: ExpertShard) -> List[Tuple[str, str]]:
    """``(global name, local name)`` of the entries ``shard``'s rank keeps."""
    out = []
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local
    for name in names:
        m = EXPERT_KEY.match(name)
        if m is None:
            out.append((name, name))
            continue
        glob = int(m.group("idx"))
        if lo <= glob < hi:
            out.append((name, f"{m.group('layer')}{glob - lo}{m.group('rest')}"))
    return out


def _num_indices(opt: State) -> int:
    return sum(len(g["params"]) for g in opt["param_groups"])


def _optimizer_names(meta: Optional[Dict[str, Any]], opt: State, path: str) -> List[str]:
    names = (meta or {}).get("optimizer_param_names")
    if names is None:
        if meta is None:
            raise ConsolidateError(
                f"{path} has no record of its optimizer's parameter names (not saved by fairseq-stablemoe): "
                "run again with --no-optimizer and resume training with --reset-optimizer"
            )
        raise ConsolidateError(f"{path} {FLAT_OPTIMIZER}")
    if len(names) != _num_indices(opt):
        raise ConsolidateError(f"{path} {FLAT_OPTIMIZER}")
    return list(names)


def _by_group(opt: State, names: List[str]) -> List[List[str]]:
    return [[names[i] for i in g["params"]] for g in opt["param_groups"]]


def optimizer_merge_plan(
    groups: List[List[Dict[str, Any]]], names: List[List[str]], shards: Sequence[ExpertShard]
) -> Tuple[List[Dict[str, Any]], List[Tuple[int, int, int]], List[str]]:
    """How to merge the ranks' optimizer states, from their ``param_groups`` and index names alone.

    Returns the merged ``param_groups``, ``(merged index, rank, rank's index)`` for every
    parameter, and the merged index -> name list.
    """
    lookup = [{n: i for i, n in enumerate(ns)} for ns in names]
    new_groups, moves, merged_names = [], [], []
    for g, group in enumerate(groups[0]):
        lists = [[names[r][i] for i in groups[r][g]["params"]] for r in range(len(groups))]
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["params"] = []
        for glob, rank, local in merge_order(lists, shards):
            idx = len(merged_names)
            moves.append((idx, rank, lookup[rank][local]))
            new_group["params"].append(idx)
            merged_names.append(glob)
        new_groups.append(new_group)
    return new_groups, moves, merged_names


def split_optimizer(opt: State, names: List[str], shard: ExpertShard) -> Tuple[State, List[str]]:
    out = {k: v for k, v in opt.items() if k not in ("state", "param_groups")}
    lookup = {n: i for i, n in enumerate(names)}
    groups, state, local_names = [], {}, []
    for group, group_names in zip(opt["param_groups"], _by_group(opt, names)):
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["params"] = []
        for glob, local in split_order(group_names, shard):
            idx = len(local_names)
            old = lookup[glob]
            if old in opt["state"]:
                state[idx] = opt["state"][old]
            new_group["params"].append(idx)
            local_names.append(local)
        groups.append(new_group)
    out["state"], out["param_groups"] = state, groups
    return out, local_names


def _set_world(state: State, world_size: int, rank: int) -> None:
    """Record the process layout in the saved cfg/args (informational: training takes its own)."""
    cfg = state.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("distributed_training"), dict):
        cfg = dict(cfg)
        cfg["distributed_training"] = dict(cfg["distributed_training"])
        cfg["distributed_training"]["distributed_world_size"] = world_size
        cfg["distributed_training"]["distributed_rank"] = rank
        state["cfg"] = cfg
    args = state.get("args")
    if args is not None and hasattr(args, "distributed_world_size"):
        args = copy.copy(args)
        args.distributed_world_size, args.distributed_rank = world_size, rank
        state["args"] = args


# ----------------------------------------------------------------------------- merge / split


def summarise(state: State) -> Dict[str, Any]:
    """What the merge plan needs from one rank's file: records and names, no tensor data."""
    extra = state.get("extra_state") or {}
    opt = state.get("last_optimizer_state")
    return {
        "meta": meta_of(state),
        "model": list(state["model"]),
        "experts": experts_per_layer(state["model"]),
        "ema": list(extra["ema"]) if isinstance(extra.get("ema"), dict) else None,
        "optimizer_groups": copy.deepcopy(opt["param_groups"]) if opt is not None else None,
    }


def check_shards(summaries: List[Dict[str, Any]], paths: List[str]) -> Dict[str, Any]:
    """Validate a run's per-rank files (rank ``r`` at index ``r``, see :func:`summarise`); rank 0's record."""
    world = len(summaries)
    metas = []
    for r, (summary, path) in enumerate(zip(summaries, paths)):
        meta = summary["meta"]
        if meta is None:
            raise ConsolidateError(
                f"{path} has no expert-parallel record: it was not saved per rank by fairseq-stablemoe"
            )
        if meta["world_size"] != world or meta["rank"] != r:
            raise ConsolidateError(
                f"{path} says it is rank {meta['rank']} of {meta['world_size']} processes, not rank {r} of {world}: "
                "the file was renamed or copied from another run"
            )
        metas.append(meta)
    saves = {(m["run_id"], m["num_updates"], m["num_experts"]) for m in metas}
    if len(saves) > 1:
        listing = "; ".join(f"{p}: run {m['run_id']} at update {m['num_updates']}" for p, m in zip(paths, metas))
        raise ConsolidateError(f"the per-rank files are from different runs or updates ({listing})")
    num_experts = metas[0]["num_experts"]
    if layout_problem(num_experts, world):
        raise ConsolidateError(f"{num_experts} experts cannot be held by {world} processes")
    num_local = ExpertShard(world, 0, num_experts).num_local
    for summary, path in zip(summaries, paths):
        for layer, count in summary["experts"].items():
            if count != num_local:
                raise ConsolidateError(
                    f"{path} holds {count} experts in {layer[:-1]}, expected {num_local} "
                    f"({num_experts} experts on {world} processes)"
                )
    shared = [{k for k in s["model"] if EXPERT_KEY.match(k) is None} for s in summaries]
    for path, keys in zip(paths[1:], shared[1:]):
        if keys != shared[0]:
            diff = sorted(keys ^ shared[0])[:5]
            raise ConsolidateError(f"{path} and {paths[0]} hold different models (e.g. {diff})")
    return metas[0]


def _warn_if_copies_differ(merged: Dict[str, Any], state: State, path: str) -> None:
    """Shared tensors against rank 0's (already in ``merged``)."""
    differ = [
        k
        for k, v in state["model"].items()
        if EXPERT_KEY.match(k) is None and torch.is_tensor(v) and k in merged and not torch.equal(merged[k], v)
    ]
    if differ:
        logger.warning(
            "%s: %d tensors differ from rank 0's copies (e.g. %s); rank 0's are kept", path, len(differ), differ[0]
        )


def _warn_if_replicas_differ(merged: Dict[str, Any], state: State, shard: ExpertShard, path: str) -> None:
    if shard.replicas == 1 or shard.rank % shard.replicas == 0:
        return
    differ = []
    for local, v in state["model"].items():
        m = EXPERT_KEY.match(local)
        if m is not None and torch.is_tensor(v):
            glob = f"{m.group('layer')}{shard.first_expert + int(m.group('idx'))}{m.group('rest')}"
            if glob in merged and not torch.equal(merged[glob], v):
                differ.append(local)
    if differ:
        logger.warning(
            "%s: %d expert tensors differ from their first replica's (e.g. %s); the first copy is kept",
            path,
            len(differ),
            differ[0],
        )


def _plan(paths: List[str], keep_optimizer: bool):
    """Records, names and merge plans of a run's per-rank files, read memory-mapped (no tensor data)."""
    summaries = []
    for path in paths:
        mapped = read(path, mmap=True)
        summaries.append(summarise(mapped))
        del mapped
    meta = check_shards(summaries, paths)
    shards = layout(len(paths), meta["num_experts"])
    model_plan = merge_order([s["model"] for s in summaries], shards)
    ema_plan = merge_order([s["ema"] for s in summaries], shards) if summaries[0]["ema"] is not None else None
    opt_plan = None
    if keep_optimizer and summaries[0]["optimizer_groups"] is not None:
        names = [
            _optimizer_names(s["meta"], {"param_groups": s["optimizer_groups"]}, p) for s, p in zip(summaries, paths)
        ]
        opt_plan = optimizer_merge_plan([s["optimizer_groups"] for s in summaries], names, shards)
    return meta, shards, model_plan, ema_plan, opt_plan


def reshard_files(paths: List[str], world: int = 1, keep_optimizer: bool = True) -> Iterator[State]:
    """A run's per-rank files (rank ``r`` at index ``r``) as the checkpoints of ``world`` processes.

    ``world=1`` gives one ordinary one-process checkpoint with all experts; any
    other ``world`` gives per-rank checkpoints, yielded rank by rank. Holds at
    most one input file in memory at a time, plus the output being built: a
    first pass reads every file's record and names memory-mapped (no tensor
    data); then, for each output, the inputs it needs (rank 0 for the shared
    parameters and the training state, and the ranks holding its experts) are
    read one by one and their entries moved into it. Every output rank's
    experts therefore cost one read of the inputs that hold them.
    """
    meta, shards, model_plan, ema_plan, opt_plan = _plan(paths, keep_optimizer)
    check_target(meta["num_experts"], world)
    warned: set = set()
    for target in layout(world, meta["num_experts"]):
        yield _build_part(paths, target, world, meta, shards, model_plan, ema_plan, opt_plan, warned)


def _build_part(paths, target, world, meta, shards, model_plan, ema_plan, opt_plan, warned) -> State:
    """The checkpoint of ``target``'s rank, reading the inputs it needs one by one (see :func:`reshard_files`)."""
    rename = dict(split_order([glob for glob, _, _ in model_plan], target))
    ema_rename = dict(split_order([glob for glob, _, _ in ema_plan], target)) if ema_plan is not None else {}
    wanted_opt = []
    if opt_plan is not None:
        keep = set(dict(split_order(opt_plan[2], target)))
        wanted_opt = [(idx, r, old) for idx, r, old in opt_plan[1] if opt_plan[2][idx] in keep]
    needed = {0} | {r for glob, r, _ in model_plan if glob in rename}
    needed |= {r for glob, r, _ in ema_plan or () if glob in ema_rename} | {r for _, r, _ in wanted_opt}

    out: State = {}
    model: Dict[str, Any] = {}  # by global name
    ema: Dict[str, Any] = {}
    opt_state: Dict[int, Any] = {}  # by merged (one-process) index
    for rank in sorted(needed):
        state = load_file(paths[rank])
        if rank == 0:
            out = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
            if "last_optimizer_state" in state and opt_plan is not None:
                out["last_optimizer_state"] = {
                    k: v for k, v in state["last_optimizer_state"].items() if k not in ("state", "param_groups")
                }
        elif paths[rank] not in warned:
            warned.add(paths[rank])
            _warn_if_copies_differ(model, state, paths[rank])
            _warn_if_replicas_differ(model, state, shards[rank], paths[rank])
        for glob, r, local in model_plan:
            if r == rank and glob in rename:
                model[glob] = state["model"][local]
        for glob, r, local in ema_plan or ():
            if r == rank and glob in ema_rename:
                ema[glob] = state["extra_state"]["ema"][local]
        for idx, r, old in wanted_opt:
            if r == rank and old in state["last_optimizer_state"]["state"]:
                opt_state[idx] = state["last_optimizer_state"]["state"][old]
        del state

    out["model"] = {rename[glob]: model[glob] for glob, _, _ in model_plan if glob in rename}
    extra = dict(out["extra_state"])
    if ema_plan is not None:
        extra["ema"] = {ema_rename[glob]: ema[glob] for glob, _, _ in ema_plan if glob in ema_rename}
    if "ema_fp32_params" in extra:
        logger.warning("dropping the EMA fp32 copy (ema_fp32_params): it is rebuilt from the EMA model on load")
        del extra["ema_fp32_params"]
    new_meta = dict(meta, world_size=world, rank=target.rank, optimizer_param_names=None, format=META_FORMAT)
    new_meta["consolidated_from" if world == 1 else "resharded_from"] = len(paths)
    if opt_plan is not None:
        merged = {"state": opt_state, "param_groups": opt_plan[0]}
        split, new_meta["optimizer_param_names"] = split_optimizer(merged, opt_plan[2], target)
        out["last_optimizer_state"].update(split)
    extra[META_KEY] = new_meta
    out["extra_state"] = extra
    _set_world(out, world, target.rank)
    return out


def merge_files(paths: List[str], keep_optimizer: bool = True) -> State:
    """One one-process checkpoint (all experts) from a run's per-rank files (see :func:`reshard_files`)."""
    return next(reshard_files(paths, 1, keep_optimizer))


def one_process_experts(state: State, path: str) -> int:
    """The expert count ``N`` of a one-process checkpoint (refusing per-rank ones)."""
    meta = meta_of(state)
    if meta is not None and meta["world_size"] != 1:
        raise ConsolidateError(
            f"{path} is the rank-{meta['rank']} file of a {meta['world_size']}-process run, not a one-process "
            f"checkpoint: name the run's files instead (stablemoe-consolidate {path} ...)"
        )
    counts = set(experts_per_layer(state["model"]).values())
    if not counts:
        raise ConsolidateError(f"{path} has no MoE experts (experts.<i> parameters)")
    if len(counts) > 1:
        raise ConsolidateError(f"{path} has MoE layers with different expert counts {sorted(counts)}")
    num = counts.pop()
    if meta is not None and meta["num_experts"] != num:
        raise ConsolidateError(f"{path} holds {num} experts per layer but records {meta['num_experts']}")
    return num


def check_target(num_experts: int, world: int) -> None:
    if world < 1 or layout_problem(num_experts, world):
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConsolidateError(
            f"{num_experts} experts cannot be split over {world} processes (each holds num_experts / processes, "
            f"or each expert has processes / num_experts replicas): use --shards in {divisors} or a multiple "
            f"of {num_experts}"
        )


def split_checkpoint(state: State, world: int, path: str = "checkpoint", keep_optimizer: bool = True) -> List[State]:
    """Per-rank checkpoints for ``world`` processes from a one-process checkpoint."""
    num_experts = one_process_experts(state, path)
    check_target(num_experts, world)
    meta = dict(meta_of(state) or {})
    meta.setdefault("run_id", None)
    meta.setdefault("num_updates", num_updates_of(state))
    meta["expert_layers"] = meta.get("expert_layers") or sorted(experts_per_layer(state["model"]))
    opt = state.get("last_optimizer_state")
    names = _optimizer_names(meta_of(state), opt, path) if (opt is not None and keep_optimizer) else None
    parts = []
    for shard in layout(world, num_experts):
        rank = shard.rank
        part = dict(state)
        part["model"] = {local: state["model"][glob] for glob, local in split_order(list(state["model"]), shard)}
        extra = dict(state["extra_state"])
        if isinstance(extra.get("ema"), dict):
            extra["ema"] = {local: extra["ema"][glob] for glob, local in split_order(list(extra["ema"]), shard)}
        extra.pop("ema_fp32_params", None)
        part_meta = dict(meta, format=META_FORMAT, world_size=world, rank=rank, num_experts=num_experts)
        part_meta["optimizer_param_names"] = None
        if opt is not None:
            if keep_optimizer:
                part["last_optimizer_state"], part_meta["optimizer_param_names"] = split_optimizer(opt, names, shard)
            else:
                del part["last_optimizer_state"]
        extra[META_KEY] = part_meta
        part["extra_state"] = extra
        _set_world(part, world, rank)
        parts.append(part)
    return parts


# ----------------------------------------------------------------------------- files and CLI


def find_input(path: str, want_split: bool) -> Tuple[str, Optional[int]]:
    """``(base name, world size of its per-rank files or None for a one-process file)``."""
    parsed = parse_rank_path(path)
    if parsed is not None:
        return parsed[0], parsed[2]
    if want_split and os.path.isfile(path):
        return path, None
    on_disk = rank_files_on_disk(path)
    if len(on_disk) > 1:
        examples = ", ".join(rank_path(path, 0, w) for w in on_disk)
        raise ConsolidateError(
            f"found per-rank files of {path} for {sorted(on_disk)} processes: name one of the runs' files ({examples})"
        )
    if on_disk:
        return path, next(iter(on_disk))
    if os.path.isfile(path):
        return path, None
    raise ConsolidateError(f"no checkpoint {path} and no per-rank files {path[:-3]}-rank*-of*.pt")


def shard_paths(base: str, world: int) -> List[str]:
    paths = [rank_path(base, r, world) for r in range(world)]
    missing = [f"{p} (rank {r} of {world})" for r, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        raise ConsolidateError(f"missing per-rank checkpoint file(s): {', '.join(missing)}")
    return paths
