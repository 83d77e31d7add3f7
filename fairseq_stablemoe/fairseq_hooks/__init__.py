"""What the plugin changes in fairseq's Trainer and evaluation tools, each a small patch that calls
fairseq's own code for models without experts.

:mod:`.trainer_checkpoints` (per-rank checkpoints), :mod:`.trainer_step` (one gradient norm over the
whole model, expert replicas, OOM), :mod:`.eval_tools` with :mod:`.eval_lockstep` and
:mod:`.eval_totals` (fairseq's evaluation tools on W processes). Importing the package installs them.
Imports everything below it, never :mod:`..cli`.
"""

from . import eval_tools, trainer_checkpoints, trainer_step  # noqa: F401  (install at import)
