"""fairseq's ``--amp`` update with the plugin loaded: the loss scale divided out once, and an overflow in
one process's experts skipping the update on every process.

fairseq's ``AMPOptimizer`` unscales the gradients on the torch optimizer (``clip_grad_norm``) and hands
its fairseq wrapper to the scaler (``step``); torch's ``GradScaler`` keeps its state per object, so
without the plugin's hook the gradients are divided by the scale twice. ``--amp`` only runs on CUDA;
here torch's CPU ``GradScaler`` replaces the CUDA one (disabled without CUDA), as in test_grad_norm.py.

Expected values are computed directly: plain SGD moves a parameter by ``-lr * g`` on the true gradient
``g`` (clipped: ``g * min(1, max_norm / (|g| + 1e-6))``, ``|g|`` over every gradient in float64).
"""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
from corpus import run_processes

W = 2
LR = 0.5
INIT_SCALE = 8
SHAPES = {"shared.a": (5, 3), "shared.b": (7,), "experts.0.w": (4, 6)}


def build(params):
    """fairseq's AMPOptimizer around plain SGD (``--amp --optimizer sgd``), with torch's CPU scaler."""
    from fairseq import optim, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [
            "unused",
            "--task",
            "language_modeling",
            "--arch",
            "transformer_lm",
            "--optimizer",
            "sgd",
            "--lr",
            str(LR),
            "--amp",
            "--fp16-init-scale",
            str(INIT_SCALE),
        ],
    )
    opt = optim.AMPOptimizer.build_optimizer(convert_namespace_to_omegaconf(args), params)
    opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)  # the CUDA scaler, on CPU
    return opt


def make_params(plugin: bool):
    """Zero parameters of SHAPES; with ``plugin``, the experts carry the plugin's ``expert_replicas``."""
    params = []
    for name, shape in SHAPES.items():
        p = torch.nn.Parameter(torch.zeros(shape))
        if plugin and name.startswith("experts"):
            p.expert = True
            p.expert_replicas = 1
        params.append(p)
    return params


def grads_of(rank: int, step: int):
    """Shared gradients equal on every process (as after legacy_ddp's all-reduce), expert ones per process."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        seed = 100 * step + i + (1000 * rank if name.startswith("experts") else 0)
        out[name] = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return out


def amp_update(opt, params, grads, max_norm):
    """fairseq's order in ``Trainer.train_step``: backward (loss scaled), clip_grad_norm, step."""
    opt.zero_grad()
    opt.backward(sum((p * g).sum() for p, g in zip(params, grads.values())))  # d loss / d p = g
    norm = None if max_norm is None else float(opt.clip_grad_norm(max_norm))
    opt.step()
    return norm


def expected_sgd(before, grads, max_norm, norm):
    coef = 1.0 if not max_norm else min(1.0, max_norm / (norm + 1e-6))
    return [b.double() - LR * coef * g.double() for b, g in zip(before, grads.values())]


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin_experts", "plain_params"])
@pytest.mark.parametrize("max_norm", [None, 0.0, 1.0], ids=["no_clip_call", "no_clipping", "clipped"])
def test_amp_update_equals_sgd_on_the_true_gradient(plugin, max_norm):
    import fairseq_stablemoe  # noqa: F401  (installs the hooks)

    params = make_params(plugin)
    opt = build(params)
    for step in range(2):  # the second update runs after scaler.update(): no state left over
        grads = grads_of(0, step)
        true_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
        assert max_norm is None or max_norm == 0 or true_norm > max_norm  # the clipped case clips
        before = [p.detach().clone() for p in params]
        norm = amp_update(opt, params, grads, max_norm)
        if max_norm is not None:
            assert norm == pytest.approx(true_norm, rel=1e-6)  # the norm of the unscaled gradients
        for p, want in zip(params, expected_sgd(before, grads, max_norm, true_norm)):
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7)
        assert opt.scaler.get_scale() == INIT_SCALE  # no overflow: the scale is kept


def worker(rank: int, port: int, queue) -> None:
    """An update with an inf in rank 1's expert gradients, then a finite one, on this process."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=W,
            timeout=datetime.timedelta(seconds=60),
        )
        import fairseq_stablemoe  # noqa: F401  (installs the hooks)

        params = make_params(plugin=True)
        opt = build(params)
        result = {"rank": rank}
        grads = grads_of(rank, 0)
        if rank == 1:
            grads["experts.0.w"][2, 3] = float("inf")
        before = [p.detach().clone() for p in params]
        result["overflow_norm"] = amp_update(opt, params, grads, 0.0)
        result["overflow_unchanged"] = all(torch.equal(b, p.detach()) for b, p in zip(before, params))
        result["overflow_scale"] = opt.scaler.get_scale()
        # a finite update at the lowered scale: unscaled once, by that scale
        grads = grads_of(rank, 1)
        before = [p.detach().clone() for p in params]
        amp_update(opt, params, grads, 0.0)
        want = expected_sgd(before, grads, 0.0, None)
        result["finite_max_error"] = max(float((p.detach().double() - w).abs().max()) for p, w in zip(params, want))
        result["finite_max_move"] = max(float(w.abs().max()) for w in want)
        result["finite_scale"] = opt.scaler.get_scale()
        queue.put((rank, result))
        dist.destroy_process_group()
    except BaseException as e:  # report instead of leaving the other process waiting
        queue.put((rank, repr(e)))
        raise


def test_overflow_in_one_process_experts_skips_the_update_on_every_process():
    got = run_processes(worker, W)
    for rank in range(W):
        r = got[rank]
        assert isinstance(r, dict), r
        assert not math.isfinite(r["overflow_norm"]), r  # both processes see the other's inf
        assert r["overflow_unchanged"], f"rank {rank} updated with an overflow in rank 1's experts"
        assert r["overflow_scale"] == INIT_SCALE / 2, r  # the scale drops on both, by the same factor
        assert r["finite_scale"] == INIT_SCALE / 2, r
        assert r["finite_max_error"] <= 1e-6 * r["finite_max_move"], r  # -lr * g, not -lr * g / scale
