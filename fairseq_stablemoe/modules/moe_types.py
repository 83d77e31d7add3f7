"""``--moe-type`` names -> their layer classes (one registry, as megablocks' ``dmlp_registry``)."""

from typing import Dict, Type

import torch.nn as nn

from .baseline_layers import BaseLayer, DenseFFNLayer, HashLayer, SwitchLayer
from .options import MOE_TYPES
from .stablemoe_layer import StableMoELayer

#: ``--moe-type`` -> its layer (the option's choices, in this order)
MOE_LAYERS: Dict[str, Type[nn.Module]] = {
    "stablemoe": StableMoELayer,
    "switch": SwitchLayer,
    "base": BaseLayer,
    "hash": HashLayer,
    "dense": DenseFFNLayer,
}
if list(MOE_LAYERS) != list(MOE_TYPES):
    raise ImportError(f"MOE_LAYERS {list(MOE_LAYERS)} and the --moe-type choices {MOE_TYPES} differ")
