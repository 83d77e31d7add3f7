"""Running the experts side by side on CPU cores (the ``threads`` expert backend).

On a CPU, a top-1 MoE layer's expert work is ``N`` small matrix products of
about ``T / N`` rows each. :func:`run_experts` hands the experts to a pool of
worker threads (at most one per intra-op thread; largest expert first, each
worker taking the next expert when it is free), each running whole experts
with ``torch.get_num_threads() // workers`` threads of its own; the operators
release the GIL while they compute. Each worker writes its experts' results
into one output buffer. It is not the default: on a 2-core CPU the experts one after the other, each
product on all threads, are as fast or faster at every shape of
docs/performance.md's tables; pick it with ``STABLEMOE_EXPERT_BACKEND=threads``
where it measures faster.

What each expert computes is what the sequential loop computes: its own
``Expert.update`` on its own tokens, with the same number of intra-op threads
whichever worker runs it, so results do not depend on scheduling. In training,
every expert's backward runs in a worker too (``torch.autograd.backward`` on
the expert's own graph): the expert's parameters get their gradients there,
through their hooks and ``AccumulateGrad`` as in a plain backward, and the
gradient of the tokens goes back through the outer graph. (So
``torch.autograd.grad(loss, expert_params)`` cannot reach the expert
parameters on this path; ``loss.backward()``, which fairseq uses, can.)

Numerics: every expert runs its GEMMs on ``torch.get_num_threads() // workers``
threads (one on a 2-core machine), so results equal a run with that many
intra-op threads bit for bit (``tests/test_expert_threads.py``) and may differ
in the last bits from a run whose expert GEMMs use all threads.

Used only where it can run and is safe: CPU tensors, more than one intra-op
thread, at least two experts with tokens, no autocast, not under
``torch.compile``; otherwise the experts run one after the other (so
``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)`` turns it off, as in the
usual one-thread-per-process multi-process CPU runs). The pool is made again
in a forked child (a fork keeps the pool object but not its threads).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

try:  # torch >= 2.4: a handle on a tensor's grad_fn that does not keep the tensor alive
    from torch.autograd.graph import get_gradient_edge
except ImportError:  # pragma: no cover - older torch: experts run one after the other
    get_gradient_edge = None


def num_workers(features: torch.Tensor, num_busy: int) -> int:
    """How many experts to run at once on ``features``' device (1: one after the other)."""
    if get_gradient_edge is None or features.device.type != "cpu" or num_busy < 2:
        return 1
    if _autocast_on() or _compiling():
        return 1
    return min(torch.get_num_threads(), num_busy)


def run_experts(
    experts: Sequence[nn.Module],
    chunks: Sequence[torch.Tensor],
    busy: List[int],
    features: torch.Tensor,
    workers: int,
) -> torch.Tensor:
    """Every expert's ``update`` on its chunk, ``workers`` experts at a time.

    Args:
        experts: the local experts (each has ``update``).
        chunks: ``len(experts)`` views of ``features``, ``(T_i, d)`` each,
            contiguous segments in expert order.
        busy: the experts whose chunk is not empty, in order.
        features: ``(T, d)`` the tokens sorted by expert (``chunks`` concatenated).
        workers: from :func:`num_workers`, at least 2.
    Returns:
        ``(T, d)`` the updates in the order of ``features``.
    """
    job = _Job(experts, chunks, busy, _pool(workers))
    if torch.is_grad_enabled():
        if features.requires_grad:
            return _ExpertsFunction.apply(features, job)
        if any(p.requires_grad for i in busy for p in experts[i].parameters()):
            # the output must require grad for the backward to reach the experts:
            # tie it to a placeholder that does (the parameters themselves get their
            # gradients in the workers, so they are not inputs here)
            return _ExpertsFunction.apply(features, job, torch.empty(0, requires_grad=True))
    return job.forward(features, needs_grad=False)


class _Job:
    """One layer call: forward of every busy expert, then (training) its backward."""

    def __init__(self, experts, chunks, busy: List[int], pool: ThreadPoolExecutor):
        self.experts = experts
        self.chunks = chunks
        self.busy = busy
        self.pool = pool
        # first row of every expert's segment (the chunks are consecutive)
        self.starts = [0]
        for chunk in chunks[:-1]:
            self.starts.append(self.starts[-1] + chunk.shape[0])
        # expert -> (its input leaf, the gradient edge of its output)
        self.graphs: Dict[int, Tuple[torch.Tensor, Optional[object]]] = {}

    def _largest_first(self) -> List[int]:
        return sorted(self.busy, key=lambda i: -self.chunks[i].shape[0])

    def _rows(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.chunks[i].shape[0])

    def forward(self, features: torch.Tensor, needs_grad: bool, input_grad: bool = False) -> torch.Tensor:
        inference = torch.is_inference_mode_enabled()
        out = features.new_empty(features.shape)

        def run(i: int) -> None:
            # grad mode and inference mode are per thread: set them as the caller has them
            with torch.inference_mode(inference), torch.set_grad_enabled(needs_grad):
                x = self.chunks[i].detach()
                if input_grad:
                    x.requires_grad_()
                y = self.experts[i].update(x)
            if needs_grad:
                self.graphs[i] = (x, get_gradient_edge(y) if y.requires_grad else None)
            with torch.inference_mode(inference), torch.no_grad():
                out[self._rows(i)].copy_(y)  # while it is in this core's cache (no torch.cat after)

        for _ in self.pool.map(run, self._largest_first()):
            pass
        return out

    def backward(self, grad: torch.Tensor, input_grad: bool) -> Optional[torch.Tensor]:
        grad_features = grad.new_empty(grad.shape) if input_grad else None

        def run(i: int) -> None:
            x, edge = self.graphs.pop(i)
            if edge is not None:
                inputs = [p for p in self.experts[i].parameters() if p.requires_grad]
                if input_grad:
                    inputs.append(x)
                torch.autograd.backward([edge], [grad[self._rows(i)].contiguous()], inputs=inputs)
            if input_grad:
                with torch.no_grad():
                    if x.grad is None:
                        grad_features[self._rows(i)].zero_()
                    else:
                        grad_features[self._rows(i)].copy_(x.grad)

        for _ in self.pool.map(run, self._largest_first()):
            pass
        return grad_features


class _ExpertsFunction(torch.autograd.Function):
    """Ties the experts' graphs, built in the workers, into the caller's graph.

    The experts' parameters are not inputs: the workers accumulate their
    gradients. ``placeholder`` (a 0-element tensor that requires grad, or
    nothing) makes the output require grad when ``features`` does not.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, job: _Job, *placeholder: torch.Tensor) -> torch.Tensor:
        ctx.job = job
        ctx.num_placeholders = len(placeholder)
        ctx.input_grad = features.requires_grad
        return job.forward(features, needs_grad=True, input_grad=features.requires_grad)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        job, ctx.job = ctx.job, None
        grad_features = job.backward(grad, ctx.input_grad)
        return (grad_features, None) + (None,) * ctx.num_placeholders


_POOL: Optional[Tuple[Tuple[int, int, int], ThreadPoolExecutor]] = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads (made again after a fork or when the thread count changes)."""
    global _POOL
    total = torch.get_num_threads()
    key = (os.getpid(), workers, total)
    with _POOL_LOCK:
        if _POOL is not None and _POOL[0] == key:
            return _POOL[1]
        if _POOL is not None and _POOL[0][0] == os.getpid():
            _POOL[1].shutdown(wait=False)
        each = max(1, total // workers)
        started = threading.Barrier(workers)

        def start() -> None:
            torch.get_num_threads()  # set this thread's intra-op pool up now, not at its first op
            torch.set_num_threads(each)
            started.wait()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="stablemoe-experts")
        for future in [pool.submit(start) for _ in range(workers)]:
            future.result()
        # torch.set_num_threads also sets process-wide defaults: give them back to the caller
        torch.set_num_threads(total)
        _POOL = (key, pool)
        return pool


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())
