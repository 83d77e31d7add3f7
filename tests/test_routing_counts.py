"""Exact distillation's counts, windows and refit table against a direct computation.

A StableMoE layer is trained through stage 1 on random tokens (its hidden
states drawn anew every update, so an id's backbone expert varies); the test
records every non-pad token's backbone choice (``argmax h . E``) itself and
computes, with plain Python counters, each window's ceiling and churn, the
refit window's majority map (ties to the distilled router's own choice) and
the hand-over statistics, then compares them with what the layer logs, saves
and freezes.

On 2 gloo processes: a stage-1 forward adds no collective for the counts (they
are summed where they are read, one ``all_reduce`` per window), and the two
processes' tables, windows, refit table and hand-over equal one process's over
the union of their tokens, through a checkpoint and resume inside a window.
"""

import datetime
import functools
import os
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from corpus import run_processes
from fairseq.logging import metrics

from fairseq_stablemoe.modules.routing_counts import not_counted
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

V, N, PAD, D = 40, 3, 1, 8
BOUNDARY, REFIT, WINDOW = 9, 4, 3


def make_layer(refit=True, experts=N, **kwargs):
    torch.manual_seed(0)
    return StableMoELayer(
        D,
        16,
        experts,
        1,
        vocab_size=V,
        padding_idx=PAD,
        two_stage_updates=BOUNDARY,
        distill_refit=refit,
        refit_updates=REFIT,
        routing_window=WINDOW,
        **kwargs,
    ).train()


def step_inputs(u, T=10, B=3):
    g = torch.Generator().manual_seed(100 + u)
    tokens = torch.randint(4, V, (T, B), generator=g)
    tokens[-2:, 0] = PAD  # padding is never counted
    h = torch.randn(T, B, D, generator=g)
    return h, tokens


def backbone_pairs(layer, h, tokens):
    """(id, expert) of every non-pad token, computed directly from the centroids."""
    choice = (h.reshape(-1, D) @ layer.backbone.expert_centroids.detach().t()).argmax(1)
    return [(int(t), int(e)) for t, e in zip(tokens.reshape(-1), choice) if int(t) != PAD]


def train_step(layer, u):
    """The layer's part of fairseq's update u+1: set_num_updates(u), forward, backward."""
    layer.set_num_updates(u)
    h, tokens = step_inputs(u)
    pairs = backbone_pairs(layer, h, tokens)
    out, stats = layer(h.requires_grad_(), tokens)
    (out.sum() + stats["distill_loss"] + stats["balance_loss"]).backward()
    return pairs


def ceiling_of(pairs):
    by_id = defaultdict(Counter)
    for t, e in pairs:
        by_id[t][e] += 1
    return sum(max(c.values()) for c in by_id.values()) / len(pairs), by_id


def first_majority(counter):
    top = max(counter.values())
    return min(e for e, n in counter.items() if n == top)


def test_windows_log_the_ceiling_and_churn_of_their_tokens():
    layer = make_layer(refit=False)
    windows, current = [], []
    logged = {}
    for u in range(BOUNDARY):
        current += train_step(layer, u)
        with metrics.aggregate(new_root=True) as agg:
            layer.set_num_updates(u + 1)  # what the plugin's trainer hook does after the step
        values = agg.get_smoothed_values()
        if (u + 1) % WINDOW == 0 or u + 1 == BOUNDARY:
            windows.append(current)
            current = []
            logged[len(windows)] = values
        else:
            assert "agree_ceiling" not in values
    assert len(windows) == 3
    last, prev_window, carried_total = {}, set(), 0
    for k, pairs in enumerate(windows, 1):
        ceiling, by_id = ceiling_of(pairs)
        assert logged[k]["agree_ceiling"] == pytest.approx(round(ceiling, 3), abs=1e-9)
        majority = {t: first_majority(c) for t, c in by_id.items()}
        compared = [t for t, _ in pairs if t in last]
        carried = [t for t in compared if t not in prev_window]  # compared with an older window's majority
        carried_total += len(carried)
        if k == 1:
            assert "route_churn" not in logged[k]
        else:
            churn = sum(1 for t in compared if majority[t] != last[t]) / len(compared)
            assert logged[k]["route_churn"] == pytest.approx(round(churn, 3), abs=1e-9)
        last.update(majority)
        prev_window = set(majority)
    assert carried_total > 0, "the test needs ids that skip a window"


@pytest.mark.parametrize("refit", [True, False])
def test_boundary_freezes_the_refit_windows_majority(refit):
    layer = make_layer(refit=refit)
    window = []
    for u in range(BOUNDARY):
        pairs = train_step(layer, u)
        if u >= BOUNDARY - REFIT:
            window += pairs
    layer.set_num_updates(BOUNDARY)  # the freeze
    router = layer.distill_router
    assert router.is_frozen
    own = router.own_table().tolist()
    ceiling, by_id = ceiling_of(window)
    expected, own_wins_tie, unseen = [], 0, 0
    for t in range(V):
        c = by_id.get(t)
        if not c:
            expected.append(own[t])  # never seen in the window: the distilled router's choice
            unseen += t not in (PAD, 0, 2, 3)
            continue
        top = max(c.values())
        expected.append(own[t] if c.get(own[t], 0) == top else first_majority(c))
        own_wins_tie += c.get(own[t], 0) == top and own[t] != first_majority(c)
    assert own_wins_tie > 0 and unseen > 0, "the test needs ties won by the router's own choice and unseen ids"
    table = router.choice_table()[0].tolist()
    assert table == (expected if refit else own)
    # the routing after the boundary is the table
    h, tokens = step_inputs(99)
    layer.set_num_updates(BOUNDARY + 1)
    routed = layer.assignment(h, tokens).reshape(-1).tolist()
    assert routed == [table[t] for t in tokens.reshape(-1).tolist()]
    # the hand-over statistics, kept in the state dict
    stats = layer.counts.handover_dict()
    n = len(window)
    agree_majority = sum(1 for t, _ in window if table[t] == expected[t]) / n
    agree_backbone = sum(1 for t, e in window if table[t] == e) / n
    assert stats["tokens"] == n and stats["refit_updates"] == REFIT
    assert stats["ceiling"] == pytest.approx(ceiling, rel=1e-12)
    assert stats["agree_majority"] == pytest.approx(agree_majority, rel=1e-12)
    assert stats["agree_backbone"] == pytest.approx(agree_backbone, rel=1e-12)
    if refit:
        assert stats["agree_majority"] == 1.0 and stats["agree_backbone"] == pytest.approx(ceiling, rel=1e-12)
    assert torch.equal(layer.state_dict()["counts.handover"], layer.counts.handover)


def test_refit_table_survives_save_and_load_and_unfreezes_below_the_boundary():
    layer = make_layer()
    for u in range(BOUNDARY):
        train_step(layer, u)
    layer.set_num_updates(BOUNDARY)
    table = layer.distill_router.choice_table()[0].clone()
    assert not torch.equal(table, layer.distill_router.own_table()), "the test needs a refit that changes ids"
    fresh = make_layer()
    fresh.load_state_dict(layer.state_dict())
    fresh.set_num_updates(BOUNDARY + 3)
    assert torch.equal(fresh.distill_router.choice_table()[0], table)
    assert torch.equal(fresh.counts.refit_counts, layer.counts.refit_counts)
    fresh.set_num_updates(2)  # a reset below the boundary drops the frozen table
    assert not fresh.distill_router.is_frozen and fresh.distill_router.refit_choice.lt(0).all()


def test_a_checkpoint_without_counts_loads():
    layer = make_layer()
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("counts.") and "refit_choice" not in k}
    fresh = make_layer()
    fresh.load_state_dict(state)
    assert fresh.counts.window_counts.sum() == 0 and fresh.distill_router.refit_choice.lt(0).all()


def test_dummy_batches_are_not_counted():
    layer = make_layer()
    layer.set_num_updates(0)
    h, tokens = step_inputs(0)
    with not_counted():
        layer(h, tokens)
    assert layer.counts.window_counts.sum() == 0
    layer(h, tokens)
    assert layer.counts.window_counts.sum() == tokens.ne(PAD).sum()


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_refit_needs_a_token_id_router(kind):
    with pytest.raises(ValueError, match="--distill-refit.*--distill-router wordemb"):
        make_layer(distill_router=kind)


def test_half_precision_keeps_the_hand_over_exact():
    layer = make_layer()
    for u in range(BOUNDARY):
        train_step(layer, u)
    layer.set_num_updates(BOUNDARY)
    before = layer.counts.handover.clone()
    layer.half()
    assert layer.counts.handover.dtype == torch.float64 and torch.equal(layer.counts.handover, before)
    assert layer.state_dict()["counts.handover"].dtype == torch.float64


# ----------------------------------------------------------------------------- 2 processes

W2, N2 = 2, 4  # processes; experts (2 per process)
RESUME_AT = (4, 7)  # checkpoints inside a logging window (4..6), and inside the refit window (5..8) and a window
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)


class Collectives:
    """Records the ``torch.distributed`` collectives called while ``active``: ``(name, [(shape, dtype)])``
    of the tensors handed to each (the functions are replaced on the module: callers look them up there)."""

    def __init__(self):
        self.active = False
        self.calls = []
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.active:
                flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else [a])]
                self.calls.append((name, [(tuple(t.shape), t.dtype) for t in flat if torch.is_tensor(t)]))
            return fn(*args, **kwargs)

        return wrapped

    def during(self, fn, *args):
        """The calls made by ``fn(*args)``."""
        self.calls, self.active = [], True
        try:
            fn(*args)
        finally:
            self.active = False
        return [name for name, _ in self.calls], self.calls


def rank_inputs(u, rank):
    """Rank ``rank``'s batch of update ``u + 1``: ``(h, tokens)``, of a different size on each rank."""
    g = torch.Generator().manual_seed(1000 * rank + u)
    T, B = ((10, 3), (7, 2))[rank]
    tokens = torch.randint(4, V, (T, B), generator=g)
    tokens[-2:, 0] = PAD
    return torch.randn(T, B, D, generator=g), tokens


def parallel_copy(ref):
    """The expert-parallel layer (this process's 2 experts) with ``ref``'s routers."""
    par = make_layer(experts=N2)
    assert len(par.experts) == N2 // W2
    par.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("experts.")}, strict=False)
    return par


def recording(layer, windows):
    """Keep every window ``layer`` closes in ``windows`` (``{num_updates: stats}``)."""
    close = layer.counts.close_window

    def close_window(num_updates):
        stats = close(num_updates)
        if stats is not None:
            windows[num_updates] = stats
        return stats

    layer.counts.close_window = close_window
    return layer


def save_and_resume(par, u, rank, tmp):
    """Save ``par`` through the plugin's checkpoint path (fairseq's writing replaced by a copy of the state),
    and a fresh layer that loads it, as a resumed run has."""
    from fairseq_stablemoe.checkpoints.rank_files import rank_path
    from fairseq_stablemoe.fairseq_hooks import trainer_checkpoints as checkpointing

    saved = {}
    write = checkpointing._fairseq["save_checkpoint"]
    checkpointing._fairseq["save_checkpoint"] = lambda trainer, filename, extra_state: saved.update(
        {k: v.clone() for k, v in trainer._model.state_dict().items()}
    )
    try:
        trainer = SimpleNamespace(_model=par, _criterion=torch.nn.Module(), optimizer=None, get_num_updates=lambda: u)
        checkpointing._save_checkpoint(trainer, rank_path(os.path.join(tmp, "checkpoint_last.pt"), rank, W2), {})
    finally:
        checkpointing._fairseq["save_checkpoint"] = write
    fresh = make_layer(experts=N2)
    fresh.load_state_dict(saved)
    return fresh


def totals(counts):
    """``(window, refit)`` totals with every process's pending counts added (without flushing them)."""
    pending = counts.pending.clone()
    dist.all_reduce(pending)
    return counts.window_counts + pending, counts.refit_counts + (pending if counts._pending_refit else 0)


def parallel_worker(rank, port, tmp, queue):
    try:
        torch.set_num_threads(1)
        ref = make_layer(experts=N2)  # one process: every rank's tokens
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=W2, timeout=datetime.timedelta(seconds=90))
        out = {}
        record = Collectives()

        # the collectives of a stage-1 training update, on a layer of its own
        probe = parallel_copy(ref)
        probe.set_num_updates(WINDOW - 1)
        out["forward"] = record.during(probe, *rank_inputs(0, rank))[0]
        out["window_end"] = record.during(probe.set_num_updates, WINDOW)[1]
        out["window_end_again"] = record.during(probe.set_num_updates, WINDOW)[1]
        out["inside_window"] = record.during(probe.set_num_updates, WINDOW + 1)[1]

        try:  # the probe's results come back even if this part fails
            # 2 processes against 1 over their tokens, through the boundary and two resumes
            par = parallel_copy(ref)
            windows = {"ref": {}, "par": {}}
            recording(ref, windows["ref"]), recording(par, windows["par"])
            checks = {}
            for u in range(BOUNDARY):
                if u in RESUME_AT:
                    par = recording(save_and_resume(par, u, rank, tmp), windows["par"])
                data = [rank_inputs(u, r) for r in range(W2)]
                for layer in (ref, par):
                    layer.set_num_updates(u)
                ref(torch.cat([h.reshape(-1, D) for h, _ in data]), torch.cat([t.reshape(-1) for _, t in data]))
                par(*data[rank])
                for layer in (ref, par):
                    layer.set_num_updates(u + 1)
                if u + 1 < BOUNDARY:  # nothing lost, nothing counted twice
                    window, refit = totals(par.counts)
                    checks[f"window totals {u + 1}"] = torch.equal(window, ref.counts.window_counts)
                    checks[f"refit totals {u + 1}"] = torch.equal(refit, ref.counts.refit_counts)
                if (u + 1) % WINDOW == 0 or u + 1 in (BOUNDARY - REFIT, BOUNDARY):  # read here: summed
                    checks[f"flushed {u + 1}"] = par.counts._pending_forwards == 0 and not par.counts.pending.any()
                checks[f"majority {u + 1}"] = torch.equal(par.counts.window_majority, ref.counts.window_majority)
            assert par.distill_router.is_frozen
            checks["windows"] = windows["par"] == windows["ref"] and len(windows["ref"]) == 3
            for k, v in ref.state_dict().items():
                if k.startswith("counts.") or k.endswith("refit_choice"):
                    checks[k] = torch.equal(par.state_dict()[k], v)
            checks["handover"] = ref.counts.handover_dict() is not None
        except Exception as e:  # both processes fail at the same place: report it
            checks = {repr(e): False}
        out["checks"] = checks
        queue.put((rank, out))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # report instead of leaving the other process waiting
        queue.put((rank, repr(e)))
        raise


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Rank 0's and rank 1's results of :func:`parallel_worker`."""
    got = run_processes(parallel_worker, W2, str(tmp_path_factory.mktemp("counts")), timeout=240)
    for rank in range(W2):
        assert isinstance(got[rank], dict), got[rank]
    return [got[r] for r in range(W2)]


def test_a_stage1_forward_adds_no_collective_for_the_counts(two_processes):
    # what the layer itself exchanges in a forward: the per-expert counts (one all_gather), then the tokens
    # to their experts' processes and the outputs back (one all_to_all each); the old counting added a
    # second all_gather (of every process's (token id, expert) codes)
    expected = Counter({"all_gather": 1, "all_to_all_single": 2})
    for out in two_processes:
        assert Counter(out["forward"]) == expected
        # the counts are summed where a window ends: one all_reduce of the (V, N) int64 pending table
        assert out["window_end"] == [("all_reduce", [((V, N2), torch.int64)])]
        assert out["window_end_again"] == [] and out["inside_window"] == []


def test_two_processes_count_as_one_process_over_their_tokens(two_processes):
    for rank, out in enumerate(two_processes):
        failed = [k for k, ok in out["checks"].items() if not ok]
        assert not failed, f"rank {rank}: {failed}"
        assert len(out["checks"]) > 3 * BOUNDARY
