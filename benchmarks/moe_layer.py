"""The MoE layer against a dense FFN of the same d and f, measured side by side.

Forward+backward time (forward only for ``inference``) of each case and of a
dense FFN (one residual FFN sublayer, the same as one expert) on the same
tokens, in one process. After a warm-up, every round runs each case once,
right before or after a run of the dense FFN (alternating which goes first),
so each case has its own dense run next to it in time; ``ratio_vs_dense`` is
the median over rounds of these paired ratios, ``ms`` the median time.
Cases: StableMoE ``stage1`` (training, both auxiliary losses in the
backward), ``stage2`` (training after the boundary), ``inference`` (eval,
forward only, against the dense forward only), the plugin's ``switch``,
``base`` and ``hash`` layers (training), and fairscale's ``MOELayer`` with its
``Top2Gate`` (one-hot einsum dispatch; ``fairscale_top2``), which has rounds
of its own after the others (each of its calls allocates over a GB).
Each StableMoE case also has an experts-alone case (``experts_stage1``,
``experts_stage2``, ``experts_inference``): the same layer's experts on the
token split that case routes, without routing, dispatch, gate or losses,
paired with the dense FFN in the same rounds, so that the layer's own overhead
(``layer / experts alone``) is measured in the same run as the layer.

``mem_ratio`` is the case's peak of live tensor bytes created during its
forward (the activations, including what autograd saves for the backward)
over the dense FFN's, tracked exactly with a ``TorchDispatchMode`` that counts
every new storage until it is freed (outputs that alias an untracked input,
such as views of the weights, are not new storages and are not counted;
experts that run in worker threads are tracked there too).

Allocator: as it is (as in ``fairseq-train``); with ``--steady-malloc`` the
script re-runs itself with glibc's mmap and trim thresholds fixed high, so that
no case pays for page faults that another does not (the dense FFN's 64 MB
buffers are otherwise faulted in on every call): see ``benchmarks/allocator.py``.

``ops`` is the number of ATen operators one forward dispatches (for the
training cases ``ops_fwd_bwd`` that of forward and backward; the second of two
calls, so inference's caches are built), counted with a
``TorchDispatchMode`` on one intra-op thread (so experts that would run in
worker threads run in the counting thread), next to the dense FFN's
(``dense_ops``). ``kernels`` leaves out the operators that only make a view
(``view``, ``t``, ``transpose``, ``slice``, ...): on a GPU, about the kernel
launches. The expert backend is ``--backend`` (default ``auto``: see
:mod:`fairseq_stablemoe.modules.experts`).

``--device cuda`` runs the same on a GPU (timings after ``torch.cuda.synchronize``;
the header names the device).

``--sublayers K``: FFN sublayers per expert (the paper's base setting: 3); the
dense reference then has the same K sublayers. ``--dtype bf16|fp16`` casts every
layer and the inputs to that dtype, as ``fairseq-train --bf16``/``--fp16`` do
(the Trainer calls ``model.to(torch.bfloat16)``/``model.half()``; the plugin's
routing affinities, gates and losses then stay fp32 inside the layer). With
``--autocast`` the parameters stay fp32 and the forwards run under
``torch.autocast`` with that dtype instead (backward outside it), as
``--amp`` does (fairseq's ``--amp`` autocasts to fp16). Default: fp32, no
autocast (the behaviour before these options).

Prints one line per case:

    case=<stage1|stage2|inference|fairscale_top2|switch|base|hash> experts=<N> ms=<median> mem_ratio=<x>
        ratio_vs_dense=<x> ops=<n> kernels=<n> [ops_fwd_bwd=<n> kernels_fwd_bwd=<n>]   (one line)

    python benchmarks/moe_layer.py            # N in {4, 16, 64}
    python benchmarks/moe_layer.py --quick    # N = 16 only
    python benchmarks/moe_layer.py --backend grouped_mm --tokens 4096 --dim 256 --ffn 1024 --experts 8 32
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --sublayers 3 --dim 768 --ffn 3072 --experts 1 4 16

``--markdown FILE`` also writes the table of docs/performance.md (one row per N) into FILE.
"""

import argparse
import contextlib
import copy
import os
import statistics
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator import steady_malloc  # noqa: E402
from markdown import table, write_block  # noqa: E402
from pairing import paired_rounds  # noqa: E402

from fairseq_stablemoe.modules.baseline_layers import BaseLayer, DenseFFNLayer, HashLayer, SwitchLayer  # noqa: E402
from fairseq_stablemoe.modules.experts import Expert  # noqa: E402
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer  # noqa: E402

PAD = 1
VOCAB = 8000


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and still alive."""

    def __init__(self):
        super().__init__()
        # the experts may run in worker threads (see ``in_expert_threads``): one lock for the counts
        self.lock = threading.RLock()
        self.live: Dict[int, List[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        with self.lock:
            self._release_locked(ptr)

    def _release_locked(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def _track(self, t: torch.Tensor) -> None:
        with self.lock:
            self._track_locked(t)

    def _track_locked(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs that alias an input's storage (views such as ``weight.t()``,
        # in-place ops) are new allocations only if that storage is tracked:
        # parameters and the layer's input are not activations
        inputs = {
            a.untyped_storage().data_ptr()
            for a in pytree.tree_leaves((args, kwargs or {}))
            if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr in inputs and ptr not in self.live:
                    continue
                self._track(t)
        return out


@contextlib.contextmanager
def in_expert_threads(tracker: PeakLiveBytes):
    """Also track the experts when they run in worker threads (dispatch modes are per thread)."""
    plain = Expert.update
    main = threading.main_thread()

    def update(self, x):
        if threading.current_thread() is main:
            return plain(self, x)
        with tracker:
            return plain(self, x)

    Expert.update = update
    try:
        yield
    finally:
        Expert.update = plain


#: operators that only make a view or alias of their input (no kernel on a GPU)
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "expand",
    "detach",
    "alias",
    "as_strided",
    "_reshape_alias",
    "unbind",
    "split",
    "split_with_sizes",
    "lift_fresh",
    "_to_copy_noop",
    "reshape",
    "narrow",
    "view_as",
}


class OpCount(TorchDispatchMode):
    """ATen operators dispatched in this thread while the mode is on."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_ops(
    layer,
    train: bool,
    stage2: bool,
    h: torch.Tensor,
    tokens: torch.Tensor,
    g: torch.Tensor,
    precision: Callable = contextlib.nullcontext,
) -> Dict[str, int]:
    """Operators of one forward (and of forward+backward when ``train``), on one intra-op thread.

    Counted on the second of two calls: what inference keeps between calls (the distilled router's
    token table, the grouped backends' stacked weights) is built by the first.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = {}
        for with_backward in [False, True] if train else [False]:
            counter = OpCount()
            if hasattr(layer, "set_num_updates"):
                layer.set_num_updates(1 if stage2 else 0)
            layer.train(train)
            layer.zero_grad(set_to_none=True)
            x = h.detach().requires_grad_(train)
            with torch.set_grad_enabled(train), precision():
                layer(x, tokens)
            layer.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(train), counter:
                with precision():
                    out = layer(x, tokens)
                    if with_backward:
                        out, stats = out
                        loss = (out * g).sum()
                        if stats:
                            loss = loss + 0.3 * stats.get("balance_loss", 0.0) + 0.3 * stats.get("distill_loss", 0.0)
                if with_backward:
                    loss.backward()
            suffix = "_fwd_bwd" if with_backward else ""
            counts["ops" + suffix], counts["kernels" + suffix] = counter.ops, counter.kernels
        return counts
    finally:
        torch.set_num_threads(threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_layer(d: int, f: int, sublayers: int = 1) -> nn.Module:
    return DenseFFNLayer(d, f, sublayers)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_of(opts) -> Callable:
    """The context every forward runs in: ``torch.autocast`` with ``--dtype`` under ``--autocast``, else none."""
    if not opts.autocast or opts.dtype == "fp32":
        return contextlib.nullcontext
    device_type = torch.device(opts.device).type
    return lambda: torch.autocast(device_type=device_type, dtype=DTYPES[opts.dtype])


def param_dtype_of(opts) -> torch.dtype:
    """The dtype of the layers' parameters and of the inputs: ``--dtype``, or fp32 under ``--autocast``."""
    return torch.float32 if opts.autocast else DTYPES[opts.dtype]


def fairscale_top2(d: int, f: int, n: int, sublayers: int = 1) -> nn.Module:
    from fairscale.nn.moe import MOELayer, Top2Gate

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29599", rank=0, world_size=1)
    experts = nn.ModuleList(
        [
            nn.Sequential(*[m for _ in range(sublayers) for m in (nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))])
            for _ in range(n)
        ]
    )
    return MOELayer(Top2Gate(d, n), experts)


def make_cases(
    d: int, f: int, n: int, with_fairscale: bool, backend: str = "auto", sublayers: int = 1, only=None
) -> Dict[str, Callable]:
    """``name -> (layer, train, stage2)``; each layer is called as ``layer(h, tokens)``.

    The StableMoE cases always (the routing check uses them); the others only if in ``only`` (or all
    when ``only`` is empty): ``base`` needs fairseq's compiled ``libbase``.
    """
    os.environ["STABLEMOE_EXPERT_BACKEND"] = backend
    k = sublayers
    stable = StableMoELayer(d, f, n, k, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=1)
    cases = {
        "stage1": (stable, True, False),
        "stage2": (stable, True, True),
        # its own copy: a model that only infers keeps what inference caches (training drops it)
        "inference": (copy.deepcopy(stable), False, True),
    }
    wanted = set(only or ["fairscale_top2", "switch", "base", "hash"])
    if with_fairscale and "fairscale_top2" in wanted:
        cases["fairscale_top2"] = (fairscale_top2(d, f, n, k), True, False)
    if "switch" in wanted:
        cases["switch"] = (SwitchLayer(d, f, n, k, PAD), True, False)
    if "base" in wanted:
        cases["base"] = (BaseLayer(d, f, n, k, PAD), True, False)
    if "hash" in wanted:
        symbols = [f"tok{i}" for i in range(VOCAB)]
        cases["hash"] = (HashLayer(d, f, n, k, PAD, symbols=symbols), True, False)
    return cases


def run_once(
    layer,
    train: bool,
    stage2: bool,
    h: torch.Tensor,
    tokens: torch.Tensor,
    g: torch.Tensor,
    track=None,
    precision: Callable = contextlib.nullcontext,
):
    """One forward(+backward) (the forward in ``precision()``, the backward outside it); returns seconds."""
    is_fairscale = type(layer).__name__ == "MOELayer"
    if hasattr(layer, "set_num_updates"):
        layer.set_num_updates(1 if stage2 else 0)
    layer.train(train)
    # as fairseq's optimizer.zero_grad: every step starts without gradient buffers
    layer.zero_grad(set_to_none=True)
    _sync(h.device)
    start = time.perf_counter()
    if not train:
        with torch.no_grad(), precision():
            if track is not None:
                with track:
                    out = layer(h, tokens)
            else:
                out = layer(h, tokens)
        _sync(h.device)
        return time.perf_counter() - start
    x = h.detach().requires_grad_()
    ctx = track if track is not None else _Null()
    with ctx, precision():
        if is_fairscale:
            # fairscale wants a leading dimension divisible by its number of experts
            out = layer(x.view(len(layer.experts), -1, x.shape[-1])).reshape_as(x)
            aux = 0.01 * layer.l_aux
        else:
            out, stats = layer(x, tokens)
            aux = 0.0
            if stats:
                aux = 0.3 * stats.get("balance_loss", 0.0) + 0.3 * stats.get("distill_loss", 0.0)
        loss = (out * g).sum() + aux
    loss.backward()
    _sync(h.device)
    return time.perf_counter() - start


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ExpertsAlone(nn.Module):
    """A layer's experts alone on a fixed token split (``counts`` tokens per expert, in order): the
    layer's expert computation without its routing, dispatch, gate and losses. Called as the layers
    are, ``(h, tokens) -> (out, stats)``."""

    def __init__(self, experts: nn.Module, counts: List[int]):
        super().__init__()
        self.experts, self.counts = experts, counts

    def forward(self, h: torch.Tensor, tokens: torch.Tensor):
        return self.experts(h.reshape(-1, h.shape[-1]), self.counts), {}


#: each StableMoE case's experts-alone case (the same experts on the token split that case routes)
EXPERTS_ALONE = {"stage1": "experts_stage1", "stage2": "experts_stage2", "inference": "experts_inference"}


def reference(case: str) -> str:
    """The dense run a case is compared with."""
    return "dense_infer" if case in ("inference", "experts_inference") else "dense_train"


def measure(opts, n: int) -> Dict[str, object]:
    torch.manual_seed(0)
    d, f, T = opts.dim, opts.ffn, opts.tokens
    device = torch.device(opts.device)
    dtype, precision = param_dtype_of(opts), precision_of(opts)
    h = torch.randn(T, d, device=device).to(dtype)
    tokens = torch.randint(4, VOCAB, (T,), device=device)
    g = (torch.randn(T, d, device=device) / T).to(dtype)
    dense = dense_layer(d, f, opts.sublayers).to(device=device, dtype=dtype)
    all_cases = make_cases(d, f, n, not opts.no_fairscale, opts.backend, opts.sublayers, opts.cases)
    cases = {
        name: (layer.to(device=device, dtype=dtype), train, stage2)
        for name, (layer, train, stage2) in all_cases.items()
        if not opts.cases or name in opts.cases
    }
    dense_runs = {"dense_train": (dense, True, False), "dense_infer": (dense, False, False)}
    runs = {**{ref: dense_runs[ref] for ref in sorted({reference(name) for name in cases})}, **cases}
    # routing sanity: the assignment is not degenerate
    stable = all_cases["stage1"][0].to(device=device, dtype=dtype)
    stable.train()
    stable.set_num_updates(0)
    with torch.no_grad(), precision():
        _, stats = stable(h, tokens)
    load1 = stats["load"]
    stable.set_num_updates(1)
    with torch.no_grad(), precision():
        _, stats = stable(h, tokens)
    load2 = stats["load"]
    # the experts alone on the split each StableMoE case routes (stage 2 and inference: the distilled router's)
    split = {"stage1": [int(c) for c in load1.tolist()], "stage2": [int(c) for c in load2.tolist()]}
    split["inference"] = split["stage2"]
    for name, alone in EXPERTS_ALONE.items():
        if name in cases:
            layer, train, _ = cases[name]
            cases[alone] = (ExpertsAlone(layer.experts, split[name]), train, False)
    runs.update({alone: cases[alone] for alone in EXPERTS_ALONE.values() if alone in cases})
    with precision():
        backend = stable.experts.backend_for(h, split["stage1"])  # auto's choice on stage 1's split
    print(
        f"# experts={n}: load max/mean stage 1 {float(load1.max() * n / load1.sum()):.2f}, "
        f"stage 2 {float(load2.max() * n / load2.sum()):.2f}; expert backend used: {backend}",
        flush=True,
    )

    ops = {name: count_ops(*runs[name], h, tokens, g, precision=precision) for name in runs if name != "fairscale_top2"}
    peaks = {}
    for name, (layer, train, stage2) in runs.items():
        tracker = PeakLiveBytes()
        with in_expert_threads(tracker):
            run_once(layer, train, stage2, h, tokens, g, track=tracker, precision=precision)
        peaks[name] = tracker.peak
        for _ in range(opts.warmup - 1):
            run_once(layer, train, stage2, h, tokens, g, precision=precision)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    ratios: Dict[str, List[float]] = {name: [] for name in cases}

    def run(name: str) -> float:
        return run_once(*runs[name], h, tokens, g, precision=precision)

    plugin = [name for name in cases if name != "fairscale_top2"]
    paired_rounds(plugin, reference, run, opts.repeats, times, ratios)
    if "fairscale_top2" in cases:
        # its own rounds: each call allocates and faults in over a GB of one-hot tensors,
        # which would otherwise land in the timings of the cases run after it
        paired_rounds(["fairscale_top2"], reference, run, opts.repeats, times, ratios)
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    for name in cases:
        ref = reference(name)
        counted = " ".join(f"{k}={v}" for k, v in ops.get(name, {}).items())
        print(
            f"case={name} experts={n} ms={med[name]:.1f} mem_ratio={peaks[name] / peaks[ref]:.2f} "
            f"ratio_vs_dense={statistics.median(ratios[name]):.3f} {counted}".rstrip(),
            flush=True,
        )
    dense_ops = " ".join(f"{k}={v}" for k, v in ops[max(ops, key=lambda r: r.startswith("dense_train"))].items())
    dense_ms = " ".join(f"{ref[6:].replace('infer', 'inference')}={med[ref]:.1f}" for ref in dense_runs if ref in med)
    print(f"# experts={n}: dense ms {dense_ms}; dense {dense_ops}", flush=True)
    return {
        "experts": n,
        "ms": med,
        "ratio": {name: statistics.median(ratios[name]) for name in cases},
        "ops": ops,
        "split": split,
        "backend": backend,
    }


def markdown_rows(results: List[Dict[str, object]]) -> List[str]:
    """The page's table: one row per expert count (``-`` where a case was not measured)."""

    def ratios(names) -> str:
        return " / ".join(f"{r['ratio'][k]:.2f}" if k in r["ratio"] else "-" for k in names)

    def ops(name: str, suffix: str = "") -> str:
        counted = r["ops"].get(name, {})
        return f"{counted['ops' + suffix]} ({counted['kernels' + suffix]})" if "ops" + suffix in counted else "-"

    rows = []
    for r in results:
        split = r["split"]["stage1"]
        overhead = " / ".join(
            f"{r['ratio'][k] / r['ratio'][a]:.2f}" if k in r["ratio"] and a in r["ratio"] else "-"
            for k, a in EXPERTS_ALONE.items()
        )
        dense = " / ".join(f"{r['ms'][k]:.1f}" if k in r["ms"] else "-" for k in ("dense_train", "dense_infer"))
        rows.append(
            [
                r["experts"],
                f"{sum(split) // len(split)} ({min(split)}-{max(split)})",
                ratios(EXPERTS_ALONE),
                ratios(EXPERTS_ALONE.values()),
                overhead,
                dense,
                ops("inference"),
                ops("stage1", "_fwd_bwd"),
            ]
        )
    return table(
        [
            "N",
            "tokens per expert, stage 1: mean (min-max)",
            "layer / dense: stage 1 / stage 2 / inference",
            "experts alone / dense",
            "layer / experts alone",
            "dense ms: fwd+bwd / fwd",
            "ops inference (kernels)",
            "ops stage 1 fwd+bwd (kernels)",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 16 only")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-fairscale", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU, when there is one)")
    parser.add_argument(
        "--sublayers",
        type=int,
        default=1,
        help="FFN sublayers per expert (the paper's base: 3); the dense FFN gets as many",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="parameters and inputs in this dtype, as fairseq-train --bf16/--fp16 (default fp32)",
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="with --dtype bf16/fp16: fp32 parameters, forwards under torch.autocast (as --amp)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "loop", "threads", "grouped_mm", "padded_bmm"],
        help="the experts' backend (fairseq_stablemoe.modules.experts.EXPERT_BACKENDS)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["stage1", "stage2", "inference", "fairscale_top2", "switch", "base", "hash"],
        help="measure only these cases (default: all)",
    )
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="re-run with glibc's mmap/trim thresholds fixed high (see benchmarks/allocator.py)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write the table (one row per N, the command above it) into FILE, replacing the block of "
        "the same shape, device, dtype and backend (see benchmarks/markdown.py)",
    )
    opts = parser.parse_args()
    if opts.autocast and opts.dtype == "fp32":
        parser.error("--autocast needs --dtype bf16 or fp16")
    if param_dtype_of(opts) != torch.float32 and not opts.no_fairscale:
        # its einsum dispatch multiplies an fp32 one-hot mask with the inputs: fp32 parameters only
        print("# fairscale_top2 left out: it runs with fp32 parameters only (use --autocast)", flush=True)
        opts.no_fairscale = True
    if opts.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no GPU visible to torch")
        opts.no_fairscale = True  # its gloo process group and one-hot einsums are a CPU baseline here
    allocator = steady_malloc(opts.steady_malloc)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = opts.device
    if device.startswith("cuda"):
        device = (
            f"{device} ({torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}, "
            f"capability {'.'.join(map(str, torch.cuda.get_device_capability(torch.device(device))))})"
        )
    precision = f"{opts.dtype} {'autocast, fp32 parameters' if opts.autocast else 'parameters and inputs'}"
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads (cpu count {os.cpu_count()}), "
        f"T={opts.tokens} d={opts.dim} f={opts.ffn} sublayers={opts.sublayers}, {precision}, device {device}, "
        f"expert backend {opts.backend}, median of {opts.repeats} rounds, each case paired with a dense run; "
        f"{allocator}",
        flush=True,
    )
    results = [measure(opts, n) for n in ([16] if opts.quick else opts.experts)]
    if opts.markdown:
        key = (
            f"moe_layer T={opts.tokens} d={opts.dim} f={opts.ffn} sublayers={opts.sublayers} "
            f"{opts.device.split(':')[0]} {opts.dtype}{' autocast' if opts.autocast else ''} backend={opts.backend}"
        )
        header = (
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {precision}, "
            f"expert backend {opts.backend} (used: {results[0]['backend']}), median of {opts.repeats} paired "
            f"rounds; {allocator}."
        )
        write_block(opts.markdown, key, [header, "", *markdown_rows(results)])


if __name__ == "__main__":
    main()
