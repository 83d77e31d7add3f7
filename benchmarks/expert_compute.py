"""How to run the experts: the plugin's paths against torch's grouped matrix multiply.

The experts' forward+backward alone (one residual FFN sublayer each, T tokens split
evenly over N experts; no routing), measured side by side in one process with the
dense FFN on all T tokens as the reference (each case paired with an adjacent dense
run, median of the paired ratios, as ``moe_layer.py``):

* ``side_by_side``: the ``threads`` backend, the experts in worker threads
  (:mod:`fairseq_stablemoe.modules.expert_threads`);
* ``one_after_other``: the ``loop`` backend (the plugin's CPU default), each GEMM on
  all intra-op threads;
* ``grouped_mm`` / ``padded_bmm``: the plugin's grouped backends, which stack the
  experts' weights on every call (``fairseq_stablemoe.modules.experts``);
* ``grouped_mm_prestacked``: ``torch.nn.functional.grouped_mm`` over weights stacked
  ``(N, d, f)`` once, outside the timing: the best case for grouped products on this
  device (stored stacked weights would need another checkpoint layout).

Prints ``case=<name> experts=<N> ms=<median> ratio_vs_dense=<x>``; ``auto`` picks
``loop`` on CPU, the fastest there in docs/performance.md's tables.

    python benchmarks/expert_compute.py [--experts 16 64] [--tokens 8192 --dim 512 --ffn 2048]

``--markdown FILE`` also writes the table of docs/performance.md (one row per N) into FILE.

``--skew S`` measures memory instead: one expert gets the share ``S`` of the T tokens, the
others split the rest evenly, and ``padded_bmm`` (every busy expert padded to the busiest
one's count) and ``loop`` run the same forward+backward on them (training: the busy experts
only are padded). One line per backend and N::

    case=skew backend=<name> experts=<N> largest=<C> padded_rows=<L*C> peak_mb=<x> ratio_vs_loop=<y>

``peak_mb``: on CUDA ``torch.cuda.max_memory_allocated`` over the allocated memory before the
step (``reset_peak_memory_stats`` first); elsewhere the peak bytes of the storages that the step's
operators create and that are alive at once (``moe_layer.PeakLiveBytes``, a dispatch mode: the
activations, gradients and stacked weight copies, not the parameters nor the input). The header line
names the measure and what ``auto`` picks for these counts (:func:`~fairseq_stablemoe.modules.experts.choose_backend`).

    python benchmarks/expert_compute.py --skew 0.75 --experts 8 --tokens 4096 --dim 256 --ffn 1024 \
        [--device cuda --dtype fp32]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator import steady_malloc  # noqa: E402
from markdown import table, write_block  # noqa: E402
from pairing import paired_rounds  # noqa: E402

from fairseq_stablemoe.modules.experts import Expert, Experts  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def skewed_counts(tokens: int, experts: int, share: float) -> List[int]:
    """Expert 0 gets ``round(share * tokens)`` tokens, the others split the rest evenly (sums to ``tokens``)."""
    top = min(tokens, round(share * tokens))
    rest = tokens - top
    others = experts - 1
    return [top] + [rest // others + (1 if i < rest % others else 0) for i in range(others)]


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory of ``step()`` (see the module doc: CUDA's allocator, else the live storages it creates)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from moe_layer import PeakLiveBytes  # the layer benchmark's measure (imports the layers: not on CUDA runs)

    tracker = PeakLiveBytes()
    with tracker:
        step()
    return tracker.peak


def memory_under_skew(opts) -> None:
    """``--skew``: the peak memory of ``padded_bmm`` against ``loop`` on the same skewed counts (one line each)."""
    from fairseq_stablemoe.modules.experts import choose_backend

    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    measure = (
        "torch.cuda.max_memory_allocated over the memory before the step"
        if device.type == "cuda"
        else "peak live bytes of the storages the step's operators create (moe_layer.PeakLiveBytes)"
    )
    T, d, f = opts.tokens, opts.dim, opts.ffn
    rows_out = []
    print(
        f"# torch {torch.__version__}, {opts.device} {opts.dtype}, T={T} d={d} f={f}, one expert gets {opts.skew:.0%} "
        f"of the tokens, forward+backward in training; peak_mb: {measure}",
        flush=True,
    )
    for n in opts.experts:
        counts = skewed_counts(T, n, opts.skew)
        torch.manual_seed(0)
        experts = Experts(n, d, f, 1)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02)
        experts.to(device=device, dtype=dtype)
        x0 = torch.randn(T, d, device=device, dtype=dtype)
        g = torch.randn(T, d, device=device, dtype=dtype) / T
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        busy = [c for c in counts if c > 0]
        auto = choose_backend(device.type, dtype, capability, d, f, busy)

        def step(name: str) -> None:
            experts.backend = name
            experts.zero_grad(set_to_none=True)
            x = x0.detach().requires_grad_()
            ((experts(x, counts) * g).sum()).backward()

        peaks = {}
        for name in ("loop", "padded_bmm"):
            step(name)  # warm-up (CUDA context, cuBLAS workspace, lazy buffers)
            experts.zero_grad(set_to_none=True)
            peaks[name] = peak_bytes(lambda: step(name), device)
        print(f"# experts={n}: counts {counts[0]} + {n - 1} x ~{counts[-1]}; auto picks {auto}", flush=True)
        padded_rows = len(busy) * max(busy)
        for name, rows in (("loop", T), ("padded_bmm", padded_rows)):
            print(
                f"case=skew backend={name} experts={n} largest={max(busy)} padded_rows={rows} "
                f"peak_mb={peaks[name] / 2**20:.2f} ratio_vs_loop={peaks[name] / peaks['loop']:.2f}",
                flush=True,
            )
        ratio = peaks["padded_bmm"] / peaks["loop"]
        rows_out.append(
            [n, max(busy), padded_rows, *(f"{peaks[k] / 2**20:.1f}" for k in ("loop", "padded_bmm")), f"{ratio:.2f}"]
            + [f"`{auto}`"]
        )
    if opts.markdown:
        header = (
            f"torch {torch.__version__}, {opts.device} {opts.dtype}: the experts' forward+backward (training) on T={T} "
            f"tokens, one expert getting {opts.skew:.0%} of them (d={d}, f={f}); peak MB: {measure}."
        )
        titles = ["N", "busiest expert's tokens C", "padded rows L x C", "`loop` peak MB", "`padded_bmm` peak MB"]
        lines = table([*titles, "padded_bmm / loop", "`auto` picks"], rows_out)
        write_block(
            opts.markdown,
            f"expert_compute skew={opts.skew} {opts.device} {opts.dtype} T={T} d={d} f={f}",
            [header, "", *lines],
        )


def grouped_case(experts: Experts, counts: List[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The experts' update with ``grouped_mm`` on stacked copies of their weights."""
    stack = lambda get: torch.stack([get(e[0]).detach() for e in experts]).requires_grad_()  # noqa: E731
    ln_w, ln_b = stack(lambda s: s.norm.weight), stack(lambda s: s.norm.bias)
    w1, b1 = stack(lambda s: s.fc1.weight.t()), stack(lambda s: s.fc1.bias)  # (N, d, f), (N, f)
    w2, b2 = stack(lambda s: s.fc2.weight.t()), stack(lambda s: s.fc2.bias)  # (N, f, d), (N, d)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert_of_token = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    params = [ln_w, ln_b, w1, b1, w2, b2]

    def run(x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:]) * ln_w[expert_of_token] + ln_b[expert_of_token]
        hidden = torch.relu(F.grouped_mm(normed, w1, offs=offs) + b1[expert_of_token])
        return F.grouped_mm(hidden, w2, offs=offs) + b2[expert_of_token]

    run.params = params
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="re-run with glibc's mmap/trim thresholds fixed high (see benchmarks/allocator.py)",
    )
    parser.add_argument(
        "--skew",
        type=float,
        metavar="S",
        help="measure the peak memory of padded_bmm against loop instead of the times, one expert getting the "
        "share S (0 < S <= 1) of the tokens (see the module doc)",
    )
    parser.add_argument("--device", default="cpu", help="with --skew: the device (cpu or cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="with --skew: the experts' dtype")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write the table (one row per N, the command above it) into FILE, replacing the block of "
        "the same shape (see benchmarks/markdown.py)",
    )
    opts = parser.parse_args()
    if opts.skew is not None and not 0 < opts.skew <= 1:
        parser.error(f"--skew {opts.skew}: give the busiest expert's share of the tokens, 0 < S <= 1")
    if opts.skew is None and (opts.device != "cpu" or opts.dtype != "fp32"):
        parser.error("--device and --dtype apply to --skew only: the timings run in fp32 on the CPU")
    allocator = steady_malloc(opts.steady_malloc)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.skew is not None:
        memory_under_skew(opts)
        return
    if not hasattr(F, "grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, T={opts.tokens} d={opts.dim} "
        f"f={opts.ffn}, median of {opts.repeats} rounds, each case paired with a dense run; {allocator}",
        flush=True,
    )
    torch.manual_seed(0)
    T, d, f = opts.tokens, opts.dim, opts.ffn
    x0 = torch.randn(T, d)
    g = torch.randn(T, d) / T
    dense = Expert(d, f, 1)
    rows = []
    for n in opts.experts:
        counts = [T // n + (1 if i < T % n else 0) for i in range(n)]
        experts = Experts(n, d, f, 1)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02)
        grouped = grouped_case(experts, counts)
        threads = torch.get_num_threads()

        def backend(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(x: torch.Tensor) -> torch.Tensor:
                experts.backend = name
                return experts(x, counts)

            return run

        def step(fn: Callable[[torch.Tensor], torch.Tensor], params) -> float:
            for p in params:
                p.grad = None
            x = x0.detach().requires_grad_()
            start = time.perf_counter()
            ((fn(x) * g).sum()).backward()
            return time.perf_counter() - start

        cases: Dict[str, Callable[[], float]] = {
            "dense": lambda: step(dense.update, list(dense.parameters())),
            "side_by_side": lambda: step(backend("threads"), list(experts.parameters())),
            "one_after_other": lambda: step(backend("loop"), list(experts.parameters())),
            "grouped_mm": lambda: step(backend("grouped_mm"), list(experts.parameters())),
            "padded_bmm": lambda: step(backend("padded_bmm"), list(experts.parameters())),
            "grouped_mm_prestacked": lambda: step(grouped, grouped.params),
        }
        # the outputs agree (so the three compute the same thing)
        with torch.no_grad():
            ref = torch.cat([e.update(c) for e, c in zip(experts, torch.split(x0, counts))])
            torch.testing.assert_close(grouped(x0), ref, rtol=1e-4, atol=1e-5)
            for name in ("threads", "loop", "grouped_mm", "padded_bmm"):
                torch.testing.assert_close(backend(name)(x0), ref, rtol=1e-4, atol=1e-5)
        for fn in cases.values():
            fn()
        if threads == 1:
            del cases["side_by_side"]  # on one thread the threads backend runs the experts one after the other
        times: Dict[str, List[float]] = {k: [] for k in cases}
        ratios: Dict[str, List[float]] = {k: [] for k in cases if k != "dense"}
        names = list(ratios)
        paired_rounds(names, lambda name: "dense", lambda name: cases[name](), opts.repeats, times, ratios)
        assert torch.get_num_threads() == threads
        for name in names:
            print(
                f"case={name} experts={n} ms={statistics.median(times[name]) * 1000:.1f} "
                f"ratio_vs_dense={statistics.median(ratios[name]):.3f}",
                flush=True,
            )
        print(f"# experts={n}: dense ms={statistics.median(times['dense']) * 1000:.1f}", flush=True)
        rows.append(
            [n, T // n, *(f"{statistics.median(ratios[name]):.2f}" for name in names)]
            + [f"{statistics.median(times['dense']) * 1000:.1f}"]
        )
    if opts.markdown:
        header = (
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, the experts' forward+backward on T={T} "
            f"tokens split evenly, over the dense FFN's on all T (d={d}, f={f}), median of {opts.repeats} paired "
            f"rounds; {allocator}."
        )
        titles = {
            "side_by_side": "`threads`",
            "one_after_other": "`loop`",
            "grouped_mm": "`grouped_mm`",
            "padded_bmm": "`padded_bmm`",
            "grouped_mm_prestacked": "grouped_mm, weights stacked once",
        }
        lines = table(["N", "tokens per expert", *(titles[name] for name in names), "dense ms (fwd+bwd)"], rows)
        write_block(opts.markdown, f"expert_compute T={T} d={d} f={f}", [header, "", *lines])


if __name__ == "__main__":
    main()
