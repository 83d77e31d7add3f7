"""Degenerate batches across 2 gloo processes, at the layer: experts of one process that
receive no token from anyone, a process whose batch is all padding, a process with one token.

Each process builds the single-process layer (all 4 experts) before joining the job and the
expert-parallel layer (2 local experts) after, with the same weights. The 2-process outputs,
losses and gradients must equal the single-process layer's on the concatenated global batch:
outputs and input gradients per process, auxiliary losses summed over processes, router
gradients summed over processes, and each local expert's gradient times W (the backward hook
divides expert gradients by W because fairseq multiplies every gradient by W afterwards).
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from corpus import free_port

PAD, VOCAB, D, F, N, W = 1, 30, 8, 16, 4, 2


def batches(case: str):
    """Per-rank ``(h, tokens)``, seeded the same on every rank."""
    g = torch.Generator().manual_seed(11)
    lengths = {"starved_experts": (9, 7), "all_padding_rank": (8, 6), "one_token_rank": (10, 1)}[case]
    out = []
    for rank, T in enumerate(lengths):
        h = torch.randn(T, D, generator=g)
        tokens = torch.randint(PAD + 1, VOCAB, (T,), generator=g)
        if case == "all_padding_rank" and rank == 1:
            tokens[:] = PAD
        out.append((h, tokens))
    return out


def starve(layer) -> None:
    """Backbone centroids that never pick experts 2 and 3 (those of rank 1): E_0 = v, E_1 = -v, E_2 = E_3 = 0."""
    with torch.no_grad():
        v = torch.linspace(1.0, 2.0, D)
        E = layer.backbone.expert_centroids
        E.zero_()
        E[0] = v
        E[1] = -v


def worker(rank: int, port: int, case: str, queue) -> None:
    try:
        torch.set_num_threads(1)
        from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

        torch.manual_seed(0)
        ref = StableMoELayer(D, F, N, 2, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=100)
        with torch.no_grad():
            for p in ref.experts.parameters():
                p.normal_(std=0.3)
        if case == "starved_experts":
            starve(ref)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=90))
        par = StableMoELayer(D, F, N, 2, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=100)
        assert len(par.experts) == N // W
        state = {k: v for k, v in ref.state_dict().items() if ".experts." not in f".{k}"}
        for local in range(N // W):
            for k, v in ref.experts[rank * (N // W) + local].state_dict().items():
                state[f"experts.{local}.{k}"] = v
        par.load_state_dict(state)
        ref.train(), par.train()
        ref.set_num_updates(0), par.set_num_updates(0)

        data = batches(case)
        g_out = [
            torch.randn(len(t), D, generator=torch.Generator().manual_seed(5 + r)) for r, (_, t) in enumerate(data)
        ]

        # single process, global batch
        h_all = torch.cat([h for h, _ in data]).requires_grad_()
        out_ref, st_ref = ref(h_all, torch.cat([t for _, t in data]))
        loss_ref = (out_ref * torch.cat(g_out)).sum() + 0.3 * st_ref["balance_loss"] + 0.3 * st_ref["distill_loss"]
        loss_ref.backward()

        # this process's share, experts sharded
        h = data[rank][0].clone().requires_grad_()
        out, st = par(h, data[rank][1])
        loss = (out * g_out[rank]).sum() + 0.3 * st["balance_loss"] + 0.3 * st["distill_loss"]
        loss.backward()

        start = sum(len(t) for _, t in data[:rank])
        sl = slice(start, start + len(data[rank][1]))
        checks = {}
        checks["output"] = torch.allclose(out, out_ref[sl], rtol=1e-5, atol=1e-6)
        checks["input_grad"] = torch.allclose(h.grad, h_all.grad[sl], rtol=1e-5, atol=1e-6)
        for key in ("balance_loss", "distill_loss"):
            total = st[key].detach().clone()
            dist.all_reduce(total)
            checks[key] = torch.allclose(total, st_ref[key].detach(), rtol=1e-5, atol=1e-6)
        for name, p in par.named_parameters():
            if ".experts." in f".{name}":
                local = int(name.split(".")[1])
                ref_p = dict(ref.experts[rank * (N // W) + local].named_parameters())[name.split(".", 2)[2]]
                want = ref_p.grad if ref_p.grad is not None else torch.zeros_like(ref_p)
                got = p.grad * W if p.grad is not None else torch.zeros_like(p)
            else:
                got = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(got)
                ref_p = dict(ref.named_parameters())[name]
                want = ref_p.grad if ref_p.grad is not None else torch.zeros_like(ref_p)
            checks[f"grad {name}"] = torch.allclose(got, want, rtol=1e-4, atol=1e-6)
        checks["finite"] = bool(torch.isfinite(out).all()) and bool(torch.isfinite(loss.detach()))
        queue.put((rank, checks, st_ref["load"].tolist()))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # report instead of hanging the other process
        queue.put((rank, {"exception": repr(e)}, None))
        raise


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("starved_experts", marks=pytest.mark.slow),
        pytest.param("all_padding_rank", marks=pytest.mark.slow),
        "one_token_rank",
    ],
)
def test_degenerate_batches_across_processes(case):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, case, queue), daemon=True) for r in range(W)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(W):
            # a process stuck in a collective (mismatched all-to-alls) shows up as a timeout here
            rank, checks, ref_load = queue.get(timeout=180)
            results[rank] = (checks, ref_load)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0, f"a process failed: {results}"
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    for rank, (checks, _) in results.items():
        failed = [k for k, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"
    if case == "starved_experts":
        # the case is what it claims: no token of the global batch went to experts 2 and 3
        ref_load = results[0][1]
        assert ref_load[2:] == [0.0, 0.0] and sum(ref_load) > 0
