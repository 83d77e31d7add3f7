"""The gradient norm of an expert-parallel model, through fairseq's optimizers, on 2 gloo processes.

fairseq's fp16 paths only run on CUDA; here they run on CPU by simulation:
the flat ``--fp16`` master copy is keyed by ``torch.cuda.current_device()``,
which the workers make return ``None`` (the ``device.index`` of a CPU tensor),
and ``--amp``'s ``torch.cuda.amp.GradScaler`` (disabled without CUDA) is
replaced by torch's CPU ``GradScaler``.

Each process holds the same shared gradients (as after ``legacy_ddp``'s
all-reduce) and its own expert gradients. Expected: the norm fairseq clips
with equals ``sqrt(|shared|^2 + sum over processes |experts|^2)``, computed
here directly in float64 from both processes' gradients, and is bit-identical
on both processes; an inf in one process's expert gradients makes both
processes see a non-finite norm, and with a loss scaler both skip the step
and lower the scale together.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
from corpus import run_processes

W = 2
MODES = ["fp32", "fp16", "fp16_no_flatten", "memory_efficient_fp16", "bf16", "memory_efficient_bf16", "amp"]
SHAPES = {"shared.a": (5, 3), "shared.b": (7,), "experts.0.w": (4, 6), "experts.1.w": (3,)}
INIT_SCALE = 8


def grads_of(rank: int):
    """Every process's gradients: shared ones equal on all processes, expert ones per process."""
    out = {}
    for name, shape in SHAPES.items():
        seed = 100 + list(SHAPES).index(name) + (1000 * rank if name.startswith("experts") else 0)
        out[name] = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out


def build(mode: str, params):
    from fairseq import optim, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    flags = {
        "fp16": ["--fp16"],
        "fp16_no_flatten": ["--fp16", "--fp16-no-flatten-grads"],
        "memory_efficient_fp16": ["--memory-efficient-fp16"],
        "bf16": ["--bf16"],
        "memory_efficient_bf16": ["--memory-efficient-bf16"],
        "amp": ["--amp"],
        "fp32": [],
    }[mode]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            "unused",
            "--task",
            "language_modeling",
            "--arch",
            "transformer_lm",
            "--optimizer",
            "adam",
            "--lr",
            "0.1",
            "--fp16-init-scale",
            str(INIT_SCALE),
            "--distributed-world-size",
            str(W),
            *flags,
        ],
    )
    cfg = convert_namespace_to_omegaconf(args)
    if mode in ("fp16", "fp16_no_flatten", "bf16"):
        return optim.FP16Optimizer.build_optimizer(cfg, params)
    if mode.startswith("memory_efficient"):
        return optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
    if mode == "amp":
        opt = optim.AMPOptimizer.build_optimizer(cfg, params)
        opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)  # the CUDA scaler, on CPU
        return opt
    return optim.build_optimizer(cfg.optimizer, params)


def case(rank: int, mode: str, overflow: bool) -> dict:
    """One optimizer mode on this process: fairseq's backward and clip_grad_norm, what each saw."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        "bf16" if "bf16" in mode else "fp16" if "fp16" in mode else "", torch.float32
    )
    grads = grads_of(rank)
    if overflow and rank == 1:
        grads["experts.0.w"][2, 3] = float("inf")
    params = []
    for name, shape in SHAPES.items():
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if name.startswith("experts"):
            p.expert = True
            p.expert_replicas = 1
        params.append(p)
    opt = build(mode, params)
    # fairseq's own backward (loss scaling included): d loss / d p = g
    opt.zero_grad()
    opt.backward(sum((p * g.to(dtype)).sum() for p, g in zip(params, grads.values())))
    scale = INIT_SCALE if ("fp16" in mode or mode == "amp") else 1
    stored = {n: p.grad.detach().double() / scale for n, p in zip(SHAPES, params)}
    before = [p.detach().clone() for p in params]
    result = {"rank": rank, "stored": {n: g.tolist() for n, g in stored.items()}}  # plain data through the queue
    try:
        norm = opt.clip_grad_norm(0.0 if not overflow else 1.0)
        result["norm"] = float(norm)
    except OverflowError as e:
        result["overflow_error"] = str(e)
    if overflow and mode == "amp":
        opt.step()
        result["unchanged"] = all(torch.equal(b, p.detach()) for b, p in zip(before, params))
        result["scale"] = float(opt.scaler.get_scale())
    if getattr(opt, "scaler", None) is not None and mode != "amp":
        result["scale"] = float(opt.scaler.loss_scale)
    dist.barrier()
    return result


def worker(rank: int, port: int, queue) -> None:
    """Every (mode, overflow) case in turn, in one process group (one start-up for the module)."""
    try:
        torch.set_num_threads(1)
        torch.cuda.current_device = lambda: None  # fairseq's flat fp16 copy, keyed as CPU tensors are
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=W,
            timeout=datetime.timedelta(seconds=60),
        )
        import fairseq_stablemoe  # noqa: F401  (installs the hooks)

        results = {}
        for mode in MODES:
            for overflow in (False, True):
                try:
                    results[mode, overflow] = case(rank, mode, overflow)
                except Exception as e:  # this case fails; the others still run
                    results[mode, overflow] = {"rank": rank, "exception": repr(e)}
        queue.put((rank, results))
        dist.destroy_process_group()
    except BaseException as e:  # report instead of leaving the other process waiting
        queue.put((rank, repr(e)))
        raise


@pytest.fixture(scope="module")
def all_cases():
    """``{(mode, overflow): [rank 0's result, rank 1's result]}`` from one 2-process run."""
    got = run_processes(worker, W)
    for rank in range(W):
        assert isinstance(got[rank], dict), got[rank]
    return {key: [got[r][key] for r in range(W)] for key in got[0]}


def run(all_cases, mode: str, overflow: bool):
    results = all_cases[mode, overflow]
    for r in results:
        assert "exception" not in r, r
    return results


@pytest.mark.parametrize("mode", MODES)
def test_norm_covers_every_expert_and_is_identical_on_every_process(all_cases, mode):
    results = run(all_cases, mode, overflow=False)

    def sum_sq(values):
        return float(torch.tensor(values, dtype=torch.float64).square().sum())

    shared = sum(sum_sq(g) for n, g in results[0]["stored"].items() if n.startswith("shared"))
    experts = sum(sum_sq(g) for r in results for n, g in r["stored"].items() if n.startswith("experts"))
    want = (shared + experts) ** 0.5
    # and not fairseq's own rule (experts left out), nor one process's experts only
    assert abs(want - shared**0.5) > 0.1
    assert results[0]["norm"] == results[1]["norm"]  # bit-identical: fairseq's cross-process check passes
    assert results[0]["norm"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_inf_in_one_process_experts_reaches_every_process(all_cases, mode):
    results = run(all_cases, mode, overflow=True)
    if mode in ("fp16", "fp16_no_flatten", "memory_efficient_fp16"):
        # fairseq's loss scaler: both processes skip the step and lower the scale together
        for r in results:
            assert "setting loss scale to" in r.get("overflow_error", ""), r  # fairseq skips the step
            assert r["scale"] == INIT_SCALE / 2
    elif mode == "amp":
        for r in results:
            assert r["norm"] != r["norm"] or r["norm"] == float("inf")
            assert r["unchanged"], "a process stepped with an overflow in another process's experts"
            assert r["scale"] == INIT_SCALE / 2
    else:  # fp32 and bf16 (no scaler): the non-finite norm stops fairseq's train_step on both
        for r in results:
            assert not (abs(r["norm"]) < float("inf")), r["norm"]
