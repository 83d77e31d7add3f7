"""Expert networks: each expert is a stack of residual FFN sublayers.

How the local experts run on their segments of tokens is a backend, picked per
call by :meth:`Experts.forward` from :data:`EXPERT_BACKENDS` (as megablocks'
``dmlp_registry``):

* ``loop``: each expert's own modules on its segment, one expert after the
  other (each matrix product on all intra-op threads). About 6 operators per
  expert and sublayer in the forward.
* ``threads``: the same modules side by side in worker threads, one intra-op
  thread each, on a multi-threaded CPU (:mod:`.expert_threads`; ``loop``
  elsewhere).
* ``grouped_mm``: every sublayer's two matrix products for all experts at once
  with ``torch.nn.functional.grouped_mm`` over the tokens sorted by expert
  (jagged segments, no padding). In training the per-expert weights are
  stacked per call (a copy of the busy experts' weights; their gradients flow
  back to each expert's own parameters), so the checkpoint layout is
  unchanged; at inference the stacks are kept between calls
  (:meth:`Experts.stacked`). A fixed number of operators whatever the number
  of experts.
* ``padded_bmm``: the same with ``baddbmm`` over segments padded to the
  largest one (``L x C`` rows, ``C`` the most tokens of one expert, ``L`` the
  busy experts in training, all local ones at inference); any device and
  dtype, at the price of the padding's arithmetic.

``auto`` (the default) is :func:`choose_backend`, per call, from the device,
the dtype of the products, the compute capability, ``d`` and ``f`` and the
python counts (no host sync of its own):

* CPU (and any device but CUDA): ``loop``, the fastest on CPU in
  docs/performance.md's tables.
* CUDA: ``grouped_mm`` where torch runs it as one fused kernel: bfloat16 (also
  under autocast), compute capability major 9 or 10 (SM90 Hopper, SM100
  Blackwell datacenter, their minor versions included), ``d`` and ``f``
  multiples of 8. Elsewhere (8.0 A100, 8.6, 8.9 L4/L40, 12.0 RTX 50, fp16,
  fp32) torch's ``grouped_mm`` copies the offsets to the host and runs one
  product per expert: two host syncs per sublayer in the forward and four in
  the backward, where the layer makes one per forward. There ``padded_bmm``,
  unless its padding would more than double the work (``L * max(counts) > 2 *
  sum(counts)``, ``L`` the experts it pads: skewed routing), then ``loop``.
  The rule follows torch's ``_grouped_mm_cuda`` (``aten/src/ATen/native/cuda/
  GroupedBlas.cpp``: the fused CUTLASS path needs bf16 operands and output and
  ``major == 9 or 10``, else ``_grouped_mm_fallback``); that C++ is not in the
  installed wheel, so the choice assumes the installed torch keeps that
  condition (seen on an H200 with torch 2.11: one ``grouped_mm`` call made no
  host sync in bf16 and one in fp16 and fp32). On ROCm (where torch reports
  another capability) not ``grouped_mm``.

The environment variable ``STABLEMOE_EXPERT_BACKEND`` or
:attr:`Experts.backend` picks another, whatever the call. Every backend
computes what ``loop`` computes (up to the rounding of the matrix products;
``tests/test_expert_backends.py``), and an expert without tokens gets no
gradient on any of them.
"""

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils

from .expert_threads import num_workers, run_experts


def expert_seed(seed: int, expert: int) -> int:
    """The seed of global expert ``expert``'s initialisation in a layer seeded ``seed``."""
    return (seed * 1_000_003 + expert) % (2**63 - 1)


class FFNSublayer(nn.Module):
    """``x + W2 act(W1 LN(x))``, with ``W2`` initialised to zero (as the paper's code)."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str = "relu"):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        nn.init.zeros_(self.fc2.weight)
        self.activation_fn: Callable = utils.get_activation_fn(activation_fn)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone, ``W2 act(W1 LN(x))``: ``(T, d)`` -> ``(T, d)``."""
        return self.fc2(self.activation_fn(self.fc1(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(T, d)`` -> ``(T, d)``."""
        return x + self.residual(x)


class Expert(nn.Sequential):
    """``num_sublayers`` stacked :class:`FFNSublayer` s."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_sublayers: int, activation_fn: str = "relu"):
        super().__init__(*[FFNSublayer(embed_dim, ffn_dim, activation_fn) for _ in range(num_sublayers)])

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``Expert(x) - x`` as the sum of the sublayers' updates (no cancellation): ``(T, d)`` -> ``(T, d)``."""
        sublayers = iter(self)
        r = next(sublayers).residual(x)
        total = r
        for sublayer in sublayers:
            x = x + r
            r = sublayer.residual(x)
            total = total + r
        return total


class Stacks(NamedTuple):
    """One sublayer depth of several experts' parameters, stacked (:meth:`Experts.stacked`)."""

    vectors: torch.Tensor  # (3, L, d): the norm weights, norm biases and fc2 biases
    w1: torch.Tensor  # (L, d, f) in the dtype of the products (as w2 and b1)
    b1: torch.Tensor  # (L, f)
    w2: torch.Tensor  # (L, f, d)
    #: (L, 3d + f), kept at inference: each expert's norm weight, norm bias, fc2 bias and fc1 bias in
    #: one row (in the parameters' dtype), so that one gather gives every token's four vectors
    rows: Optional[torch.Tensor] = None


class Experts(nn.ModuleList):
    """The experts held by this process.

    Each expert is its own module (``experts.<i>.<sublayer>.fc1.weight``), so its
    gradient is its own buffer: no full-size gradient per expert from slicing a
    stacked weight. Every parameter carries ``expert = True`` so that fairseq's
    ``legacy_ddp`` does not all-reduce it, and ``expert_replicas`` (how many
    processes hold a copy) for the global gradient norm (:mod:`fairseq_hooks.trainer_step`).

    Initialisation does not depend on the process layout: local expert ``i`` is
    global expert ``g = first_expert + i`` and is initialised from its own
    generator, seeded with ``(seed, g)``, so expert ``g`` starts the same on 1
    process or on any rank of ``W``, and the caller's random stream is left as
    it was (the rest of the model does not depend on ``W`` either).
    """

    def __init__(
        self,
        num_experts: int,
        embed_dim: int,
        ffn_dim: int,
        num_sublayers: int,
        activation_fn: str = "relu",
        first_expert: int = 0,
        seed: int = 0,
        replicas: int = 1,
    ):
        experts = []
        for g in range(first_expert, first_expert + num_experts):
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only (torch.manual_seed would also reseed every GPU's)
                torch.default_generator.manual_seed(expert_seed(seed, g))
                experts.append(Expert(embed_dim, ffn_dim, num_sublayers, activation_fn))
        super().__init__(experts)
        for p in self.parameters():
            p.expert = True
            p.expert_replicas = replicas
        # the grouped backends' stacks at inference, per sublayer depth: (key, parameters, stacks); see stacked()
        self._stacks: Dict[int, Tuple[tuple, List[torch.Tensor], Stacks]] = {}
        #: ``auto`` or a key of :data:`EXPERT_BACKENDS` (not saved: the checkpoint layout is the same for all)
        self.backend = os.environ.get("STABLEMOE_EXPERT_BACKEND", "auto")
        if self.backend != "auto" and self.backend not in EXPERT_BACKENDS:
            raise ValueError(
                f"unknown expert backend {self.backend!r} (STABLEMOE_EXPERT_BACKEND): choose auto or one of "
                f"{', '.join(EXPERT_BACKENDS)}"
            )

    def train(self, mode: bool = True) -> "Experts":
        if mode:
            self._stacks.clear()
        return super().train(mode)

    def keeps_stacks(self) -> bool:
        """Whether the grouped backends keep their stacked weights between calls: at inference (eval
        mode, and autograd off or no expert parameter requiring a gradient)."""
        if self.training:
            return False
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters())

    def members(self, counts: Sequence[int]) -> List[int]:
        """The experts a grouped backend runs for ``counts``: the busy ones in training (an idle expert gets
        no gradient); all of them at inference (:meth:`stacked`), the idle ones as empty segments."""
        if self.keeps_stacks():
            return list(range(len(self)))
        return [i for i, n in enumerate(counts) if n > 0]

    def stacked(self, depth: int, members: Sequence[int], x: torch.Tensor) -> "Stacks":
        """Sublayer ``depth`` of the experts ``members`` (:meth:`members`), stacked (see :class:`Stacks`).

        In training (not :meth:`keeps_stacks`) a new stack per call, with
        autograd. At inference (``members`` all local experts) the stacks are
        kept (one more copy of the weights) and reused while every parameter
        is the same tensor with the same version counter and data pointer (an
        in-place change under ``no_grad``, ``load_state_dict``, a move to
        another device or dtype makes new ones). They are dropped on every
        call that does not keep them (a training forward) and on ``train()``:
        optimizers that write through ``p.data`` (fairseq's Adam, its fp16
        master copy) leave the version counter as it was, and a training step
        always has a training forward before them.
        """
        if not self.keeps_stacks():
            self._stacks.clear()
            vectors, *linear = _stacked([self[i][depth] for i in members])
            return Stacks(vectors, *_products(x, linear))
        params = [p for expert in self for p in expert[depth].parameters()]
        key = (_autocast_dtype(x), tuple((p._version, p.data_ptr()) for p in params))
        entry = self._stacks.get(depth)
        if entry is None or entry[0] != key or any(p is not q for p, q in zip(params, entry[1])):
            with torch.no_grad():
                vectors, w1, b1, w2 = _stacked([expert[depth] for expert in self])
                rows = torch.cat([vectors.transpose(0, 1).reshape(len(self), -1), b1], dim=1)
                entry = self._stacks[depth] = (key, params, Stacks(vectors, *_products(x, (w1, b1, w2)), rows))
        return entry[2]

    def backend_for(self, features: torch.Tensor, counts: Optional[Sequence[int]] = None) -> str:
        """The backend that runs ``features`` ``(T, d)`` split by ``counts``: :attr:`backend`, or for
        ``auto`` :func:`choose_backend` with the device's values (the products' dtype under autocast,
        the CUDA compute capability). ``counts`` (python ints, one per local expert) None: the choice for
        evenly split tokens (no padding)."""
        if self.backend != "auto":
            return self.backend
        device = features.device
        capability = None
        if device.type == "cuda" and not torch.version.hip:
            capability = torch.cuda.get_device_capability(device)
        padded = [1] * len(self) if counts is None else [counts[i] for i in self.members(counts)]
        dtype = _autocast_dtype(features) or features.dtype
        return choose_backend(device.type, dtype, capability, features.shape[-1], self[0][0].fc1.out_features, padded)

    def forward(self, sorted_features: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Run each expert on its contiguous segment of tokens.

        The backend is :meth:`backend_for` (see the module doc).

        Args:
            sorted_features: ``(T, d)`` tokens sorted by expert.
            counts: ``len(self)`` segment lengths (python ints), summing to ``T``.
        Returns:
            ``(T, d)``: each expert's output minus its input (the residual
            update ``FFN_i(h)`` that the gate scales), in the same order.
        """
        counts = list(counts)
        if not any(counts):
            # no token here (T = 0): return the empty input itself, not a new tensor, so
            # the result stays in the autograd graph and every process runs the same
            # all-to-alls in the backward (a detached result would leave the others waiting)
            return sorted_features
        return EXPERT_BACKENDS[self.backend_for(sorted_features, counts)](self, sorted_features, counts)


def run_loop(experts: Experts, sorted_features: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """``loop`` backend: every busy expert's own :meth:`Expert.update` on its segment, one after the other."""
    busy = [i for i, n in enumerate(counts) if n > 0]
    if len(busy) == 1:
        return experts[busy[0]].update(sorted_features)
    chunks = torch.split(sorted_features, counts)
    return torch.cat([experts[i].update(chunks[i]) for i in busy], dim=0)


def run_threads(experts: Experts, sorted_features: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """``threads`` backend: ``loop``'s work, the experts side by side in worker threads where that can run."""
    busy = [i for i, n in enumerate(counts) if n > 0]
    workers = num_workers(sorted_features, len(busy))
    if workers < 2:
        return run_loop(experts, sorted_features, counts)
    return run_experts(experts, torch.split(sorted_features, counts), busy, sorted_features, workers)


#: CUDA compute capability majors on which torch's ``grouped_mm`` runs bf16 as one fused kernel (SM90, SM100)
FUSED_GROUPED_MM_MAJORS = (9, 10)
#: on CUDA without that kernel, ``auto`` runs ``loop`` once ``padded_bmm``'s padded rows exceed this many
#: times the real ones
MAX_PADDING = 2


def fused_grouped_mm(dtype: torch.dtype, capability: Optional[Tuple[int, int]], dim: int, ffn_dim: int) -> bool:
    """Whether torch's ``grouped_mm`` runs products in ``dtype`` on a CUDA device of ``capability`` as one
    fused kernel (no host sync): bfloat16, capability major 9 or 10, rows of a multiple of 16 bytes (``dim``
    and ``ffn_dim`` multiples of 8). ``capability`` None: not a CUDA device (or ROCm)."""
    return (
        hasattr(F, "grouped_mm")
        and dtype == torch.bfloat16
        and capability is not None
        and capability[0] in FUSED_GROUPED_MM_MAJORS
        and dim % 8 == 0
        and ffn_dim % 8 == 0
    )


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    capability: Optional[Tuple[int, int]],
    dim: int,
    ffn_dim: int,
    counts: Sequence[int],
) -> str:
    """The ``auto`` backend (a key of :data:`EXPERT_BACKENDS`; see the module doc).

    Args:
        device_type: the features' ``device.type``.
        dtype: the dtype of the products (autocast's where it is on, else the features').
        capability: the CUDA compute capability ``(major, minor)``; None elsewhere.
        dim, ffn_dim: ``d`` and ``f`` of the experts' sublayers.
        counts: the tokens of each expert that ``padded_bmm`` would pad (:meth:`Experts.members`: ``L =
            len(counts)``), python ints.
    Returns:
        ``loop`` off CUDA; on CUDA ``grouped_mm`` where :func:`fused_grouped_mm`, else ``padded_bmm``
        unless ``L * max(counts) > MAX_PADDING * sum(counts)`` (then ``loop``).
    """
    if device_type != "cuda":
        return "loop"
    if fused_grouped_mm(dtype, capability, dim, ffn_dim):
        return "grouped_mm"
    padded_rows = len(counts) * max(counts, default=0)
    return "loop" if padded_rows > MAX_PADDING * sum(counts) else "padded_bmm"


def grouped_mm_supported(features: torch.Tensor, ffn_dim: int) -> bool:
    """Whether torch runs ``grouped_mm`` on ``features`` ``(T, d)``, in the dtype of the products, without a
    host sync: on CUDA :func:`fused_grouped_mm` (what ``auto`` picks it for); on CPU float32 and bfloat16
    (a host kernel: no sync; ``auto`` picks ``loop`` there all the same)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = _autocast_dtype(features) or features.dtype
    if features.device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if features.device.type == "cuda" and not torch.version.hip:
        capability = torch.cuda.get_device_capability(features.device)
        return fused_grouped_mm(dtype, capability, features.shape[-1], ffn_dim)
    return False


def _stacked(sublayers: Sequence[FFNSublayer]) -> Tuple[torch.Tensor, ...]:
    """The sublayers' parameters stacked (autograd copies; the gradients go back to each sublayer's own).

    Returns ``(vectors, w1, b1, w2)``: ``vectors`` ``(3, L, d)`` the norm weights,
    norm biases and ``fc2`` biases (one copy for the three), ``w1`` ``(L, d, f)``,
    ``b1`` ``(L, f)``, ``w2`` ``(L, f, d)`` (the matrices transposed views of the
    stacked ``(L, out, in)`` weights).
    """
    vectors = [m.norm.weight for m in sublayers] + [m.norm.bias for m in sublayers] + [m.fc2.bias for m in sublayers]
    return (
        torch.stack(vectors).view(3, len(sublayers), -1),
        torch.stack([m.fc1.weight for m in sublayers]).transpose(1, 2),
        torch.stack([m.fc1.bias for m in sublayers]),
        torch.stack([m.fc2.weight for m in sublayers]).transpose(1, 2),
    )


def _autocast_dtype(x: torch.Tensor):
    """The dtype autocast gives matrix products on ``x``'s device, or None when it is off."""
    kind = x.device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except (TypeError, AttributeError, RuntimeError):  # pragma: no cover - older torch or another device
        return None


def _products(x: torch.Tensor, params: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """Under autocast the matrix products run in its dtype, as ``nn.Linear`` does (the norm stays as it is)."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return params
    return tuple(p.to(dtype) for p in params)


def run_grouped_mm(experts: Experts, sorted_features: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """``grouped_mm`` backend: jagged segments, one grouped product per matrix and sublayer."""
    members = experts.members(counts)
    device = sorted_features.device
    offsets = torch.tensor(_cumsum([counts[i] for i in members]), dtype=torch.int32).to(device, non_blocking=True)
    # the expert of every row (its index among the members: the segments ending at or before it), for the
    # per-expert vectors
    positions = torch.arange(sorted_features.shape[0], dtype=torch.int32, device=device)
    expert_of_row = torch.searchsorted(offsets, positions, right=True)

    def residual(x: torch.Tensor, depth: int) -> torch.Tensor:
        stacks = experts.stacked(depth, members, x)
        d, f = stacks.w1.shape[1:]
        if stacks.rows is not None:
            norm_w, norm_b, b2, b1 = stacks.rows.index_select(0, expert_of_row).split([d, d, d, f], dim=1)
        else:  # in training two gathers: split's backward would copy the (T, f) gradient once more
            norm_w, norm_b, b2 = stacks.vectors.index_select(1, expert_of_row).unbind(0)  # (T, d) each
            b1 = stacks.b1.index_select(0, expert_of_row)
        first = experts[members[0]][depth]
        normed = _layer_norm(x, norm_w, norm_b, first.norm.eps)
        hidden = F.grouped_mm(normed.to(stacks.w1.dtype), stacks.w1, offs=offsets) + b1.to(stacks.w1.dtype)
        out = F.grouped_mm(first.activation_fn(hidden), stacks.w2, offs=offsets)
        if out.requires_grad:  # grouped_mm's backward refuses a broadcast gradient (e.g. of out.sum())
            out.register_hook(torch.Tensor.contiguous)
        return out + b2.to(out.dtype)

    return _sum_of_updates(len(experts[members[0]]), sorted_features, residual)


def run_padded_bmm(experts: Experts, sorted_features: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """``padded_bmm`` backend: segments padded to the largest, one ``baddbmm`` per matrix and sublayer."""
    busy = experts.members(counts)
    sizes = [counts[i] for i in busy]
    L, C, d = len(busy), max(sizes), sorted_features.shape[1]
    device = sorted_features.device
    starts = _cumsum([0] + sizes[:-1])
    # row t of expert e (t-th of its segment) goes to padded row e * C + (t - start_e)
    shift = torch.tensor([e * C - s for e, s in enumerate(starts)]).to(device, non_blocking=True)
    slot = torch.arange(sorted_features.shape[0], device=device) + torch.repeat_interleave(
        shift, torch.tensor(sizes).to(device, non_blocking=True), output_size=sorted_features.shape[0]
    )
    padded = sorted_features.new_zeros(L * C, d).index_copy(0, slot, sorted_features).view(L, C, d)

    def residual(x: torch.Tensor, depth: int) -> torch.Tensor:
        vectors, w1, b1, w2, _ = experts.stacked(depth, busy, x)
        norm_w, norm_b, b2 = vectors.unsqueeze(2).unbind(0)  # (L, 1, d) each
        first = experts[busy[0]][depth]
        normed = _layer_norm(x, norm_w, norm_b, first.norm.eps)
        hidden = first.activation_fn(torch.baddbmm(b1.unsqueeze(1), normed.to(w1.dtype), w1))
        return torch.baddbmm(b2.to(hidden.dtype), hidden, w2)

    total = _sum_of_updates(len(experts[busy[0]]), padded, residual)
    return total.view(L * C, d).index_select(0, slot)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` ``(..., d)`` with per-row or per-expert (broadcast) ``weight`` and ``bias``.

    Normalised and scaled in fp32 and rounded once to ``x``'s dtype, as ``nn.LayerNorm``'s fused
    kernel does: in bf16 a rounding after the normalisation and another after the scaling made every
    gradient upstream of it about 10x less accurate than the loop's. A no-op cast in fp32 (and under
    autocast, which runs layer norms in fp32).
    """
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return torch.addcmul(bias.float(), normed, weight.float()).to(x.dtype)


def _sum_of_updates(depth: int, x: torch.Tensor, residual) -> torch.Tensor:
    """``Expert.update`` for all experts at once: ``residual(x, k)`` for every sublayer depth ``k``."""
    total = r = residual(x, 0)
    for k in range(1, depth):
        x = x + r
        r = residual(x, k)
        total = total + r
    return total


def _cumsum(values: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for v in values:
        acc += v
        out.append(acc)
    return out


#: name -> ``run(experts, sorted_features, counts)`` (counts python ints, not all zero)
EXPERT_BACKENDS: dict = {
    "loop": run_loop,
    "threads": run_threads,
    "grouped_mm": run_grouped_mm,
    "padded_bmm": run_padded_bmm,
}
