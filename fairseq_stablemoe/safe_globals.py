"""Allow-list the types a fairseq checkpoint needs for ``torch.load(weights_only=True)``.

torch >= 2.6 loads with ``weights_only=True`` by default; fairseq's checkpoints
(and the state rank 0 broadcasts to the other ranks on resume) hold omegaconf
containers, ``typing.Any`` and fairseq's ``_TensorPlaceholder``. Without this,
``fairseq-eval-lm`` and multi-process resumes fail on a plugin checkpoint.
"""

import argparse
import collections
import typing
from typing import List

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
    """A checkpoint that cannot be read safely: says which file and why."""


def load_checkpoint_file(path: str, trusted: bool = False) -> dict:
    """Load a fairseq checkpoint with ``torch.load(weights_only=True)`` and the allow-list above.

    Args:
        path: the file.
        trusted: load with ``weights_only=False`` (arbitrary pickles: only for files you trust).
    Raises:
        FileNotFoundError: no such file.
        CheckpointLoadError: the file is truncated or corrupt, or needs types outside the allow-list.
    """
    import os
    import pickle
    import zipfile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    register()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if trusted or "Unsupported global" not in str(e):
            raise CheckpointLoadError(f"checkpoint {path} is truncated or corrupt and cannot be read: {e}") from e
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise CheckpointLoadError(
            f"checkpoint {path} needs objects outside the allow-list of fairseq/omegaconf types "
            f"({reason}). If you trust this file, pass --trust-checkpoint to load it with "
            "weights_only=False (this can run arbitrary code)."
        ) from e
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as e:
        raise CheckpointLoadError(f"checkpoint {path} is truncated or corrupt and cannot be read: {e}") from e


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
