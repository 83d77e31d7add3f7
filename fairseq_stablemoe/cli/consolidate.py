"""``stablemoe-consolidate``: the command line of :mod:`..checkpoints.consolidation`."""

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from ..checkpoints import consolidation
from ..checkpoints.consolidation import (
    ConsolidateError,
    State,
    find_input,
    reshard_files,
    shard_paths,
    split_checkpoint,
)
from ..checkpoints.rank_files import meta_of, rank_path
from ..checkpoints.reading import CheckpointLoadError

logger = logging.getLogger(__name__)


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, which starts afresh with the program (``ru_maxrss``
    carries over the peak of the process that started it); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def save(state: State, path: str, force: bool) -> None:
    from fairseq.checkpoint_utils import torch_persistent_save

    if os.path.exists(path) and not force:
        raise ConsolidateError(f"{path} exists: pass --force to overwrite it, or -o for another name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch_persistent_save(state, path)  # temporary file, then rename


def _output_base(output: Optional[str], base: str) -> str:
    if output is None:
        return base
    if output.endswith(os.sep) or os.path.isdir(output):
        return os.path.join(output, os.path.basename(base))
    if not output.endswith(".pt"):
        raise ConsolidateError(f"-o {output}: give a checkpoint name ending in .pt or a directory")
    return output


def run(args: argparse.Namespace) -> List[str]:
    keep_optimizer = not args.no_optimizer
    base, world = find_input(args.input, want_split=args.shards is not None)
    out_base = _output_base(args.output, base)
    if world is None and args.shards is None:
        raise ConsolidateError(
            f"{base} is already a one-process checkpoint; to split it for W processes pass --shards W"
        )
    if world is not None and world == args.shards and os.path.abspath(out_base) == os.path.abspath(base):
        raise ConsolidateError(f"{base} is already split for {world} processes")
    outs = [out_base] if args.shards is None else [rank_path(out_base, r, args.shards) for r in range(args.shards)]
    for path in outs:
        if os.path.exists(path) and not args.force:
            raise ConsolidateError(f"{path} exists: pass --force to overwrite it, or -o for another name")

    if world is not None:
        inputs = shard_paths(base, world)
        parts = reshard_files(inputs, args.shards or 1, keep_optimizer)
        source = f"{world} per-rank files {inputs[0]} ..."
    else:
        inputs = [base]
        parts = iter(split_checkpoint(consolidation.load_file(base), args.shards, base, keep_optimizer))
        source = base
    meta: Dict[str, Any] = {}
    optimizer = False
    for path in outs:  # written one by one: one output part in memory at a time (zip() would hold the last)
        part = next(parts)
        save(part, path, force=True)
        meta, optimizer = meta_of(part) or {}, "last_optimizer_state" in part
        del part
    print(
        f"stablemoe-consolidate: {source} -> {', '.join(outs)} "
        f"({meta.get('num_experts', '?')} experts, update {meta.get('num_updates', '?')}, "
        f"optimizer state {'kept' if optimizer else 'dropped'}; "
        f"peak memory {peak_memory_mib():.1f} MiB, largest input file "
        f"{max(os.path.getsize(p) for p in inputs) / 2**20:.1f} MiB, "
        f"output {sum(os.path.getsize(p) for p in outs) / 2**20:.1f} MiB)"
    )
    return outs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stablemoe-consolidate",
        description="Merge the per-rank checkpoints of an expert-parallel StableMoE run into one ordinary "
        "fairseq checkpoint (all experts), or split a checkpoint into per-rank files for W processes.",
    )
    p.add_argument(
        "input",
        help="the run's checkpoint name (e.g. checkpoints/checkpoint_last.pt, meaning its -rankR-ofW.pt "
        "files), one of its per-rank files, or (with --shards) a one-process checkpoint",
    )
    p.add_argument(
        "-o",
        "--output",
        help="output checkpoint name (default: INPUT without -rankR-ofW); with --shards the per-rank files "
        "are OUTPUT-rankR-ofW.pt; a directory keeps the input's file name",
    )
    p.add_argument("--shards", type=int, metavar="W", help="write per-rank files for W processes (W divides N)")
    p.add_argument(
        "--no-optimizer",
        action="store_true",
        help="drop the optimizer state (needed for --fp16's flat state; resume with --reset-optimizer)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def cli_main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConsolidateError, CheckpointLoadError, FileNotFoundError) as e:
        print(f"stablemoe-consolidate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main()
