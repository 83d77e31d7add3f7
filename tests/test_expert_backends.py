"""The grouped expert backends (``grouped_mm``, ``padded_bmm``) against the per-expert ``loop``.

Forward, the gradient of the tokens and of every expert parameter (and which
ones get none: an expert without tokens), alone and inside a layer in every
routing mode; the checkpoint layout is the same whatever the backend; the
number of ATen operators of the grouped paths does not grow with the number
of experts.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fairseq_stablemoe.modules.experts import EXPERT_BACKENDS, Experts

GROUPED = ["grouped_mm", "padded_bmm", "threads"]  # threads: the loop's work in worker threads
D, F, PAD, VOCAB = 16, 32, 1, 50


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def random_experts(num: int, sublayers: int) -> Experts:
    experts = Experts(num, D, F, sublayers, seed=7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in experts.parameters():  # fc2 starts at zero: give every parameter a part to play
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == D else 0.0))
    return experts


def run(experts: Experts, backend: str, x: torch.Tensor, counts, grad: torch.Tensor):
    experts.backend = backend
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = experts(x, counts)
    (out * grad).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in experts.named_parameters()}


def assert_same(got, want):
    out, x_grad, grads = got
    want_out, want_x_grad, want_grads = want
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (want_grads[name] is None), name
        if g is not None:
            torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", GROUPED)
@pytest.mark.parametrize("sublayers", [1, 2])
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 9, 0, 0], [1, 1, 1, 12]])
def test_experts_equal_loop(backend, sublayers, counts):
    experts = random_experts(len(counts), sublayers)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), D, generator=g)
    grad = torch.randn(sum(counts), D, generator=g)
    assert_same(run(experts, backend, x, counts, grad), run(experts, "loop", x, counts, grad))


@pytest.mark.parametrize("backend", GROUPED)
def test_experts_take_a_broadcast_gradient(backend):
    """``out.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    counts = [4, 0, 6, 2]
    experts = random_experts(len(counts), 2)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(3))
    ones = torch.ones(sum(counts), D).expand(sum(counts), D)

    def summed(backend):
        experts.backend = backend
        experts.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        experts(xg, counts).sum().backward()
        return None, xg.grad, {n: p.grad for n, p in experts.named_parameters()}

    got, want = summed(backend), summed("loop")
    assert_same((ones, *got[1:]), (ones, *want[1:]))


@pytest.mark.parametrize("backend", GROUPED)
def test_experts_without_tokens(backend):
    experts = random_experts(3, 1)
    experts.backend = backend
    x = torch.randn(0, D, requires_grad=True)
    out = experts(x, [0, 0, 0])
    assert out.shape == (0, D) and out.requires_grad


@pytest.mark.parametrize("backend", GROUPED)
def test_experts_under_autocast(backend):
    experts = random_experts(3, 2)
    x = torch.randn(12, D)
    outs = {}
    for name in ("loop", backend):
        experts.backend = name
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = experts(x, [4, 5, 3])
    assert outs[backend].dtype == outs["loop"].dtype == torch.bfloat16
    # bfloat16 keeps 8 bits: the grouped paths round the product and its bias separately
    torch.testing.assert_close(outs[backend].float(), outs["loop"].float(), rtol=4e-2, atol=1e-1)


def layer_of(kind: str):
    from fairseq_stablemoe.modules.baseline_layers import HashLayer, SwitchLayer
    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    torch.manual_seed(0)
    if kind == "switch":
        return SwitchLayer(D, F, 4, 2, PAD)
    if kind == "hash":
        return HashLayer(D, F, 4, 2, PAD, symbols=[f"w{i}" for i in range(VOCAB)])
    return StableMoELayer(
        D,
        F,
        4,
        2,
        vocab_size=VOCAB,
        padding_idx=PAD,
        two_stage_updates=10,
        capacity_factor=0.9 if kind == "capacity" else None,
    )


MODES = [
    ("stage1", 0, True),
    ("stage2", 20, True),
    ("inference", 20, False),
    ("capacity", 0, True),
    ("switch", 0, True),
    ("hash", 0, True),
]


@pytest.mark.parametrize("backend", GROUPED)
@pytest.mark.parametrize("mode, updates, training", MODES, ids=[m[0] for m in MODES])
def test_layer_equal_loop(backend, mode, updates, training):
    layer = layer_of(mode)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    if hasattr(layer, "two_stage_updates"):
        layer.set_num_updates(updates)
    layer.train(training)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(7, 3, D, generator=g)
    tokens = torch.randint(PAD + 1, VOCAB, (7, 3), generator=g)
    tokens[5:, 2] = PAD
    results = {}
    for name in ("loop", backend):
        layer.experts.backend = name
        layer.zero_grad(set_to_none=True)
        x = h.clone().requires_grad_()
        torch.manual_seed(3)  # the capacity's random overflow draw
        out, stats = layer(x, tokens)
        if training:
            loss = (out * h).sum() + stats.get("balance_loss", 0) + stats.get("distill_loss", 0)
            loss.backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results[name] = (out.detach(), x.grad, grads, stats)
    out, x_grad, grads, stats = results[backend]
    want_out, want_x_grad, want_grads, want_stats = results["loop"]
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    if training:
        torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        assert (grad is None) == (want_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert stats.keys() == want_stats.keys()
    for key, value in stats.items():
        torch.testing.assert_close(value.detach(), want_stats[key].detach(), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("backend", GROUPED)
def test_checkpoint_layout_unchanged(backend, monkeypatch):
    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    monkeypatch.setenv("STABLEMOE_EXPERT_BACKEND", backend)
    torch.manual_seed(0)
    grouped = StableMoELayer(D, F, 4, 2, vocab_size=VOCAB, padding_idx=PAD)
    assert grouped.experts.backend == backend
    monkeypatch.delenv("STABLEMOE_EXPERT_BACKEND")
    torch.manual_seed(0)
    loop = StableMoELayer(D, F, 4, 2, vocab_size=VOCAB, padding_idx=PAD)
    assert loop.experts.backend == "auto" and loop.experts.backend_for(torch.zeros(1, D)) == "loop"
    a, b = grouped.state_dict(), loop.state_dict()
    assert list(a) == list(b) and "experts.3.1.fc1.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one backend's checkpoint loads into the other and gives the same outputs
    with torch.no_grad():
        for p in loop.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    grouped.load_state_dict(loop.state_dict())
    grouped.eval(), loop.eval()
    h, tokens = torch.randn(6, 2, D), torch.randint(PAD + 1, VOCAB, (6, 2))
    with torch.no_grad():
        torch.testing.assert_close(grouped(h, tokens)[0], loop(h, tokens)[0], rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("STABLEMOE_EXPERT_BACKEND", "fast")
    with pytest.raises(ValueError, match="grouped_mm"):
        Experts(2, D, F, 1)
    assert set(EXPERT_BACKENDS) == {"loop", "threads", "grouped_mm", "padded_bmm"}


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
def test_grouped_op_count_does_not_grow_with_experts(backend, monkeypatch):
    """One thread, so that every operator runs in this thread's dispatch mode."""
    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    monkeypatch.setenv("STABLEMOE_EXPERT_BACKEND", backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = {}
        for n in (4, 16):
            torch.manual_seed(0)
            layer = StableMoELayer(D, F, n, 1, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=0).eval()
            h, tokens = torch.randn(64, D), torch.arange(64) % (VOCAB - 2) + 2  # every expert busy or not: same
            with torch.no_grad(), OpCount() as ops:
                layer(h, tokens)
            counts[n] = sum(ops.ops.values())
    finally:
        torch.set_num_threads(threads)
    assert counts[4] == counts[16], counts


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("kind", ["stage1", "inference", "capacity"])
def test_grouped_backends_keep_one_host_sync(backend, kind, monkeypatch):
    """The grouped paths build their offsets from the python counts: no sync of their own."""
    import test_host_syncs

    monkeypatch.setenv("STABLEMOE_EXPERT_BACKEND", backend)
    counts = test_host_syncs.count(kind)
    assert counts["forward"] == ["tolist"], counts
    assert counts.get("backward", []) == [], counts


class Stacks(TorchDispatchMode):
    """Counts the ``stack`` operators (the grouped backends' weight copies)."""

    def __init__(self):
        super().__init__()
        self.stacks = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.stacks += func.overloadpacket.__name__ == "stack"
        return func(*args, **(kwargs or {}))


def inference(experts: Experts, x: torch.Tensor, counts):
    with torch.no_grad(), Stacks() as mode:
        out = experts(x, counts)
    return out, mode.stacks


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [2, 4, 1, 6]], ids=["idle-expert", "all-busy"])
def test_inference_keeps_the_stacks_and_follows_the_weights(backend, counts):
    experts = random_experts(len(counts), 2)
    experts.backend = backend
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), D, generator=g)

    def loop():
        experts.backend = "loop"
        with torch.no_grad():
            out = experts(x, counts)
        experts.backend = backend
        return out

    experts.eval()
    first, stacked = inference(experts, x, counts)
    again, restacked = inference(experts, x, counts)
    assert stacked > 0 and restacked == 0
    assert torch.equal(again, first)  # the kept stacks are the weights themselves
    experts.train()  # a training forward stacks afresh (and drops what inference kept)
    with Stacks() as mode:
        trained = experts(x.clone().requires_grad_(), counts)
    assert mode.stacks > 0 and torch.equal(trained.detach(), first)
    experts.eval()
    torch.testing.assert_close(inference(experts, x, counts)[0], loop(), rtol=1e-5, atol=1e-5)
    # changed in place under no_grad (the version counter)
    p = experts[2][1].fc1.weight
    with torch.no_grad():
        p.add_(1.0)
    changed, restacked = inference(experts, x, counts)
    assert restacked > 0 and not torch.equal(changed, first)
    torch.testing.assert_close(changed, loop(), rtol=1e-5, atol=1e-5)
    # loaded weights
    other = random_experts(len(counts), 2)
    with torch.no_grad():
        for q in other.parameters():
            q.mul_(-0.5)
    experts.load_state_dict(other.state_dict())
    loaded, restacked = inference(experts, x, counts)
    assert restacked > 0
    torch.testing.assert_close(loaded, loop(), rtol=1e-5, atol=1e-5)
    # written through .data (as fairseq's optimizers do): invisible to the version counter, so the
    # stacks go with the next train() (every training step starts with one) or training forward
    p.data.add_(1.0)
    experts.train()
    experts.eval()
    torch.testing.assert_close(inference(experts, x, counts)[0], loop(), rtol=1e-5, atol=1e-5)
    # a new tensor in place of a parameter's (as a move to another dtype or device makes)
    p.data = p.data - 2.0
    moved, restacked = inference(experts, x, counts)
    assert restacked > 0
    torch.testing.assert_close(moved, loop(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
def test_no_stacks_kept_where_autograd_reaches_the_experts(backend):
    experts = random_experts(3, 1)
    experts.backend = backend
    x = torch.randn(9, D)
    experts.eval()
    with Stacks() as mode:  # eval mode with autograd on: a forward that may be differentiated
        out = experts(x, [3, 3, 3])
        (out * x).sum().backward()
    assert mode.stacks > 0 and not experts._stacks
    assert all(p.grad is not None for p in experts.parameters())
    for p in experts.parameters():  # no expert parameter trains: the stacks are kept
        p.requires_grad_(False)
    inference(experts, x, [3, 3, 3])
    with Stacks() as mode:
        experts(x.requires_grad_(), [3, 3, 3])
    assert mode.stacks == 0


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
def test_kept_stacks_under_autocast_equal_fresh_ones(backend):
    experts = random_experts(3, 2)
    experts.backend = backend
    x = torch.randn(12, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = experts(x, [4, 0, 8]).detach()  # training mode: stacked on this call
        experts.eval()
        kept = [inference(experts, x, [4, 0, 8]) for _ in range(2)]
    assert kept[0][1] > 0 and kept[1][1] == 0
    assert fresh.dtype == kept[1][0].dtype == torch.bfloat16
    assert torch.equal(kept[0][0], fresh) and torch.equal(kept[1][0], fresh)
    with torch.no_grad():  # the stacks in the products' dtype are not those of a forward without autocast
        torch.testing.assert_close(experts(x, [4, 0, 8]), fresh.float(), rtol=4e-2, atol=1e-1)
    assert experts._stacks[0][0][0] is None


# ----------------------------------------------------------------------------- the ``auto`` choice

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CAPABILITIES = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)]
#: CUDA, d=16, f=32, 4 experts of 4 tokens each: (capability, dtype) -> backend, written out from the rule
#: (torch's fused grouped_mm: bf16 on majors 9 and 10 only; elsewhere padded_bmm, no padding here)
AUTO_ON_CUDA = {
    ((8, 0), BF16): "padded_bmm",
    ((8, 6), BF16): "padded_bmm",
    ((8, 9), BF16): "padded_bmm",
    ((9, 0), BF16): "grouped_mm",
    ((10, 0), BF16): "grouped_mm",
    ((10, 3), BF16): "grouped_mm",
    ((12, 0), BF16): "padded_bmm",
    ((8, 0), FP16): "padded_bmm",
    ((8, 6), FP16): "padded_bmm",
    ((8, 9), FP16): "padded_bmm",
    ((9, 0), FP16): "padded_bmm",
    ((10, 0), FP16): "padded_bmm",
    ((10, 3), FP16): "padded_bmm",
    ((12, 0), FP16): "padded_bmm",
    ((8, 0), FP32): "padded_bmm",
    ((8, 6), FP32): "padded_bmm",
    ((8, 9), FP32): "padded_bmm",
    ((9, 0), FP32): "padded_bmm",
    ((10, 0), FP32): "padded_bmm",
    ((10, 3), FP32): "padded_bmm",
    ((12, 0), FP32): "padded_bmm",
}


@pytest.mark.parametrize("capability, dtype", list(AUTO_ON_CUDA), ids=lambda v: str(v).replace(" ", ""))
def test_auto_on_cuda_by_capability_and_dtype(capability, dtype):
    from fairseq_stablemoe.modules.experts import choose_backend

    assert choose_backend("cuda", dtype, capability, D, F, [4, 4, 4, 4]) == AUTO_ON_CUDA[capability, dtype]


#: (d, f) -> backend on an SM90 GPU in bf16 (rows of 16 bytes: d and f multiples of 8)
ALIGNMENT = {(16, 32): "grouped_mm", (24, 40): "grouped_mm", (12, 32): "padded_bmm", (16, 36): "padded_bmm"}


@pytest.mark.parametrize("dim, ffn_dim", list(ALIGNMENT))
def test_auto_on_cuda_needs_aligned_rows_for_grouped_mm(dim, ffn_dim):
    from fairseq_stablemoe.modules.experts import choose_backend

    assert choose_backend("cuda", BF16, (9, 0), dim, ffn_dim, [3, 3]) == ALIGNMENT[dim, ffn_dim]


#: counts -> backend on CUDA without the fused kernel: padded_bmm pads L experts to the busiest one's
#: count; written out as L * max against 2 * sum
SKEW = {
    (4, 4, 4, 4): "padded_bmm",  # 16 <= 32: no padding at all
    (7, 1): "padded_bmm",  # 14 <= 16: two experts never pad more than 2x
    (4, 4, 0, 0): "padded_bmm",  # 16 == 2 * 8: exactly double keeps padded_bmm
    (6, 2, 1): "padded_bmm",  # 18 == 2 * 9
    (5, 4, 0, 0): "loop",  # 20 > 18
    (6, 2, 0): "loop",  # 18 > 16
    (6, 1, 1): "loop",  # 18 > 16
    (97, 1, 1, 1): "loop",  # 388 > 200: one expert gets most tokens
    (12,): "padded_bmm",  # one expert: no padding
}


@pytest.mark.parametrize("counts", list(SKEW), ids=str)
@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (12, 0)])
@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_auto_on_cuda_avoids_padding_more_than_double(counts, capability, dtype):
    from fairseq_stablemoe.modules.experts import choose_backend

    assert choose_backend("cuda", dtype, capability, D, F, list(counts)) == SKEW[counts]


@pytest.mark.parametrize("counts", [(97, 1, 1, 1), (6, 2, 0)], ids=str)
def test_auto_runs_fused_grouped_mm_under_any_skew(counts):
    """``grouped_mm`` runs jagged segments: no padding to avoid."""
    from fairseq_stablemoe.modules.experts import choose_backend

    assert choose_backend("cuda", BF16, (9, 0), D, F, list(counts)) == "grouped_mm"
    assert choose_backend("cuda", BF16, (8, 0), D, F, list(counts)) == "loop"


@pytest.mark.parametrize("device_type", ["cpu", "mps", "xpu"])
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("counts", [(4, 4, 4, 4), (97, 1, 1, 1)], ids=str)
def test_auto_off_cuda_is_loop(device_type, dtype, counts):
    from fairseq_stablemoe.modules.experts import choose_backend

    assert choose_backend(device_type, dtype, None, D, F, list(counts)) == "loop"


def test_auto_without_torch_grouped_mm(monkeypatch):
    import fairseq_stablemoe.modules.experts as experts_module

    monkeypatch.delattr(experts_module.F, "grouped_mm", raising=False)
    assert experts_module.choose_backend("cuda", BF16, (9, 0), D, F, [4, 4]) == "padded_bmm"


@pytest.mark.parametrize(
    "training, autocast, counts, passed",
    [
        (True, False, [5, 0, 7, 3], [5, 7, 3]),  # in training padded_bmm pads the busy experts only
        (False, False, [5, 0, 7, 3], [5, 0, 7, 3]),  # at inference all of them (the kept stacks)
        (True, True, [1, 0, 0, 12], [1, 12]),
    ],
)
def test_forward_asks_choose_backend(training, autocast, counts, passed, monkeypatch):
    """``auto`` is :func:`choose_backend` with the call's values (here on CPU: no capability), and the forward
    runs what it returns."""
    import fairseq_stablemoe.modules.experts as experts_module

    calls = []

    def spy(*args):
        calls.append(args)
        return "padded_bmm"

    monkeypatch.setattr(experts_module, "choose_backend", spy)
    experts = random_experts(len(counts), 1).train(training)
    x = torch.randn(sum(counts), D)
    context = torch.autocast("cpu", dtype=BF16) if autocast else torch.no_grad()
    with context, OpCount() as ops:
        experts(x, counts)
    assert calls == [("cpu", BF16 if autocast else FP32, None, D, F, passed)]
    assert any("baddbmm" in name for name in ops.ops), sorted(ops.ops)


@pytest.mark.parametrize("counts", [[4, 4, 4], [30, 1, 1]], ids=["balanced", "skewed"])
def test_auto_on_cpu_runs_loop(counts):
    """On CPU ``auto`` runs the per-expert modules (``loop``): no ``baddbmm`` nor ``grouped_mm``."""
    experts = random_experts(len(counts), 1)
    assert experts.backend == "auto" and experts.backend_for(torch.zeros(1, D), counts) == "loop"
    with torch.no_grad(), OpCount() as ops:
        experts(torch.randn(sum(counts), D), counts)
    assert not any("baddbmm" in name or "grouped_mm" in name for name in ops.ops), sorted(ops.ops)
    assert sum("addmm" in name for name in ops.ops.elements()) == 2 * len(counts)  # fc1, fc2 per expert


class CudaFeatures:
    """Stands for ``(T, d)`` features on a CUDA device (what :meth:`Experts.backend_for` reads of them)."""

    def __init__(self, dtype: torch.dtype, tokens: int = 12):
        self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, (tokens, D)


@pytest.mark.parametrize("capability", CAPABILITIES, ids=str)
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_backend_for_asks_the_cuda_capability(capability, dtype, monkeypatch):
    """``auto`` on CUDA reads the device's compute capability (stubbed here); counts None: even split."""

    def capability_of(device=None):
        assert torch.device(device) == torch.device("cuda", 0), device  # the features' GPU
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.version, "hip", None)
    experts = random_experts(4, 1)
    assert experts.backend_for(CudaFeatures(dtype)) == AUTO_ON_CUDA[capability, dtype]
    skewed = "grouped_mm" if AUTO_ON_CUDA[capability, dtype] == "grouped_mm" else "loop"
    assert experts.backend_for(CudaFeatures(dtype, 100), [97, 1, 1, 1]) == skewed
    experts.backend = "padded_bmm"  # an explicit backend whatever the device
    assert experts.backend_for(CudaFeatures(dtype, 100), [97, 1, 1, 1]) == "padded_bmm"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize(
    "backend",
    [
        "padded_bmm",
        pytest.param(
            "grouped_mm",
            marks=pytest.mark.xfail(
                strict=True,
                reason="grouped_mm's bf16 gradients of some experts' fc2 and norm vectors: 3-10x the loop's error "
                "(the same figures on an H200); cause not found",
            ),
        ),
    ],
)
@pytest.mark.parametrize("params", ["autocast", "bf16"], ids=["amp-autocast", "bf16-parameters"])
def test_grouped_backends_as_accurate_as_the_loop_in_bf16(backend, params):
    """bf16 parameters (or bf16 autocast): every gradient within twice the loop's error against fp32 (plus
    0.01), the criterion of the GPU test. A LayerNorm rounded twice (after normalising, after scaling) made
    padded_bmm's gradients about 10x less accurate than the loop's."""
    import copy

    counts = [37, 0, 70, 21]
    experts = random_experts(len(counts), 3)
    g = torch.Generator().manual_seed(4)
    x, grad = (torch.randn(sum(counts), D, generator=g) for _ in range(2))
    if params == "bf16":
        experts, x, grad = experts.to(torch.bfloat16), x.to(torch.bfloat16), grad.to(torch.bfloat16)
    results = {}
    for name in ("loop", backend):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=params == "autocast"):
            results[name] = run(experts, name, x, counts, grad)
    exact = run(copy.deepcopy(experts).float(), "loop", x.float(), counts, grad.float())
    worse = []
    for name, want in exact[2].items():
        if want is not None:
            e_got, e_loop = _rel_err(results[backend][2][name], want), _rel_err(results["loop"][2][name], want)
            if not e_got <= 2 * e_loop + 1e-2:
                worse.append((name, round(e_got, 4), round(e_loop, 4)))
    assert _rel_err(results[backend][0], exact[0]) <= 2 * _rel_err(results["loop"][0], exact[0]) + 1e-2
    assert not worse, worse
