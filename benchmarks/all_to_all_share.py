"""Share of the all-to-all in an expert-parallel StableMoE layer's forward+backward.

Runs the layer in W processes (gloo on CPU, or NCCL with --backend nccl on
GPUs) and times, side by side in the same run, the layer's forward+backward
and the all-to-all exchanges inside it (fairseq's ``All2All`` forward and
backward, wrapped with timers; timed with a barrier-free wall clock, plus
``cuda.synchronize`` on GPU). Prints, per stage, one line:

    case=<stage1|stage2|inference> world=<W> experts=<N> tokens_per_rank=<T>
        layer_ms=<median> a2a_ms=<median> a2a_share=<x>

    python benchmarks/all_to_all_share.py [--world-size 2] [--tokens 4096] [--dim 512] [--ffn 2048] [--experts 4]

``--markdown FILE`` also writes the table into FILE (see benchmarks/markdown.py).
"""

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from markdown import table, write_block  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Timer:
    """Accumulates wall time spent inside the wrapped all-to-all calls."""

    def __init__(self, sync):
        self.total = 0.0
        self.sync = sync

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.total += time.perf_counter() - start
            return out

        return timed


def _worker(rank: int, opts, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // opts.world_size)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group(opts.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=opts.world_size)
    device = torch.device("cuda", rank) if opts.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    timer = _Timer(sync)
    dist_fn = dist.all_to_all_single
    dist.all_to_all_single = timer.wrap(dist_fn)  # fairseq's All2All calls it in forward and backward

    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    torch.manual_seed(rank)
    layer = StableMoELayer(opts.dim, opts.ffn, opts.experts, 1, vocab_size=1000, padding_idx=1, two_stage_updates=1).to(
        device
    )
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    layer = layer.to(dtype)
    h = torch.randn(opts.tokens, opts.dim, device=device, dtype=dtype)
    tokens = torch.randint(4, 1000, (opts.tokens,), device=device)

    def step(stage: str) -> None:
        if stage == "inference":
            layer.eval()
            with torch.no_grad():
                layer(h, tokens)
            return
        layer.train()
        layer.set_num_updates(0 if stage == "stage1" else 1)
        x = h.detach().requires_grad_()
        out, stats = layer(x, tokens)
        loss = out.float().pow(2).mean() + 0.3 * stats.get("balance_loss", 0) + 0.3 * stats.get("distill_loss", 0)
        loss.backward()

    rows = []
    for stage in ("stage1", "stage2", "inference"):
        for _ in range(opts.warmup):
            step(stage)
        layer_ms, a2a_ms = [], []
        for _ in range(opts.repeats):
            dist.barrier()
            timer.total = 0.0
            sync()
            start = time.perf_counter()
            step(stage)
            sync()
            layer_ms.append((time.perf_counter() - start) * 1000)
            a2a_ms.append(timer.total * 1000)
        if rank == 0:
            lm, am = statistics.median(layer_ms), statistics.median(a2a_ms)
            print(
                f"case={stage} world={opts.world_size} experts={opts.experts} tokens_per_rank={opts.tokens} "
                f"layer_ms={lm:.2f} a2a_ms={am:.2f} a2a_share={am / lm:.3f}",
                flush=True,
            )
            rows.append([stage, f"{lm:.1f}", f"{am:.1f}", f"{100 * am / lm:.1f}%"])
    if rank == 0 and opts.markdown:
        header = (
            f"torch {torch.__version__}, {opts.world_size} {opts.backend} processes of "
            f"{torch.get_num_threads()} threads, {opts.experts} experts, {opts.tokens} tokens per process, "
            f"d={opts.dim}, f={opts.ffn}, {'bf16' if opts.bf16 else 'fp32'}; median of {opts.repeats} steps "
            "(stage 1 and 2: forward+backward; inference: forward)."
        )
        lines = table(["case", "layer ms", "all-to-all ms", "all-to-all share"], rows)
        write_block(opts.markdown, f"all_to_all_share {opts.backend} W={opts.world_size}", [header, "", *lines])
    dist.all_to_all_single = dist_fn
    dist.barrier()  # rank 0 may still be writing the table
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per process")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table into FILE")
    opts = parser.parse_args()
    mp.spawn(_worker, args=(opts, _free_port()), nprocs=opts.world_size, join=True)


if __name__ == "__main__":
    main()
