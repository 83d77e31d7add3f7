"""Experts run side by side in worker threads (CPU, several intra-op threads) compute exactly
what the one-after-the-other loop computes with one intra-op thread: every expert runs
single-threaded either way, so the experts' outputs and gradients must match bit for bit. What
the main thread reduces with 2 rather than 1 intra-op threads (the routers' gradients) is
compared within the fp32 round-off bound of its reductions (see the layer test)."""

import multiprocessing as mp
import threading

import pytest
import torch

from fairseq_stablemoe.distributed.expert_parallel import scale_expert_gradients
from fairseq_stablemoe.modules import expert_threads
from fairseq_stablemoe.modules.experts import Experts
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

D, F = 16, 48
COUNTS = [5, 0, 9, 1, 0, 7, 3]  # two experts get no token


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def make_experts(seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(len(COUNTS), D, F, num_sublayers=2)
    experts.backend = "threads"  # side by side (the CPU default is one after the other)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)  # fc2 starts at zero: give every weight a gradient path
    # the hook of expert parallelism (gradient / world size) must apply exactly once
    scale_expert_gradients(list(experts.parameters()), world_size=2)
    return experts


def threads_used(experts: Experts, fn):
    """Run ``fn`` and return the names of the threads that ran the experts' first layers."""
    names = set()
    handles = [e[0].fc1.register_forward_hook(lambda *_: names.add(threading.current_thread().name)) for e in experts]
    try:
        out = fn()
    finally:
        for h in handles:
            h.remove()
    return out, names


def step(experts: Experts, x: torch.Tensor, g: torch.Tensor, input_grad: bool = True):
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    out = experts(x, COUNTS)
    (out * g).sum().backward()
    grads = {n: p.grad for n, p in experts.named_parameters()}
    return out.detach(), x.grad, grads


def one_thread(fn):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("input_grad", [True, False])
def test_side_by_side_equals_one_after_the_other(two_threads, input_grad):
    experts = make_experts()
    x = torch.randn(sum(COUNTS), D)
    g = torch.randn(sum(COUNTS), D)
    assert expert_threads.num_workers(x, 5) == 2
    (out, gx, grads), names = threads_used(experts, lambda: step(experts, x, g, input_grad))
    assert names and all(n.startswith("stablemoe-experts") for n in names), names
    (ref_out, ref_gx, ref_grads), ref_names = threads_used(
        experts, lambda: one_thread(lambda: step(experts, x, g, input_grad))
    )
    assert ref_names == {threading.current_thread().name}

    assert torch.equal(out, ref_out)
    if input_grad:
        assert torch.equal(gx, ref_gx)
    else:
        assert gx is None and ref_gx is None
    for name, ref in ref_grads.items():
        expert = int(name.split(".")[0])
        if COUNTS[expert] == 0:
            assert ref is None and grads[name] is None, name
        else:
            assert ref is not None and torch.equal(grads[name], ref), name


def test_side_by_side_parameter_gradient_is_the_hooked_autograd_gradient(two_threads):
    """Independent of the sequential path: each expert's gradient from autograd on its own
    tokens, halved by the expert-parallel hook (once)."""
    experts = make_experts()
    x = torch.randn(sum(COUNTS), D)
    g = torch.randn(sum(COUNTS), D)
    _, _, grads = step(experts, x, g)
    start = 0
    for i, count in enumerate(COUNTS):
        if count == 0:
            continue
        params = list(experts[i].parameters())
        plain = [p.detach().clone().requires_grad_() for p in params]
        xi = x[start : start + count]
        # the expert's update by hand, with the copies (no hooks on them): two residual sublayers
        h = xi
        total = torch.zeros_like(xi)
        for j in range(2):
            ln_w, ln_b, w1, b1, w2, b2 = plain[6 * j : 6 * j + 6]
            r = torch.relu(torch.nn.functional.layer_norm(h, (D,), ln_w, ln_b) @ w1.t() + b1) @ w2.t() + b2
            total = total + r
            h = h + r
        expected = torch.autograd.grad((total * g[start : start + count]).sum(), plain)
        for (name, _), e in zip(experts[i].named_parameters(), expected):
            torch.testing.assert_close(grads[f"{i}.{name}"], 0.5 * e, rtol=1e-5, atol=1e-6)
        start += count


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_side_by_side_without_autograd(two_threads, mode):
    experts = make_experts()
    x = torch.randn(sum(COUNTS), D)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        (out, names) = threads_used(experts, lambda: experts(x, COUNTS))
    assert all(n.startswith("stablemoe-experts") for n in names)
    assert not out.requires_grad
    with torch.no_grad():
        ref = one_thread(lambda: experts(x, COUNTS))
    assert torch.equal(out, ref)


#: fp32 unit round-off
U32 = 2.0**-24


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: a length-``n`` dot product computed in fp32 in *any*
    order (any blocking, FMA or not) is within ``gamma_n * sum_k |x_k y_k|`` of the exact one
    (Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5)."""
    return n * U32 / (1 - n * U32)


def test_layer_stage1_side_by_side_equals_one_thread(two_threads):
    """The whole StableMoE layer in stage 1 (gate, both losses) through the threaded experts.

    Bit-equality is asserted where the operations are the same: every expert runs single-threaded
    on both paths. The routers' centroid gradients are ``G^T X`` (``G = dL/d affinities``, ``(T, N)``;
    ``X`` the router's features, ``(T, d)``): a GEMM on the main thread that reduces over the ``T``
    tokens, and BLAS may split that reduction between 2 intra-op threads but not between 1, so the
    two results may differ by the round-off of two summation orders, at most
    ``2 gamma_T |G|^T |X|`` per element, plus what differences of ``G`` or ``X`` themselves carry
    (``|dG|^T |X| + |G|^T |dX|``; they are measured, and are 0 on the machines seen so far). (An
    AMD EPYC without AVX-512 differs by 5.9e-7 on entries of size ~10, sum of |terms| ~11, T = 80:
    the bound there is 2.1e-5.)
    """
    torch.manual_seed(3)
    layer = StableMoELayer(D, F, 6, 1, vocab_size=50, padding_idx=1, two_stage_updates=10)
    layer.experts.backend = "threads"
    for e in layer.experts:
        torch.nn.init.normal_(e[0].fc2.weight, std=0.3)
    layer.train()
    layer.set_num_updates(0)
    h = torch.randn(40, 2, D)
    tokens = torch.randint(2, 50, (40, 2))
    tokens[-3:, 1] = 1  # padding
    g = torch.randn(40, 2, D)
    routers = {"backbone.expert_centroids": layer.backbone, "distill_router.centroids": layer.distill_router}

    def run():
        seen = {}

        def capture(name):
            def hook(module, args, affinities):
                # the features whose product with the centroids gives the affinities
                feats = args[0] if module is layer.backbone else module.embed_tokens(args[0])
                seen[name] = [feats.detach().reshape(-1, feats.shape[-1]).double(), None]
                affinities.register_hook(lambda grad: seen[name].__setitem__(1, grad.detach().double()))

            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in routers.items()]
        try:
            layer.zero_grad(set_to_none=True)
            x = h.clone().requires_grad_()
            out, stats = layer(x, tokens)
            ((out * g).sum() + stats["balance_loss"] + stats["distill_loss"]).backward()
        finally:
            for handle in handles:
                handle.remove()
        return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, seen

    out, gx, grads, seen = run()
    ref_out, ref_gx, ref_grads, ref_seen = one_thread(run)
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    for name, ref in ref_grads.items():
        got = grads[name]
        if name.startswith("experts."):
            assert (ref is None) == (got is None) and (ref is None or torch.equal(got, ref)), name
        elif name in routers:
            (X, G), (X1, G1) = seen[name], ref_seen[name]
            bound = 2 * gamma(X.shape[0]) * (G1.abs().t() @ X1.abs())
            bound += (G - G1).abs().t() @ X1.abs() + G.abs().t() @ (X - X1).abs()
            excess = (got.double() - ref.double()).abs() - bound
            assert excess.max() <= 0, f"{name}: exceeds the round-off bound by {excess.max():.3g}"
        else:  # the distilled router's embedding: row v sums G_t E_hat (N terms) over the k tokens t with id v
            G, G1 = seen["distill_router.centroids"][1], ref_seen["distill_router.centroids"][1]
            C = layer.distill_router.centroids.detach().double()
            ids = tokens.reshape(-1)
            k = int(torch.bincount(ids).max())
            per_id = torch.zeros(ref.shape, dtype=torch.float64).index_add_(0, ids, G1.abs() @ C.abs())
            bound = 2 * gamma(C.shape[0] + k) * per_id
            bound += torch.zeros_like(bound).index_add_(0, ids, (G - G1).abs() @ C.abs())
            excess = (got.double() - ref.double()).abs() - bound
            assert excess.max() <= 0, f"{name}: exceeds the round-off bound by {excess.max():.3g}"


def test_worker_error_reaches_the_caller(two_threads):
    experts = make_experts()
    bad = torch.randn(sum(COUNTS), D + 1)  # wrong model dimension
    with pytest.raises(RuntimeError):
        experts(bad, COUNTS)
    # and the pool still works afterwards
    x = torch.randn(sum(COUNTS), D)
    with torch.no_grad():
        assert torch.equal(experts(x, COUNTS), one_thread(lambda: experts(x, COUNTS)))


def test_caller_keeps_its_thread_count(two_threads):
    experts = make_experts()
    x = torch.randn(sum(COUNTS), D)
    with torch.no_grad():
        experts(x, COUNTS)
    assert torch.get_num_threads() == 2


def _child(queue):
    torch.set_num_threads(2)
    experts = make_experts()
    x = torch.randn(sum(COUNTS), D)
    with torch.no_grad():
        out = experts(x, COUNTS)
    queue.put(float(out.abs().sum()))


def test_forked_process_gets_its_own_workers(two_threads):
    """A fork (e.g. a DataLoader worker) inherits the pool object but not its threads."""
    experts = make_experts()
    with torch.no_grad():
        expected = float(experts(torch.randn(sum(COUNTS), D), COUNTS).abs().sum())  # parent's pool exists now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked process hung on the parent's worker threads")
    assert child.exitcode == 0
    assert queue.get(timeout=10) == expected  # same seed, same experts and tokens
