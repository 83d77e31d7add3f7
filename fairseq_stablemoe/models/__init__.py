"""The registered models: ``stablemoe_lm`` (:mod:`.stablemoe_lm`) and ``stablemoe_transformer``
(:mod:`.stablemoe_transformer`); :mod:`.moe_stack` puts MoE layers into their Transformer stacks.

Imports :mod:`..modules`, :mod:`..distributed` and :mod:`..checkpoints`.
"""

from . import stablemoe_lm, stablemoe_transformer  # noqa: F401  (register with fairseq)
