"""NCCL's device rule: the guard every multi-process test runs under, and a static check beside it.

The guard (``tests/device_guard.py``) is on in every process the tests start. Here it is shown to
be on in those processes, to fail a planted collective on a tensor made without ``device=`` (and
one computed from such tensors alone) on 2 gloo processes, and to let the right forms through.
The static check reads the package: in a function that calls a collective, every tensor factory
names its device.
"""

import ast
import datetime
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import REPO

PLANTED = '''
import torch
import torch.distributed as dist


def device_less():
    """The bug: a tensor made on the host without device=."""
    mine = torch.tensor([3, 1], dtype=torch.long)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)


def computed_from_device_less():
    """What is computed from such tensors alone keeps the tag."""
    x = torch.stack([torch.tensor(3.0), torch.tensor(1.0)]).sort().values[:1] * 2
    dist.all_reduce(x)


def moved_to_the_host():
    weight = torch.zeros(2, device=torch.device("cpu"))
    dist.all_reduce(weight.sum().cpu())


def on_the_device(device):
    """The right forms: device=, .to(device), new_tensor/zeros_like of a tensor on the device."""
    dist.all_reduce(torch.tensor([1.0], device=device))
    dist.all_reduce(torch.tensor([1, 2]).to(device))
    weight = torch.zeros(3, device=device)
    dist.all_reduce(weight.new_tensor([1.0]))
    dist.all_reduce(torch.zeros_like(weight) + 1.0)
    return True
'''


def _worker(rank: int, world: int, port: int, planted_dir: str, out_dir: str) -> None:
    import device_guard
    import torch
    import torch.distributed as dist

    sys.path.insert(0, planted_dir)
    import planted

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {"guard_on": bool(device_guard._mode)}
    for name in ("device_less", "computed_from_device_less", "moved_to_the_host"):
        try:
            getattr(planted, name)()
            results[name] = "passed"
        except device_guard.DeviceRuleError as e:
            results[name] = str(e)
    results["on_the_device"] = planted.on_the_device(torch.device("cpu"))
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(repr(results))


def test_guard_fails_a_planted_device_less_collective_on_two_processes(tmp_path, monkeypatch):
    from corpus import free_port

    (tmp_path / "planted.py").write_text(PLANTED)
    # the planted module counts as the plugin's code; the spawned processes inherit the environment
    monkeypatch.setenv("STABLEMOE_DEVICE_GUARD_PATHS", str(tmp_path))
    monkeypatch.setenv("STABLEMOE_DEVICE_GUARD", "1")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = eval((tmp_path / f"rank{rank}.txt").read_text())
        assert results["guard_on"], "the guard is not on in a process the tests start"
        assert "all_gather was handed a tensor made at" in results["device_less"]
        assert "planted.py:8" in results["device_less"]  # where the tensor was made
        assert "all_reduce was handed a tensor made at" in results["computed_from_device_less"]
        assert "all_reduce was handed a tensor made at" in results["moved_to_the_host"]
        assert results["on_the_device"] is True


# ----------------------------------------------------------------------------- static check

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "scalar_tensor", "from_numpy"}
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_reduce_sum",  # the plugin's own wrappers
    "gather_counts",
}


def _calls(node: ast.AST):
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")


def device_less_factories(source: str):
    """``(function, line)`` of every ``torch.<factory>(...)`` without ``device=`` (and not moved by an
    immediate ``.to(...)``) in a function that calls a tensor collective; a line that says
    ``# not for a collective`` is left out (the guard checks what such a line makes all the same)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        calls = _calls(fn)
        if not any(_name(c) in COLLECTIVES for c in calls):
            continue
        moved = {id(c.func.value) for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr == "to"}
        for c in calls:
            f = c.func
            is_torch = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch"
            if is_torch and f.attr in FACTORIES and id(c) not in moved:
                exempt = "# not for a collective" in lines[c.lineno - 1]
                if not exempt and not any(k.arg == "device" for k in c.keywords):
                    found.append((fn.name, c.lineno))
    return found


def test_static_check_finds_a_device_less_factory_beside_a_collective():
    planted = textwrap.dedent(PLANTED)
    assert device_less_factories(planted) == [
        ("device_less", 8),
        ("computed_from_device_less", 15),
        ("computed_from_device_less", 15),
    ]


@pytest.mark.parametrize("path", sorted((REPO / "fairseq_stablemoe").glob("*.py")), ids=lambda p: p.name)
def test_package_makes_every_collective_tensor_on_a_device(path):
    assert device_less_factories(path.read_text()) == [], f"{path.name}: a factory without device= next to a collective"


def test_lockstep_tensors_follow_the_layer_moved_after_loading(monkeypatch):
    """The tools install the lockstep when fairseq loads the model, then move the model to the GPU: the
    lockstep's collectives must use the layers' device at the time of the call, not at loading."""
    import torch

    from fairseq_stablemoe.fairseq_hooks import eval_lockstep
    from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer

    layer = StableMoELayer(8, 16, 2, 1, vocab_size=20, padding_idx=1, two_stage_updates=0)
    lock = eval_lockstep.Lockstep([layer])
    lock.remove()
    seen = []

    class Done:
        def wait(self, timeout=None):
            return True

    def all_gather(outputs, tensor, async_op=False):
        seen.append(tensor.device)
        for out in outputs:
            out.copy_(tensor) if out.device == tensor.device else None
        return Done()

    monkeypatch.setattr(eval_lockstep.dist, "all_gather", all_gather)
    layer.to("meta")  # where a tool would call .cuda(): a device other than the one at loading
    try:
        lock._agree(0)
    except Exception:  # meta tensors hold no values to read back: only the device matters here
        pass
    assert seen == [torch.device("meta")]
