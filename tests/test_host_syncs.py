"""Host synchronisations of an MoE layer's forward, counted.

On a GPU every operation that needs a device value on the host (``.item()``,
``.tolist()``, ``bool()`` of a tensor, boolean-mask indexing, ``nonzero``,
output sizes that depend on data) stalls the host until the device catches up,
and so does ``torch.tensor(python data, device=...)`` (a blocking copy to the device).
A ``TorchFunctionMode`` counts them here on CPU (the same Python calls run on
CUDA). The layer needs one: the per-expert counts (split sizes of the experts'
segments and of the all-to-all), gathered from every process in one collective.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import warm
from corpus import free_port
from torch.overrides import TorchFunctionMode

PAD, VOCAB, D, F, N = 1, 30, 8, 16, 4
SYNCING = {
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
    "masked_select",
    "bincount",
    "unique",
    "unique_consecutive",
}


class HostSyncs(TorchFunctionMode):
    """Counts the calls that make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.calls.append(name)
        elif name == "__getitem__" and any(
            torch.is_tensor(i) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.calls.append("boolean mask indexing")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            self.calls.append("host-to-device copy")  # on a GPU this line waits for its copy
        elif (
            name == "repeat_interleave"
            and kwargs.get("output_size") is None
            and torch.is_tensor(args[1] if len(args) > 1 else kwargs.get("repeats"))
        ):
            self.calls.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


def build(kind: str):
    from fairseq_stablemoe.modules.baseline_layers import HashLayer, SwitchLayer
    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    torch.manual_seed(0)
    if kind == "capacity":  # stage 1 with tokens over capacity
        return StableMoELayer(D, F, N, 2, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=10, capacity_factor=0.5)
    if kind == "switch":
        return SwitchLayer(D, F, N, 2, padding_idx=PAD)
    if kind == "hash":
        return HashLayer(D, F, N, 2, padding_idx=PAD, symbols=[f"w{i}" for i in range(VOCAB)])
    layer = StableMoELayer(D, F, N, 2, vocab_size=VOCAB, padding_idx=PAD, two_stage_updates=10)
    layer.set_num_updates(20 if kind == "stage2" else 0)
    return layer


def count(kind: str, rank: int = 0):
    """Host syncs of one forward of ``kind`` (and, in training, its backward), with padding and capacity."""
    layer = build(kind)
    g = torch.Generator().manual_seed(rank)
    h = torch.randn(6, 3, D, generator=g, requires_grad=True)
    tokens = torch.randint(PAD + 1, VOCAB, (6, 3), generator=g)
    tokens[4:, 1] = PAD
    layer.train(kind != "inference")
    counts = {}
    with HostSyncs() as fwd:
        out, stats = layer(h, tokens)
        loss = out.square().sum() + stats.get("balance_loss", 0) + stats.get("distill_loss", 0)
    counts["forward"] = fwd.calls
    if kind == "capacity":
        assert float(stats["dropped"]) > 0  # the capacity path ran
    if layer.training:
        with HostSyncs() as bwd:
            loss.backward()
        counts["backward"] = bwd.calls
    return counts


@pytest.mark.parametrize("kind", ["stage1", "stage2", "inference", "capacity", "switch", "hash"])
def test_one_host_sync_per_forward(kind):
    counts = count(kind)
    assert counts["forward"] == ["tolist"], counts
    assert counts.get("backward", []) == [], counts


def worker(rank: int, port: int, queue) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=60),
        )
        queue.put((rank, {kind: count(kind, rank) for kind in ("stage1", "inference", "capacity")}))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # report instead of leaving the other process waiting
        queue.put((rank, repr(e)))
        raise


def test_one_host_sync_per_forward_with_expert_parallelism():
    ctx = warm.context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for rank, counts in results.items():
        assert isinstance(counts, dict), counts
        for kind, c in counts.items():
            assert c["forward"] == ["tolist"], (rank, kind, c)
            assert c.get("backward", []) == [], (rank, kind, c)


def test_the_counter_sees_syncs():
    """The counter is not blind: the calls it looks for are counted."""
    x = torch.arange(4.0)
    with HostSyncs() as c:
        x.tolist()
        bool(x[0] > 1)
        x[x > 1]
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1]))
        float(x.sum())
    assert c.calls == [
        "tolist",
        "__bool__",
        "boolean mask indexing",
        "repeat_interleave without output_size",
        "__float__",
    ]
