"""The MoE layer's options, as fairseq options: one dataclass, the one place each default is written.

``MOE_TYPES`` are ``--moe-type``'s choices; :mod:`.moe_types` maps them to their layers.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

MOE_TYPES = ["stablemoe", "switch", "base", "hash", "dense"]


@dataclass
class MoEOptions(FairseqDataclass):
    """MoE options shared by the language model and the translation model."""

    moe_type: ChoiceEnum(MOE_TYPES) = field(
        default="stablemoe",
        metadata={
            "help": "routing of the MoE layers: stablemoe (two-stage, the default), switch (softmax "
            "top-1 + load-balancing loss), base (balanced assignment), hash (fixed token hash), "
            "dense (one FFN of the same sublayers instead)"
        },
    )
    num_experts: int = field(default=4, metadata={"help": "number of experts N in every MoE layer"})
    moe_sublayers: int = field(default=1, metadata={"help": "residual FFN sublayers stacked in every expert"})
    distill_dim: int = field(default=50, metadata={"help": "embedding size of the distilled (token-id) router"})
    two_stage_updates: int = field(
        default=1000,
        metadata={
            "help": "update count at which stage 2 starts: the distilled router is frozen and "
            "routes; balance and distillation losses stop (0: stage 2 from the start, with an "
            "untrained distilled router)"
        },
    )
    collapse_share: float = field(
        default=0.8,
        metadata={"help": "warn (once per layer) when the busiest expert takes more than this share of tokens..."},
    )
    collapse_updates: int = field(default=100, metadata={"help": "...for this many consecutive updates"})
    capacity_factor: Optional[float] = field(
        default=None,
        metadata={
            "help": "optional expert capacity: every expert runs at most ceil(factor * tokens / N) of the "
            "non-pad tokens of the global batch (all processes); the tokens over it, drawn at random, pass "
            "through unchanged. Unset: no token is ever dropped"
        },
    )
    stage1_assignment: ChoiceEnum(["greedy", "balanced"]) = field(
        default="greedy",
        metadata={
            "help": "StableMoE's stage-1 (training) assignment: greedy (top-1 of the backbone affinities, "
            "the paper's) or balanced (BASE layers' balanced assignment; with --balance-factor 0 this is "
            "'BASE layer + fixed routing', the paper's Table 5)"
        },
    )
    distill_router: ChoiceEnum(["wordemb", "cnn", "transformer"]) = field(
        default="wordemb",
        metadata={
            "help": "StableMoE's distilled router: wordemb (token-id embedding, the paper's), cnn (a causal "
            "window of the current and 4 previous tokens' embeddings) or transformer (a causal Transformer "
            "of --distill-router-layers blocks, --distill-dim wide, over the current and earlier tokens)"
        },
    )
    distill_router_layers: int = field(default=1, metadata={"help": "blocks of the transformer distilled router"})
    distill_router_heads: int = field(
        default=2, metadata={"help": "attention heads of the transformer distilled router (divides --distill-dim)"}
    )
    distill_refit: bool = field(
        default=False,
        metadata={
            "help": "exact distillation: at the stage boundary, freeze as StableMoE's routing each token id's most "
            "frequent backbone expert over the last --refit-updates stage-1 updates (the exact minimiser of the "
            "distillation loss for a token-id table); ids not seen there, and ties, keep the distilled router's "
            "choice. Needs --distill-router wordemb"
        },
    )
    refit_updates: Optional[int] = field(
        default=None,
        metadata={
            "help": "the refit window: the last stage-1 updates whose backbone routing is counted for the "
            "boundary's majority table and hand-over statistics (default: the last half of stage 1)"
        },
    )
    no_routing_counts: bool = field(
        default=False,
        metadata={
            "help": "do not count StableMoE's stage-1 backbone routing per token id (no agree_ceiling, "
            "route_churn or hand-over statistics; --distill-refit needs the counts)"
        },
    )


def option_default(name: str) -> Any:
    """The default of MoE option ``name`` (a field of :class:`MoEOptions`): what every layer constructor
    and every reader of an ``args`` without the option uses."""
    return MoEOptions.__dataclass_fields__[name].default


def moe_option(args: Any, name: str) -> Any:
    """``args.name``, or its :class:`MoEOptions` default where ``args`` lacks it (a checkpoint saved before
    the option existed)."""
    return safe_getattr(args, name, option_default(name))
