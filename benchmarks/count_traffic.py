"""Collective traffic of StableMoE's routing counts per update and MoE layer, against the process count W.

The counts (:mod:`fairseq_stablemoe.modules.routing_counts`) count each process's own tokens
locally and sum the ``(V, N)`` int64 tables over the processes (one ``all_reduce``) only where they
are read (``new``), rather than all-gathering every process's ``(token id, expert)`` codes in every
stage-1 training forward (``old``). The sums happen at the end of each logging window, where the
refit window opens, at the stage boundary and before each checkpoint. Per MoE layer and process,
with ``T`` tokens per process and forward (the largest process's), ``F`` forwards per update
(``--update-freq``), ``w`` updates per window (``--log-interval``)::

    old = 8 * W * T * F          bytes received per update (all_gather of W x T int64 codes; 0 on W = 1)
    new = 8 * V * N / w          bytes handed to all_reduce per update (0 on W = 1)
          + 8 * V * N per run at the refit window's start and at the boundary, and per checkpoint

(``new`` is the size of the reduced tensor; a ring all-reduce sends and receives ``2 (W-1)/W`` of
it per process.) The table is the formula. ``--measure`` also runs a short stage-1 run of an
expert-parallel StableMoE layer on 2 gloo processes, records the tensors that the counts hand to
``torch.distributed`` collectives (calls made from ``routing_counts.py``), and checks them against
the formula for that run.

    python benchmarks/count_traffic.py [--tokens 16384] [--vocab 50000] [--experts 32 64] [--window 100]
        [--measure] [--markdown FILE]
"""

import argparse
import datetime
import functools
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from markdown import table, write_block  # noqa: E402

WORLDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def old_bytes(world: int, tokens: int, update_freq: int = 1) -> int:
    """Per update: the all-gather of every process's ``tokens`` int64 codes, in each forward."""
    return 0 if world == 1 else 8 * world * tokens * update_freq


def new_bytes(world: int, vocab: int, experts: int, window: int) -> float:
    """Per update: one all-reduce of the ``(V, N)`` int64 table per window."""
    return 0.0 if world == 1 else 8 * vocab * experts / window


def _mb(b: float) -> str:
    return f"{b / 2**20:.3f}"


def formula_rows(opts):
    rows = []
    for n in opts.experts:
        for w in WORLDS:
            old, new = old_bytes(w, opts.tokens, opts.update_freq), new_bytes(w, opts.vocab, n, opts.window)
            rows.append([w, n, _mb(old), _mb(new), f"{old / new:.0f}" if new else "-"])
    return rows


# ----------------------------------------------------------------------------- measurement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_counts_collectives(calls):
    """Wrap every tensor collective of ``torch.distributed``; append ``(name, bytes)`` for the calls made
    by routing_counts.py (the tensors handed to the collective)."""
    names = ("all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all", "all_to_all_single", "broadcast")

    def wrap(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("routing_counts.py"):
                flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else [a])]
                calls.append((name, sum(t.numel() * t.element_size() for t in flat if torch.is_tensor(t))))
            return fn(*args, **kwargs)

        return wrapped

    for name in names:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _worker(rank, port, opts, queue):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
        from fairseq_stablemoe.modules.routing_counts import flush_routing_counts
        from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

        V, N, D, W = opts.measure_vocab, 4, 16, 2
        torch.manual_seed(0)
        layer = StableMoELayer(
            D, 32, N, 1, vocab_size=V, padding_idx=1, two_stage_updates=10**6, routing_window=opts.measure_window
        ).train()
        calls, max_tokens = [], []
        _record_counts_collectives(calls)
        g = torch.Generator().manual_seed(rank)
        for u in range(opts.measure_updates):
            layer.set_num_updates(u)
            T = opts.measure_tokens - 37 * rank  # processes with different token counts
            tokens = torch.randint(2, V, (T,), generator=g)
            counts = torch.tensor([T])
            all_counts = [torch.empty_like(counts) for _ in range(W)]
            dist.all_gather(all_counts, counts)  # not from routing_counts.py: not recorded
            max_tokens.append(max(int(c) for c in all_counts))
            layer(torch.randn(T, D, generator=g), tokens)
            layer.set_num_updates(u + 1)
            if u + 1 == opts.measure_checkpoint_at:
                flush_routing_counts(layer)  # what every rank does before saving a checkpoint
        queue.put((rank, calls, max_tokens))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:
        queue.put((rank, repr(e), None))
        raise


def measure(opts):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, opts, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(2):
            rank, calls, max_tokens = queue.get(timeout=600)
            if max_tokens is None:
                raise RuntimeError(f"rank {rank}: {calls}")
            got[rank] = (calls, max_tokens)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    V, N, U, w = opts.measure_vocab, 4, opts.measure_updates, opts.measure_window
    flushes = U // w + (opts.measure_checkpoint_at % w != 0 and 0 < opts.measure_checkpoint_at <= U)
    expected = [("all_reduce", 8 * V * N)] * flushes
    lines = []
    for rank, (calls, max_tokens) in sorted(got.items()):
        old = sum(8 * 2 * t for t in max_tokens)
        ok = calls == expected
        lines.append(
            f"measured rank={rank} world=2 vocab={V} experts={N} updates={U} window={w} "
            f"checkpoint_at={opts.measure_checkpoint_at} collectives={len(calls)} "
            f"({', '.join(sorted({c for c, _ in calls})) or 'none'}) bytes={sum(b for _, b in calls)} "
            f"formula_bytes={flushes * 8 * V * N} (= {flushes} flushes x 8VN) matches={ok} "
            f"old_formula_bytes={old} (= sum over forwards of 8 W T_max)"
        )
        if not ok:
            raise SystemExit("\n".join(lines) + f"\nrank {rank}: calls {calls}, expected {expected}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="T: tokens per process and forward")
    parser.add_argument("--vocab", type=int, default=50000, help="V: token ids")
    parser.add_argument("--experts", type=int, nargs="+", default=[32, 64], help="N")
    parser.add_argument("--window", type=int, default=100, help="updates per logging window (--log-interval)")
    parser.add_argument("--update-freq", type=int, default=1, help="forwards per update (--update-freq)")
    parser.add_argument("--measure", action="store_true", help="also measure a short 2-process gloo run")
    parser.add_argument("--measure-vocab", type=int, default=1000)
    parser.add_argument("--measure-tokens", type=int, default=512)
    parser.add_argument("--measure-updates", type=int, default=12)
    parser.add_argument("--measure-window", type=int, default=4)
    parser.add_argument("--measure-checkpoint-at", type=int, default=6, help="a checkpoint inside a window")
    parser.add_argument("--markdown", type=Path, help="also write the table into this page")
    opts = parser.parse_args()

    header = ["W", "N", "old MB/update", "new MB/update", "old/new"]
    rows = formula_rows(opts)
    print(
        f"routing-count traffic per MoE layer, process and update: T={opts.tokens} V={opts.vocab} "
        f"window={opts.window} update_freq={opts.update_freq}; old = 8 W T F, new = 8 V N / window "
        "(+ 8 V N at the refit start, the boundary and each checkpoint)"
    )
    for row in rows:
        print(" ".join(f"{h.split()[0]}={v}" for h, v in zip(["W", "N", "old_MB", "new_MB", "ratio"], row)))
    measured = measure(opts) if opts.measure else []
    for line in measured:
        print(line)
    if opts.markdown:
        lines = [
            f"Per MoE layer, process and update; T={opts.tokens} tokens per process and forward, V={opts.vocab}, "
            f"window={opts.window} updates, update_freq={opts.update_freq}. old = 8 W T F (all_gather of the codes "
            "in every forward), new = 8 V N / window (one all_reduce of the int64 table per window; plus 8 V N at "
            "the refit window's start, the boundary and each checkpoint).",
            "",
            *table(header, rows),
        ]
        if measured:
            lines += ["", *(f"    {m}" for m in measured)]
        write_block(opts.markdown, "count_traffic", lines)


if __name__ == "__main__":
    main()
