"""fairseq-stablemoe: StableMoE (Dai et al., ACL 2022) as a fairseq plugin.

Use with ``--user-dir fairseq_stablemoe`` (or the installed package's path): importing this package
registers the ``stablemoe_lm`` and ``stablemoe_transformer`` models, their architectures and the
``stablemoe`` criterion, and installs the plugin's hooks into fairseq's Trainer and tools.

The layers, each importing only from those above it (``docs/architecture.md``):

- :mod:`.distributed`: expert parallelism over fairseq's processes, torchrun's settings;
- :mod:`.modules`: the MoE layer (routers, dispatch, experts, the layer types, routing counts);
- :mod:`.checkpoints`: reading checkpoint files, per-rank files, consolidation;
- :mod:`.models`, :mod:`.criterions`: what registers with fairseq;
- :mod:`.fairseq_hooks`: the small patches of fairseq's Trainer and evaluation tools;
- :mod:`.cli`: the console tools.
"""

# The order matters: numpy compat and the checkpoint reader's safe globals before anything loads a checkpoint.
# isort: off
from . import compat  # noqa: F401  (np.compat for fairseq under numpy 2)
from .checkpoints import reading  # noqa: F401  (torch.load's allow-list for fairseq checkpoints)
from . import criterions, models  # noqa: F401  (register with fairseq)
from . import fairseq_hooks  # noqa: F401  (per-rank checkpoints, one gradient norm, the evaluation lockstep)

# isort: on

__version__ = "0.1.0"
