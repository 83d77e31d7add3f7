"""fairseq-stablemoe: StableMoE (Dai et al., ACL 2022) as a fairseq plugin.

Use with ``--user-dir fairseq_stablemoe`` (or the installed package's path):
importing this package registers the ``stablemoe_lm`` and ``stablemoe_transformer`` models and
their architectures and the ``stablemoe`` criterion.
"""

# The order matters: numpy compat and safe globals before anything imports fairseq.
# isort: off
from . import compat  # noqa: F401  (np.compat for fairseq under numpy 2)
from . import safe_globals  # noqa: F401  (before anything loads a checkpoint)
from . import criterion, model, translation  # noqa: F401  (registers with fairseq)
from . import checkpointing  # noqa: F401  (per-rank checkpoints of expert-parallel runs)
from . import distributed_eval  # noqa: F401  (fairseq's eval tools on per-rank files, MoE forwards in step)
from . import training_hooks  # noqa: F401  (one gradient norm over the whole model, expert replicas)

# isort: on

__version__ = "0.1.0"
