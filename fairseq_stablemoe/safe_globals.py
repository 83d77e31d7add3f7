"""Allow-list the types a fairseq checkpoint needs for ``torch.load(weights_only=True)``.

torch >= 2.6 loads with ``weights_only=True`` by default; fairseq's checkpoints
(and the state rank 0 broadcasts to the other ranks on resume) hold omegaconf
containers, ``typing.Any`` and fairseq's ``_TensorPlaceholder``. Without this,
``fairseq-eval-lm`` and multi-process resumes fail on a plugin checkpoint.
"""

import argparse
import typing
from typing import List

import torch


def fairseq_checkpoint_globals() -> List[object]:
    """The non-tensor types found in a fairseq checkpoint made with this plugin."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    found: List[object] = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any]
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
