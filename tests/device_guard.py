"""Test-only guard for NCCL's device rule: a collective takes only tensors on the process's device.

NCCL refuses CPU tensors (``No backend type associated with device type cpu``), gloo takes them, so
on CPU test processes a collective on a tensor made without ``device=`` passes and the same code
crashes on GPUs. This guard makes the CPU tests see it:

* a :class:`~torch.overrides.TorchFunctionMode` *tags* every tensor that the plugin's own code
  (a file under :data:`PLUGIN_DIRS`) creates with a factory (``torch.tensor``, ``torch.zeros``, ...)
  without ``device=``, and every tensor moved to the host by ``.cpu()`` or ``.to("cpu")`` there;
  the tag follows what is computed from tagged tensors alone (``zeros_like``, ``stack``, ``sort``,
  arithmetic, views), and a tensor moved with an explicit device (``.to(device)``, ``.cuda()``, a
  factory with ``device=``) is not tagged;
* every ``torch.distributed`` collective (all_reduce, all_gather, all_to_all, broadcast, ...) fails
  with :class:`DeviceRuleError`, naming where the tensor was made, when it is handed a tagged one.

Object collectives (``all_gather_object``, ``broadcast_object_list``) make their own tensors on the
right device and are not checked. The guard is installed in every process that the tests start
(``tests/guard_site/sitecustomize.py``, with ``STABLEMOE_DEVICE_GUARD=1``; the test session sets
both) and tags from the moment the process joins a process group of 2 or more processes (a
one-process run pays nothing), so every multi-process test runs under it.
``STABLEMOE_DEVICE_GUARD=0`` turns it off.
"""

import functools
import os
import sys
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

ENV = "STABLEMOE_DEVICE_GUARD"
#: extra directories whose code counts as the plugin's (os.pathsep-separated), for planted tests
PATHS_ENV = "STABLEMOE_DEVICE_GUARD_PATHS"
ATTR = "_stablemoe_made_without_device"

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIRS: List[str] = [os.path.join(_REPO, "fairseq_stablemoe") + os.sep]
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS = os.path.abspath(__file__)

#: functions that create a tensor on the default device (the host) unless given ``device=``
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.range,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.from_numpy,
    torch.frombuffer,
}
_TO_HOST = {torch.Tensor.cpu}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}

#: torch.distributed collectives that take tensors
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


class DeviceRuleError(RuntimeError):
    """A collective was handed a tensor made on the host by the plugin (NCCL would refuse it)."""


def made_without_device(t: Any) -> Optional[str]:
    """Where the plugin made ``t`` without ``device=`` (``file:line``), or None."""
    return getattr(t, ATTR, None) if isinstance(t, torch.Tensor) else None


def _plugin_dirs() -> List[str]:
    extra = [os.path.abspath(p) + os.sep for p in os.environ.get(PATHS_ENV, "").split(os.pathsep) if p]
    return PLUGIN_DIRS + extra


_SHIMS = ("overrides.py", "_tensor.py", "functional.py", "_device.py")


def _is_shim(name: str) -> bool:
    """The guard itself, or torch's dispatch shims between a call and the mode (not torch.distributed)."""
    if name == _THIS:
        return True
    return name.startswith(_TORCH_DIR) and os.path.basename(name) in _SHIMS and "distributed" not in name


def _caller_site() -> Optional[str]:
    """``file:line`` of the code that called the torch function, when it is the plugin's."""
    frame = sys._getframe(1)
    while frame is not None and _is_shim(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    name = frame.f_code.co_filename
    if any(name.startswith(d) for d in _plugin_dirs()):
        return f"{os.path.relpath(name, _REPO)}:{frame.f_lineno}"
    return None


def _tag(out: Any, site: Optional[str]) -> None:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            try:
                if site is None:
                    if ATTR in t.__dict__:
                        delattr(t, ATTR)
                else:
                    setattr(t, ATTR, site)
            except (AttributeError, RuntimeError):  # e.g. a tensor subclass without a __dict__
                pass


def _explicit_device(func, args: Sequence[Any], kwargs: dict) -> Optional[str]:
    """For ``Tensor.to``/``Tensor.cuda``: "host" (to the CPU by name), "device" (elsewhere) or None."""
    if func is torch.Tensor.cuda:
        return "device"
    target = kwargs.get("device")
    if target is None:
        for a in args[1:]:
            if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                target = a
                break
            if isinstance(a, torch.Tensor):
                return None if made_without_device(a) else "device"
    if target is None:
        return None
    return "host" if isinstance(target, str) and target.split(":")[0] == "cpu" else "device"


def _all_made_without_device(args: Sequence[Any], kwargs: dict) -> Optional[str]:
    """Where the first tensor argument was made, when every tensor argument (also in lists) is tagged."""
    first = None
    for group in (args, kwargs.values()):
        for a in group:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor):
                    site = getattr(t, ATTR, None)
                    if site is None:
                        return None
                    first = first or site
    return first


class DeviceGuardMode(TorchFunctionMode):
    """Tags the tensors the plugin makes on the host (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._follow(func, args, kwargs, out)
        except Exception:  # the guard never changes what the code computes
            pass
        return out

    @staticmethod
    def _follow(func, args, kwargs, out) -> None:
        if func in _MOVES:
            where = _explicit_device(func, args, kwargs)
            if where == "device":
                _tag(out, None)
                return
            if where == "host":
                _tag(out, _caller_site())
                return
        elif func in _TO_HOST:
            site = _caller_site()
            if site is not None:
                _tag(out, site)
                return
        if kwargs.get("device") is not None:
            _tag(out, None)
            return
        if func in FACTORIES:
            site = _caller_site()
            if site is not None:
                _tag(out, site)
            return
        site = _all_made_without_device(args, kwargs)
        if site is not None and not any(o is args[0] for o in tree_leaves(out) if isinstance(o, torch.Tensor)):
            _tag(out, site)


def _checked(name: str, collective):
    @functools.wraps(collective)
    def guarded(*args, **kwargs):
        for t in tree_leaves((args, kwargs)):
            site = made_without_device(t)
            if site is not None:
                raise DeviceRuleError(
                    f"torch.distributed.{name} was handed a tensor made at {site} without device= "
                    f"(device {t.device}): NCCL takes only CUDA tensors; make it on the model's device"
                )
        return collective(*args, **kwargs)

    guarded._stablemoe_guarded = True
    return guarded


_mode: List[DeviceGuardMode] = []


def start_tagging() -> None:
    """Enter the mode in this thread (idempotent)."""
    if not _mode:
        mode = DeviceGuardMode()
        mode.__enter__()
        _mode.append(mode)


def _tagging_from_init(init):
    @functools.wraps(init)
    def init_then_tag(*args, **kwargs):
        out = init(*args, **kwargs)
        if dist.get_world_size() > 1:
            start_tagging()
        return out

    init_then_tag._stablemoe_guarded = True
    return init_then_tag


def install() -> None:
    """Wrap the collectives, and tag from the moment this process joins a group of 2 or more (idempotent)."""
    from torch.distributed import distributed_c10d

    for name in COLLECTIVES:
        for module in (dist, distributed_c10d):
            original = getattr(module, name, None)
            if original is not None and not getattr(original, "_stablemoe_guarded", False):
                setattr(module, name, _checked(name, original))
    for module in (dist, distributed_c10d):
        if not getattr(module.init_process_group, "_stablemoe_guarded", False):
            module.init_process_group = _tagging_from_init(module.init_process_group)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        start_tagging()


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")
