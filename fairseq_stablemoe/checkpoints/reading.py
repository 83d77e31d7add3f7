"""Allow-list the types a fairseq checkpoint needs for ``torch.load(weights_only=True)``.

torch >= 2.6 loads with ``weights_only=True`` by default; fairseq's checkpoints
(and the state rank 0 broadcasts to the other ranks on resume) hold omegaconf
containers, ``typing.Any`` and fairseq's ``_TensorPlaceholder``. Without this,
``fairseq-eval-lm`` and multi-process resumes fail on a plugin checkpoint.
"""

import argparse
import collections
import glob
import os
import pickle
import re
import typing
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch


def fairseq_checkpoint_globals() -> List[object]:
    """The non-tensor types found in a fairseq checkpoint made with this plugin."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    found: List[object] = [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        typing.Any,
        dict,
        list,
        int,
        collections.defaultdict,
    ]
    found.append(argparse.Namespace)
    try:
        from fairseq.distributed.utils import _TensorPlaceholder

        found.append(_TensorPlaceholder)
    except ImportError:  # older fairseq
        pass
    return found


def register() -> None:
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(fairseq_checkpoint_globals())


register()


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be read safely: says which file, why, and the last readable one beside it."""


#: how a torch.save file starts: a zip archive (torch >= 1.6), or the pickled magic number of the legacy format
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def raw_load(path: str, trusted: bool, mmap: bool) -> dict:
    """``torch.load`` on the CPU, errors as torch raises them (no diagnosis: see :func:`load_checkpoint_file`).

    ``mmap`` leaves the tensors on disk (zip files only; the legacy format is read whole).
    """
    if mmap:
        with open(path, "rb") as f:
            mmap = f.read(4) == ZIP_MAGIC
    return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)


def _reason(error: BaseException) -> str:
    """torch's own explanation, first line, without its advice to load with ``weights_only=False``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def why_unreadable(path: str, error: BaseException) -> str:
    """What kind of file ``path`` is, given that ``torch.load`` failed on it with ``error``."""

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if size == 0:
        return "is empty (0 bytes): the save or copy that wrote it was cut short"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return (
                f"is truncated: a zip archive ({size:,} bytes) without its central directory, which a complete "
                "torch.save file ends with (a save, copy or download cut short)"
            )
        if "version" in str(error).lower():
            return f"is from an incompatible torch: torch {torch.__version__} cannot read it ({_reason(error)})"
        return (
            f"is a complete zip archive that this torch ({torch.__version__}) cannot read as a checkpoint: it is "
            f"not a torch.save file, or from an incompatible torch ({_reason(error)})"
        )
    if head == LEGACY_MAGIC:
        return f"is in torch's legacy (pre-1.6) format but truncated or corrupt ({_reason(error)})"
    return (
        f"is not a torch checkpoint: it is neither a zip archive (what torch.save writes) nor torch's legacy "
        f"format (its first bytes are {head[:8]!r})"
    )


def load_checkpoint_file(path: str, trusted: bool = False, mmap: bool = False) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and the allow-list above: the one
    reader of the plugin (fairseq's tools, the Trainer patch, stablemoe-consolidate, -fluctuation).

    Args:
        path: the file.
        trusted: load it as an arbitrary pickle (only for files you trust: it can run code).
        mmap: leave the tensors on disk until touched (records and names; zip files only).
    Raises:
        FileNotFoundError: no such file.
        CheckpointLoadError: the file is truncated, not a torch checkpoint, from an incompatible torch,
            or needs types outside the allow-list; the message names the file, says which, and names
            the last readable checkpoint beside it (:func:`last_readable_beside`).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    register()
    try:
        return raw_load(path, trusted, mmap)
    except pickle.UnpicklingError as e:
        if trusted or "Unsupported global" not in str(e):
            error = e
        else:
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
            raise CheckpointLoadError(
                f"checkpoint {path} needs objects outside the allow-list of fairseq/omegaconf types ({reason}); "
                "if you trust this file, the plugin's tools load it as an arbitrary pickle (which can run code) "
                "with --trust-checkpoint"
            ) from None
    except Exception as e:  # torch raises many kinds on a damaged file (EOFError, RuntimeError, IndexError ...)
        error = e

    message = f"checkpoint {path} cannot be read: it {why_unreadable(path, error)}"
    good = last_readable_beside(path)
    if good is not None:
        message += f". The last readable checkpoint beside it is {good[0]} (update {good[1]})"
    raise CheckpointLoadError(message) from None


def load_fairseq_state(path: str, trusted: bool = False) -> dict:
    """:func:`load_checkpoint_file` plus what ``fairseq.checkpoint_utils.load_checkpoint_to_cpu``
    does after its own ``torch.load``: the config as an OmegaConf object and fairseq's upgrades."""
    return finish_fairseq_state(load_checkpoint_file(path, trusted=trusted), path)


def finish_fairseq_state(state: dict, path: str) -> dict:
    """The config of a loaded checkpoint as an OmegaConf object, and fairseq's upgrades."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointLoadError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    return checkpoint_utils._upgrade_state_dict(state)


# ----------------------------------------------------------------------------- names and update counts

#: a per-rank file's name (:mod:`.rank_files`)
RANK_FILE = re.compile(r"^(?P<stem>.*)-rank(?P<rank>\d+)-of(?P<world>\d+)\.pt$")


def parse_rank_path(path: str) -> Optional[Tuple[str, int, int]]:
    """``(base, rank, world_size)`` of a per-rank file name, None for any other name."""
    m = RANK_FILE.match(path)
    if m is None:
        return None
    return m.group("stem") + ".pt", int(m.group("rank")), int(m.group("world"))


def num_updates_of(state: Dict[str, Any]) -> int:
    """The update count a fairseq checkpoint was saved at."""
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


# ----------------------------------------------------------------------------- unreadable files


def unreadable(path: str) -> Optional[str]:
    """Why ``path`` cannot be read (:func:`.reading.why_unreadable`), None if it can (or is absent)."""
    if not os.path.isfile(path):
        return None
    try:
        raw_load(path, trusted=False, mmap=True)
    except Exception as e:
        return why_unreadable(path, e)
    return None


def readable_updates(path: str) -> Optional[int]:
    """The update count of a checkpoint that can be read, None for a truncated or corrupt file."""
    try:
        return num_updates_of(raw_load(path, trusted=False, mmap=True))
    except Exception:
        return None


def _readable_beside(filename: str) -> Dict[int, str]:
    """The readable checkpoints in ``filename``'s directory with its -rankR-ofW tag (or none), by update count."""
    directory = os.path.dirname(filename)  # "" (the current directory): names without "./"
    parsed = parse_rank_path(filename)
    tag = parsed[1:] if parsed is not None else None
    found: Dict[int, str] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "checkpoint*.pt"))):
        if os.path.abspath(path) == os.path.abspath(filename):
            continue
        other = parse_rank_path(path)
        if (other[1:] if other is not None else None) != tag:
            continue
        updates = readable_updates(path)
        if updates is not None and updates not in found:
            found[updates] = path
    return found


def last_readable_beside(filename: str) -> Optional[Tuple[str, int]]:
    """``(path, update count)`` of the newest readable checkpoint beside ``filename`` (same rank tag), or None."""
    found = _readable_beside(filename)
    return (found[max(found)], max(found)) if found else None
