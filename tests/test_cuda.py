"""On one CUDA GPU: the layer against the same layer on CPU, the grouped backends against the loop,
the ``auto`` choice, host syncs, and ``fairseq-train`` in fp32, ``--fp16`` and ``--amp`` (fairseq's
``--bf16`` implies ``--tpu``; bf16 on a GPU is tested as the experts' backends under autocast).

Every test is skipped where torch sees no GPU; ``scripts/gpu_check.sh`` runs this file on a machine
with one. The references are independent of the code under test: the CPU run of a copy of the same
layer, the per-expert ``loop`` backend, CUDA's own synchronisation report
(``torch.cuda.set_sync_debug_mode``), and the training loss of the run itself.
"""

import contextlib
import copy
import math
import re
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import test_host_syncs  # noqa: E402
from conftest import BOUNDARY, run_cli, train_args  # noqa: E402
from test_e2e import load_state, losses_by_update, saved_update  # noqa: E402
from test_expert_backends import MODES, D, F, OpCount, assert_same, layer_of, random_experts, run  # noqa: E402
from test_host_syncs import HostSyncs, build  # noqa: E402

CUDA = torch.device("cuda")
LAYER_MODES = [m for m in MODES if m[0] in ("stage1", "stage2", "inference")]


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    """fp32 products in fp32 (TF32 off, torch's default), so fp32 results can be compared closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def grouped_mm_runs() -> bool:
    """Whether torch runs ``grouped_mm`` here in bf16 (the condition under which ``auto`` picks it)."""
    from fairseq_stablemoe.modules.experts import grouped_mm_supported

    return grouped_mm_supported(torch.zeros(1, D, device=CUDA, dtype=torch.bfloat16), F)


def autocast(device_type: str, dtype=None):
    """``torch.autocast`` with ``dtype``, or nothing when ``dtype`` is None."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` (Frobenius norms, in fp64)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def layer_run(layer, h, tokens, training: bool, backend: str, dtype=None):
    """Output, the input's gradient, every parameter's gradient and the stats of one forward
    (+ backward in training) of ``layer`` on ``h``'s device; the forward under autocast with ``dtype``."""
    layer.experts.backend = backend
    layer.zero_grad(set_to_none=True)
    x = h.clone().requires_grad_()
    with autocast(h.device.type, dtype):
        out, stats = layer(x, tokens)
        loss = (out.float() * h).sum() + stats.get("balance_loss", 0) + stats.get("distill_loss", 0)
    if training:
        loss.backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads, {k: v.detach() for k, v in stats.items()}


def perturbed_layer(mode: str, updates: int, training: bool):
    layer = layer_of(mode)
    with torch.no_grad():  # fc2 starts at zero: give the experts a part to play
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    layer.set_num_updates(updates)
    return layer.train(training)


def inputs(device, seed: int = 5, length: int = 24, batch: int = 4):
    from test_expert_backends import PAD, VOCAB

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(length, batch, D, generator=g)
    tokens = torch.randint(PAD + 1, VOCAB, (length, batch), generator=g)
    tokens[length - 5 :, 2] = PAD
    return h.to(device), tokens.to(device)


# ----------------------------------------------------------------------------- the layer: CUDA against CPU


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("mode, updates, training", LAYER_MODES, ids=[m[0] for m in LAYER_MODES])
def test_layer_on_cuda_equals_cpu(mode, updates, training, backend):
    """fp32: the same layer and inputs on CUDA and on CPU (``loop``) give the same routing, output,
    and gradients of the input and of every parameter (stage 1, stage 2, inference)."""
    cpu_layer = perturbed_layer(mode, updates, training)
    gpu_layer = copy.deepcopy(cpu_layer).to(CUDA)
    h, tokens = inputs("cpu")
    want = layer_run(cpu_layer, h, tokens, training, "loop")
    got = layer_run(gpu_layer, h.to(CUDA), tokens.to(CUDA), training, backend)
    out, x_grad, grads, stats = got
    want_out, want_x_grad, want_grads, want_stats = want
    assert out.device.type == CUDA.type
    assert torch.equal(stats["load"].cpu(), want_stats["load"]), (stats["load"], want_stats["load"])
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-4, atol=1e-5)
    if training:
        torch.testing.assert_close(x_grad.cpu(), want_x_grad, rtol=1e-4, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (want_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad.cpu(), want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert stats.keys() == want_stats.keys()
    for key, value in stats.items():
        torch.testing.assert_close(value.cpu(), want_stats[key], rtol=1e-4, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------- grouped backends against the loop


@pytest.mark.parametrize("sublayers", [1, 3])
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [1, 1, 1, 40]], ids=["idle-expert", "skewed"])
def test_padded_bmm_equals_loop_fp32(sublayers, counts):
    experts = random_experts(len(counts), sublayers).to(CUDA)
    g = torch.Generator().manual_seed(2)
    x, grad = (torch.randn(sum(counts), D, generator=g).to(CUDA) for _ in range(2))
    assert_same(run(experts, "padded_bmm", x, counts, grad), run(experts, "loop", x, counts, grad))


def test_grouped_mm_equals_loop_fp32_where_torch_runs_it():
    """fp32 ``grouped_mm`` on CUDA is not what ``auto`` picks (bf16 only); compared where torch runs it."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    counts = [5, 0, 7, 3]
    experts = random_experts(len(counts), 2).to(CUDA)
    g = torch.Generator().manual_seed(2)
    x, grad = (torch.randn(sum(counts), D, generator=g).to(CUDA) for _ in range(2))
    try:
        got = run(experts, "grouped_mm", x, counts, grad)
    except RuntimeError as e:
        pytest.skip(f"torch refuses fp32 grouped_mm on this GPU: {str(e)[:200]}")
    assert_same(got, run(experts, "loop", x, counts, grad))


def bf16_backends():
    return ["padded_bmm", "grouped_mm"]


def assert_as_accurate(got, loop, exact, what: str) -> None:
    """bf16 results of a backend (``got``) and of ``loop`` against the fp32 ``exact``: the backend is
    about as accurate as the loop (within twice its error, plus a small slack), each tensor and gradient.
    ``got``/``loop``/``exact``: (output, input gradient or None, {parameter: gradient or None})."""
    pairs = [("output", got[0], loop[0], exact[0]), ("input grad", got[1], loop[1], exact[1])]
    assert got[2].keys() == loop[2].keys() == exact[2].keys()
    pairs += [(name, got[2][name], loop[2][name], exact[2][name]) for name in exact[2]]
    for name, a, b, ref in pairs:
        assert (a is None) == (b is None) == (ref is None), (what, name)
        if ref is None:
            continue
        e_got, e_loop = rel_err(a, ref), rel_err(b, ref)
        assert e_got <= 2 * e_loop + 1e-2 and e_got < 0.25, (what, name, e_got, e_loop)


@pytest.mark.parametrize("backend", bf16_backends())
@pytest.mark.parametrize("params", ["autocast", "bf16"], ids=["amp-autocast", "bf16-parameters"])
def test_grouped_backends_equal_loop_in_bf16(backend, params):
    """Under bf16 autocast (fp32 parameters), and with bf16 parameters (as ``--bf16``): the backend's
    output and every gradient are as close to the fp32 ``loop`` result as the bf16 ``loop``'s are."""
    if backend == "grouped_mm" and not grouped_mm_runs():
        pytest.skip("torch does not run grouped_mm in bf16 on this GPU (compute capability < 8.0 or old torch)")
    counts = [37, 0, 70, 21]
    experts = random_experts(len(counts), 3).to(CUDA)
    g = torch.Generator().manual_seed(4)
    x, grad = (torch.randn(sum(counts), D, generator=g).to(CUDA) for _ in range(2))
    if params == "bf16":
        experts, x, grad = experts.to(torch.bfloat16), x.to(torch.bfloat16), grad.to(torch.bfloat16)
    results = {}
    for name in ("loop", backend):
        with autocast(CUDA.type, torch.bfloat16 if params == "autocast" else None):
            results[name] = run(experts, name, x, counts, grad)
    assert results[backend][0].dtype == results["loop"][0].dtype == torch.bfloat16
    exact = run(copy.deepcopy(experts).float(), "loop", x.float(), counts, grad.float())
    assert_as_accurate(results[backend], results["loop"], exact, params)


@pytest.mark.parametrize("backend", bf16_backends())
@pytest.mark.parametrize("mode, updates, training", LAYER_MODES, ids=[m[0] for m in LAYER_MODES])
def test_layer_backends_equal_loop_under_bf16_autocast(backend, mode, updates, training):
    """The whole layer under bf16 autocast (as ``--amp`` would run it in bf16): routing stays fp32 (the
    same choice and losses as the loop's), the output and gradients as accurate as the loop's."""
    if backend == "grouped_mm" and not grouped_mm_runs():
        pytest.skip("torch does not run grouped_mm in bf16 on this GPU")
    layer = perturbed_layer(mode, updates, training).to(CUDA)
    h, tokens = inputs(CUDA)
    exact = layer_run(layer, h, tokens, training, "loop")
    want = layer_run(layer, h, tokens, training, "loop", dtype=torch.bfloat16)
    got = layer_run(layer, h, tokens, training, backend, dtype=torch.bfloat16)
    assert torch.equal(got[3]["load"], want[3]["load"]) and torch.equal(got[3]["load"], exact[3]["load"])
    for key in ("balance_loss", "distill_loss"):
        if key in want[3]:
            torch.testing.assert_close(got[3][key], want[3][key], rtol=1e-5, atol=1e-6, msg=key)
    assert_as_accurate(got[:3], want[:3], exact[:3], mode)


def test_auto_picks_a_grouped_backend_on_cuda():
    """``auto`` on CUDA: ``grouped_mm`` in bf16 where torch supports it (autocast or bf16 parameters),
    else ``padded_bmm``; and the chosen path is the one that runs (its operator is dispatched)."""
    layer = perturbed_layer("inference", 20, False).to(CUDA)
    assert layer.experts.backend == "auto"
    h, tokens = inputs(CUDA)
    assert layer.experts.backend_for(h) == "padded_bmm"  # fp32
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        with_autocast = layer.experts.backend_for(h)
    with_bf16 = layer.experts.backend_for(h.to(torch.bfloat16))
    expected = "grouped_mm" if grouped_mm_runs() else "padded_bmm"
    assert with_autocast == with_bf16 == expected
    for dtype, op in ((None, "baddbmm"), (torch.bfloat16, "grouped_mm" if expected == "grouped_mm" else "baddbmm")):
        with torch.no_grad(), autocast(CUDA.type, dtype):
            with OpCount() as ops:
                layer(h, tokens)
        assert any(op in name for name in ops.ops), (dtype, sorted(ops.ops))


@pytest.mark.parametrize("backend, dtype", [("padded_bmm", None), ("grouped_mm", torch.bfloat16)])
def test_grouped_op_count_does_not_grow_with_experts_on_cuda(backend, dtype, monkeypatch):
    """The issue-14 property on CUDA: an inference forward dispatches as many ATen operators (about the
    kernel launches) with 16 local experts as with 4."""
    from test_expert_backends import PAD, VOCAB

    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    if backend == "grouped_mm" and not grouped_mm_runs():
        pytest.skip("torch does not run grouped_mm in bf16 on this GPU")
    monkeypatch.setenv("STABLEMOE_EXPERT_BACKEND", backend)
    counts = {}
    for n in (4, 16):
        torch.manual_seed(0)
        layer = StableMoELayer(D, F, n, 3, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=0).eval().to(CUDA)
        h, tokens = torch.randn(64, D, device=CUDA), (torch.arange(64, device=CUDA) % (VOCAB - 2) + 2)
        with torch.no_grad(), autocast(CUDA.type, dtype):
            layer(h, tokens)  # the first call builds the kept stacks
            with OpCount() as ops:
                layer(h, tokens)
        counts[n] = sum(ops.ops.values())
    assert counts[4] == counts[16], counts


# ----------------------------------------------------------------------------- host syncs


def reported(caught) -> list:
    """Where CUDA's sync debug mode reported a synchronising call (the Python line that made it)."""
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def syncs_on_cuda(kind: str, dtype=torch.float32, backend: str = "auto"):
    """One forward (after a warm-up forward) and its backward on CUDA: the calls the Python counter of
    ``test_host_syncs`` sees, and what CUDA itself reports as synchronising (sync debug mode)."""
    layer = build(kind).to(CUDA, dtype).train(kind != "inference")
    for m in layer.modules():
        if hasattr(m, "backend_for"):
            m.backend = backend
    pad, vocab = test_host_syncs.PAD, test_host_syncs.VOCAB
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 3, test_host_syncs.D, generator=g).to(CUDA, dtype).requires_grad_()
    tokens = torch.randint(pad + 1, vocab, (6, 3), generator=g).to(CUDA)
    tokens[4:, 1] = pad
    layer(h, tokens)  # warm-up: CUDA context, cuBLAS handles, the frozen router's table
    torch.cuda.synchronize()
    result = {}
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as fwd_warn:
            warnings.simplefilter("always")
            with HostSyncs() as fwd:
                out, stats = layer(h, tokens)
                loss = out.square().sum() + stats.get("balance_loss", 0) + stats.get("distill_loss", 0)
        result["forward"] = (fwd.calls, reported(fwd_warn))
        if layer.training:
            with warnings.catch_warnings(record=True) as bwd_warn:
                warnings.simplefilter("always")
                with HostSyncs() as bwd:
                    loss.backward()
            result["backward"] = (bwd.calls, reported(bwd_warn))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return result


@pytest.mark.parametrize("kind", ["stage1", "stage2", "inference", "capacity", "switch", "hash"])
def test_one_host_sync_per_forward_on_cuda(kind):
    result = syncs_on_cuda(kind)
    calls, reported = result["forward"]
    assert calls == ["tolist"], result
    assert len(reported) == 1, result  # CUDA's own report: the one device-to-host copy of the counts
    if "backward" in result:
        assert result["backward"] == ([], []), result


@pytest.mark.parametrize("kind", ["stage1", "stage2", "inference"])
def test_one_host_sync_per_forward_in_bf16_on_the_grouped_path(kind):
    """bf16 on ``grouped_mm`` (where torch fuses it): still the counts' one copy to the host per forward,
    none in the backward (torch's unfused fallback would copy the offsets in every product)."""
    if not grouped_mm_runs():
        pytest.skip("torch runs no fused grouped_mm on this GPU")
    result = syncs_on_cuda(kind, dtype=torch.bfloat16, backend="grouped_mm")
    calls, reported = result["forward"]
    assert calls == ["tolist"], result
    assert len(reported) == 1, result
    if "backward" in result:
        assert result["backward"] == ([], []), result


def test_sync_debug_mode_sees_syncs():
    """The CUDA report is not blind: an ``.item()`` is reported."""
    x = torch.ones(3, device=CUDA)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert any("synchroniz" in str(m.message) for m in w), [str(m.message) for m in w]


# ----------------------------------------------------------------------------- fairseq-train on one GPU

# fairseq's --bf16 implies --tpu (its XLA path): bf16 on a GPU is the experts' backends under autocast
# (the tests above), not a fairseq-train mode
PRECISIONS = {"fp32": [], "fp16": ["--fp16"], "amp": ["--amp"]}
UPDATES, RESUMED = 60, 66  # stage 2 from update BOUNDARY (30)


def gpu_train_args(data, save, *extra):
    """The shared recipe of ``conftest.train_args`` on the GPU (no ``--cpu``)."""
    return [a for a in train_args(data, save, *extra) if a != "--cpu"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fairseq_train_on_one_gpu(markov_data, tmp_path, precision):
    """60 updates of a tiny ``stablemoe_lm`` across the stage boundary: finite losses that fall, stage 2
    after the boundary, then the checkpoint reloads (the run resumes at update 60 from its state)."""
    save = tmp_path / "ckpt"
    extra = PRECISIONS[precision]
    first = run_cli(
        "train", *gpu_train_args(markov_data.data_dir, save, "--max-update", str(UPDATES), *extra), timeout=300
    )
    text = first.stdout + first.stderr
    assert "CUDA enviroments for all 1 workers" in text, text[-2000:]  # fairseq's banner (its spelling): on the GPU
    log = losses_by_update(text)
    assert log and max(log) == UPDATES, sorted(log)
    losses = [float(r["loss"]) for _, r in sorted(log.items())]
    assert all(math.isfinite(x) for x in losses), losses
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < start - 1.0, (precision, start, end)
    stage2 = [r for u, r in log.items() if u - 1 >= BOUNDARY]
    assert stage2 and all(r["stage"] == "2" and float(r["distill_loss"]) == 0 for r in stage2)
    assert all(float(r["balance_loss"]) > 0 for u, r in log.items() if u - 1 < BOUNDARY)
    state = load_state(save / "checkpoint_last.pt")
    assert saved_update(state) == UPDATES
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # the checkpoint reloads: fairseq-train resumes from it (model, optimizer, loss scaler) on the GPU
    second = run_cli(
        "train", *gpu_train_args(markov_data.data_dir, save, "--max-update", str(RESUMED), *extra), timeout=300
    )
    text2 = second.stdout + second.stderr
    assert re.search(rf"loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ {UPDATES} updates\)", text2, re.I), (
        text2[-3000:]
    )
    resumed = losses_by_update(text2)
    assert resumed and min(resumed) > UPDATES and max(resumed) == RESUMED, sorted(resumed)
    again = [float(r["loss"]) for r in resumed.values()]
    assert all(math.isfinite(x) for x in again) and max(again) < start - 1.0, (start, again)


@pytest.mark.parametrize(
    "flags", [["--moe-type", "base"], ["--stage1-assignment", "balanced"]], ids=["base-layers", "balanced-stage1"]
)
def test_balanced_assignment_trains_on_one_gpu(markov_data, tmp_path, flags):
    """fairseq's libbase auction (BASE layers, StableMoE's balanced stage 1) on CUDA scores: finite losses
    that fall over 40 updates."""
    pytest.importorskip("fairseq.libbase", reason="fairseq's libbase extension is not built for this Python")
    args = gpu_train_args(markov_data.data_dir, tmp_path / "ckpt", "--max-update", "40", "--no-save", *flags)
    out = run_cli("train", *args, timeout=300)
    log = losses_by_update(out.stdout + out.stderr)
    assert log and max(log) == 40, sorted(log)
    losses = [float(r["loss"]) for _, r in sorted(log.items())]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
