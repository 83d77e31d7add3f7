"""``stablemoe_lm``: a decoder-only Transformer LM with StableMoE layers.

Built on fairseq's :class:`TransformerLanguageModel` and
:class:`TransformerDecoder`, so ``--task language_modeling``,
``fairseq-eval-lm``, ``fairseq-generate``/``fairseq-interactive`` (incremental
decoding) and hub loading work unchanged. MoE layers are inserted among the
``L`` dense decoder layers: ``--moe-layer-positions P1,P2,...`` puts one after
dense block ``p`` for every listed ``p`` in ``[0, L]`` (0: before the first
block; a repeated ``p`` stacks layers there); without it, ``--moe-layers K``
layers go where fairseq's BASE layers go (layer ``i`` inserted at index
``((i + 1) * L) // (K + 1)`` of the growing list).

Architectures: ``stablemoe_lm`` (small CPU default), ``stablemoe_lm_base`` and
``stablemoe_lm_large`` (the paper's Table 7 settings; ``stablemoe_lm_small`` is
an alias of the base setting), ``stablemoe_lm_fork_x1_medium`` and
``stablemoe_lm_fork_x1_large`` (other sizes of the paper authors' fork).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.utils import safe_getattr
from omegaconf import II

from .health import DEFAULT_PATIENCE, DEFAULT_SHARE
from .layer import BaseLayer, DenseFFNLayer, HashLayer, MoELayer, StableMoELayer, SwitchLayer, moe_stats_read
from .parallel import layout_problem, world_size_and_rank

#: ``--moe-type`` -> its layer (the option's choices, in this order)
MOE_LAYERS = {
    "stablemoe": StableMoELayer,
    "switch": SwitchLayer,
    "base": BaseLayer,
    "hash": HashLayer,
    "dense": DenseFFNLayer,
}
MOE_TYPES = list(MOE_LAYERS)

logger = logging.getLogger(__name__)


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
        default=DEFAULT_SHARE,
        metadata={"help": "warn (once per layer) when the busiest expert takes more than this share of tokens..."},
    )
    collapse_updates: int = field(default=DEFAULT_PATIENCE, metadata={"help": "...for this many consecutive updates"})
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


@dataclass
class StableMoELanguageModelConfig(TransformerLanguageModelConfig, MoEOptions):
    # The small CPU default of ``--arch stablemoe_lm`` (the other architectures set theirs).
    decoder_embed_dim: int = field(default=256, metadata={"help": "decoder embedding dimension"})
    decoder_ffn_embed_dim: int = field(default=1024, metadata={"help": "FFN dimension of dense layers and experts"})
    decoder_layers: int = field(default=4, metadata={"help": "number of dense decoder layers"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "number of attention heads"})
    share_decoder_input_output_embed: bool = field(
        default=True, metadata={"help": "share decoder input and output embeddings"}
    )
    decoder_normalize_before: bool = field(
        default=True, metadata={"help": "pre-norm layers (fairseq's LM architectures force this)"}
    )
    decoder_input_dim: Optional[int] = field(
        default=None, metadata={"help": "decoder input dimension (default: --decoder-embed-dim)"}
    )
    decoder_output_dim: Optional[int] = field(
        default=None, metadata={"help": "decoder output dimension (default: --decoder-embed-dim)"}
    )
    moe_layers: int = field(
        default=1,
        metadata={
            "help": "number of MoE layers K among the L dense decoder layers, placed as fairseq's BASE layers: "
            "the i-th (from 0) after dense block ((i+1)*L)//(K+1) - i (K=2, L=4: both after block 1)"
        },
    )
    moe_layer_positions: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated dense-block indices p in [0, --decoder-layers]: one MoE layer after "
            "block p each (0: before the first block; repeat p to stack layers); replaces --moe-layers"
        },
    )
    # from other parts of the config: expert parallelism needs legacy_ddp, no ZeRO sharding of the
    # optimizer and no BMUF; the routing counts' logging window is the log interval
    ddp_backend: str = II("distributed_training.ddp_backend")
    zero_sharding: str = II("distributed_training.zero_sharding")
    use_bmuf: bool = II("optimization.use_bmuf")
    log_interval: int = II("common.log_interval")


def moe_layer_positions(num_dense_layers: int, num_moe_layers: int) -> List[int]:
    """The default placement, as dense-block indices (see :func:`parse_moe_positions`).

    BASE layers style: layer ``i`` (in order) inserted at index
    ``((i + 1) * L) // (K + 1)`` of the growing list, i.e. after dense block
    ``((i + 1) * L) // (K + 1) - i``.
    """
    return [((i + 1) * num_dense_layers) // (num_moe_layers + 1) - i for i in range(num_moe_layers)]


def parse_moe_positions(spec: Optional[str], opt: str, num_dense_layers: int, dense_opt: str) -> List[int]:
    """``"P1,P2,..."`` -> sorted dense-block indices, each in ``[0, L]``; ValueError naming ``opt`` otherwise."""
    try:
        positions = [int(p) for p in str(spec).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{opt} takes comma-separated integers (got {spec!r})") from None
    bad = [p for p in positions if p < 0 or p > num_dense_layers]
    if not positions or bad:
        raise ValueError(
            f"{opt} {spec}: every position must be between 0 (before the first block) and {dense_opt} "
            f"({num_dense_layers}, after the last block)"
        )
    return sorted(positions)


def resolved_moe_positions(args, moe_opt: str, positions_opt: str, dense_opt: str) -> List[int]:
    """Where the MoE layers of one stack go, as dense-block indices.

    ``moe_opt``/``positions_opt``/``dense_opt``: the options (``--moe-layers``,
    ``--moe-layer-positions``, ``--decoder-layers``), read from ``args``.
    """
    attr = lambda opt: opt[2:].replace("-", "_")  # noqa: E731
    dense = getattr(args, attr(dense_opt))
    spec = safe_getattr(args, attr(positions_opt), None)
    if spec is not None and str(spec).strip():
        return parse_moe_positions(spec, positions_opt, dense, dense_opt)
    return moe_layer_positions(dense, getattr(args, attr(moe_opt)))


class MoEDecoderLayer(nn.Module):
    """Adapts an MoE layer to fairseq's decoder-layer (or encoder-layer) call signature.

    The decoder (encoder) hands the token ids in through :attr:`input_tokens`
    (``(T, B)``) before running its layers; the layer keeps its statistics in
    :attr:`last_stats` for the decoder to collect.

    Args:
        moe: the MoE layer, called as ``moe(x, tokens) -> (x, stats)``.
        decoder: return ``(x, None, None)`` as decoder layers do (else ``x``, as encoder layers).
    """

    def __init__(self, moe: nn.Module, decoder: bool = True):
        super().__init__()
        self.moe = moe
        self.decoder = decoder
        self.input_tokens: Optional[torch.Tensor] = None
        #: ``(T_ctx, B)`` the whole prefix in incremental decoding, for a causal distilled router
        self.router_context: Optional[torch.Tensor] = None
        self.last_stats: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """``x``: ``(T, B, d)`` -> ``(x, None, None)`` (decoder) or ``x`` (encoder)."""
        if self.input_tokens is None:
            raise RuntimeError(
                "MoE layer called without token ids: run it through a StableMoE encoder/decoder, "
                "which passes the input tokens to the router"
            )
        if self.router_context is not None:
            x, self.last_stats = self.moe(x, self.input_tokens, context=self.router_context)
        else:
            x, self.last_stats = self.moe(x, self.input_tokens)
        return (x, None, None) if self.decoder else x

    def upgrade_state_dict_named(self, state_dict, name: str) -> None:
        """fairseq's encoder calls this on every layer when loading; nothing to upgrade."""


def insert_moe_layers(
    layers: nn.ModuleList, positions: Sequence[int], build: Any, decoder: bool, where: str
) -> List[MoEDecoderLayer]:
    """Insert one MoE layer after dense block ``p`` of ``layers`` for every ``p`` in ``positions``.

    ``positions``: dense-block indices in ``[0, len(layers)]`` (0: before the
    first block), sorted; equal ones stack. ``build()`` makes one MoE layer;
    ``where`` names the stack in log messages.
    """
    inserted: List[MoEDecoderLayer] = []
    for j, pos in enumerate(sorted(positions)):
        layer = MoEDecoderLayer(build(), decoder=decoder)
        layers.insert(pos + j, layer)  # the j layers inserted before it sit below it
        inserted.append(layer)
    for idx, layer in enumerate(layers):
        if isinstance(layer, MoEDecoderLayer) and hasattr(layer.moe, "layer_name"):
            layer.moe.layer_name = f"{where} MoE layer {inserted.index(layer)} ({where}.layers.{idx})"
    return inserted


def build_moe_layer(args, dictionary, embed_dim: int, ffn_dim: int) -> nn.Module:
    """The MoE layer of ``--moe-type`` (input ``(T, B, d)`` and token ids ``(T, B)``).

    ``dictionary``: of the token ids the layer sees (the distilled router's and
    the hash map's vocabulary). An option missing from ``args`` (a checkpoint
    saved before it existed) takes its :class:`MoEOptions` default.
    """
    defaults = {name: fld.default for name, fld in MoEOptions.__dataclass_fields__.items()}
    opt = lambda name: safe_getattr(args, name, defaults[name])  # noqa: E731
    moe_type = str(opt("moe_type"))
    layer = MOE_LAYERS.get(moe_type)
    if layer is None:
        raise ValueError(f"unknown --moe-type {moe_type!r}: choose one of {', '.join(MOE_TYPES)}")
    if layer is DenseFFNLayer:
        return DenseFFNLayer(embed_dim, ffn_dim, opt("moe_sublayers"), args.activation_fn)
    kwargs = dict(
        embed_dim=embed_dim,
        ffn_dim=ffn_dim,
        num_experts=opt("num_experts"),
        num_sublayers=opt("moe_sublayers"),
        padding_idx=dictionary.pad(),
        capacity_factor=opt("capacity_factor"),
        activation_fn=args.activation_fn,
        collapse_share=opt("collapse_share"),
        collapse_updates=opt("collapse_updates"),
    )
    if layer is StableMoELayer:
        kwargs.update(
            vocab_size=len(dictionary),
            distill_dim=opt("distill_dim"),
            two_stage_updates=opt("two_stage_updates"),
            stage1_assignment=str(opt("stage1_assignment")),
            distill_router=str(opt("distill_router")),
            distill_router_layers=opt("distill_router_layers"),
            distill_router_heads=opt("distill_router_heads"),
            distill_refit=bool(opt("distill_refit")),
            refit_updates=opt("refit_updates"),
            routing_window=int(safe_getattr(args, "log_interval", 100) or 100),
            routing_counts=not opt("no_routing_counts"),
        )
    elif layer is HashLayer:
        kwargs.update(symbols=list(dictionary.symbols))
    return layer(**kwargs)


class StableMoEDecoder(TransformerDecoder):
    """fairseq's Transformer decoder with MoE layers inserted.

    ``extract_features`` returns, besides fairseq's ``attn`` and
    ``inner_states``, ``extra["moe"]``: one statistics dict per MoE layer (see
    :meth:`StableMoELayer.forward`).
    """

    def __init__(
        self, args, dictionary, embed_tokens, no_encoder_attn=True, moe_positions: Optional[Sequence[int]] = None
    ):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        if moe_positions is None:
            moe_positions = resolved_moe_positions(args, "--moe-layers", "--moe-layer-positions", "--decoder-layers")
        self.moe_layers: List[MoEDecoderLayer] = insert_moe_layers(
            self.layers,
            moe_positions,
            lambda: build_moe_layer(args, dictionary, self.cfg.decoder.embed_dim, self.cfg.decoder.ffn_embed_dim),
            decoder=True,
            where="decoder",
        )

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        tokens = prev_output_tokens[:, -1:] if incremental_state is not None else prev_output_tokens
        tokens = tokens.transpose(0, 1)  # (T, B), the decoder layers' layout
        for layer in self.moe_layers:
            layer.input_tokens = tokens
            layer.last_stats = None
            if incremental_state is not None and getattr(layer.moe, "needs_context", False):
                # a causal distilled router reads the whole prefix (the generator reorders it with the beams)
                layer.router_context = prev_output_tokens.transpose(0, 1)
        try:
            x, extra = super().extract_features_scriptable(
                prev_output_tokens,
                encoder_out,
                incremental_state=incremental_state,
                full_context_alignment=full_context_alignment,
                alignment_layer=alignment_layer,
                alignment_heads=alignment_heads,
            )
            # the encoder's MoE statistics (translation) come first
            encoder_stats = encoder_out.get("moe", []) if isinstance(encoder_out, dict) else []
            extra["moe"] = list(encoder_stats) + [layer.last_stats for layer in self.moe_layers]
            # a training forward outside the criterion's reading_moe_stats() would leave the losses unused
            if (
                self.training
                and not moe_stats_read()
                and any(s is not None and ("balance_loss" in s or "distill_loss" in s) for s in extra["moe"])
            ):
                raise RuntimeError(
                    "the MoE layers' balance/distillation losses are not used by this criterion, so the "
                    "routers would not learn (StableMoE's distilled router would stay random): train with "
                    "--criterion stablemoe"
                )
        finally:
            for layer in self.moe_layers:
                layer.input_tokens = None
                layer.router_context = None
                layer.last_stats = None
        return x, extra


def refit_problems(args, distill_router: str) -> List[str]:
    """What is wrong with ``--distill-refit`` / ``--refit-updates`` (each with the fix)."""
    problems = []
    refit = bool(safe_getattr(args, "distill_refit", False))
    refit_updates = safe_getattr(args, "refit_updates", None)
    stage1 = args.two_stage_updates
    if refit and str(args.moe_type) != "stablemoe":
        problems.append(
            f"--distill-refit refits StableMoE's distilled router; --moe-type {args.moe_type} has none: "
            "drop --distill-refit or use --moe-type stablemoe"
        )
    if refit and distill_router != "wordemb":
        problems.append(
            f"--distill-refit freezes a token id -> expert table, but --distill-router {distill_router} routes by "
            "context: use --distill-router wordemb or drop --distill-refit"
        )
    if refit and safe_getattr(args, "no_routing_counts", False):
        problems.append("--distill-refit needs the routing counts: drop --no-routing-counts")
    if refit and stage1 < 1:
        problems.append(f"--distill-refit needs a stage 1 to count: --two-stage-updates must be >= 1 (got {stage1})")
    if refit_updates is not None and stage1 >= 1 and not 1 <= refit_updates <= stage1:
        problems.append(
            f"--refit-updates must be between 1 and --two-stage-updates ({stage1}), the stage-1 updates it "
            f"counts (got {refit_updates})"
        )
    return problems


def validate_moe_args(args, stacks: Sequence[Tuple[str, str, str]], model_name: str = "stablemoe_lm") -> None:
    """Refuse bad MoE options with an error that names the option and the fix.

    ``stacks``: ``(MoE-count option, MoE-positions option, dense-layers
    option)`` for every stack that gets MoE layers, e.g. ``("--moe-layers",
    "--moe-layer-positions", "--decoder-layers")``.
    """
    problems = []
    if args.num_experts < 1:
        problems.append(f"--num-experts must be >= 1 (got {args.num_experts})")
    placements = []
    for opt, positions_opt, dense_opt in stacks:
        attr = lambda o: o[2:].replace("-", "_")  # noqa: E731
        count, dense = getattr(args, attr(opt)), getattr(args, attr(dense_opt))
        spec = safe_getattr(args, attr(positions_opt), None)
        if spec is not None and str(spec).strip():
            try:
                count = len(parse_moe_positions(spec, positions_opt, dense, dense_opt))
            except ValueError as e:
                problems.append(str(e))
        elif count < 0 or count > dense:
            problems.append(
                f"{opt} must be between 0 and {dense_opt} ({dense}) (got {count}); "
                f"raise {dense_opt} or lower {opt}, or place them with {positions_opt}"
            )
        placements.append((opt, count, dense_opt, dense))
    if args.moe_sublayers < 1:
        problems.append(f"--moe-sublayers must be >= 1 (got {args.moe_sublayers})")
    if args.distill_dim < 1:
        problems.append(f"--distill-dim must be >= 1 (got {args.distill_dim})")
    if args.two_stage_updates < 0:
        problems.append(
            f"--two-stage-updates must be >= 0 (got {args.two_stage_updates}); "
            "it is the update count at which the distilled router takes over"
        )
    distill_router = str(safe_getattr(args, "distill_router", "wordemb"))
    if distill_router == "transformer":
        layers = safe_getattr(args, "distill_router_layers", 1)
        heads = safe_getattr(args, "distill_router_heads", 2)
        if layers < 1:
            problems.append(f"--distill-router-layers must be >= 1 (got {layers})")
        if heads < 1 or args.distill_dim % heads:
            problems.append(f"--distill-router-heads {heads} must divide --distill-dim ({args.distill_dim})")
    problems.extend(refit_problems(args, distill_router))
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        problems.append(f"--capacity-factor must be > 0 or unset (got {args.capacity_factor})")
    world_size, _ = world_size_and_rank()
    ddp_backend = safe_getattr(args, "ddp_backend", None)
    has_experts = str(args.moe_type) != "dense" and any(count > 0 for _, count, _, _ in placements)
    if world_size > 1 and has_experts and ddp_backend not in (None, "legacy_ddp", "no_c10d"):
        problems.append(
            f"--ddp-backend {ddp_backend} would average (and at start-up overwrite) the experts, "
            "which differ between processes: use --ddp-backend legacy_ddp"
        )
    zero_sharding = safe_getattr(args, "zero_sharding", "none")
    if world_size > 1 and has_experts and zero_sharding not in (None, "none"):
        problems.append(
            f"--zero-sharding {zero_sharding} would overwrite each process's experts with those of the process "
            "that updates them (fairscale's OSS broadcasts every parameter from its owner), and the experts "
            "differ between processes: use --zero-sharding none"
        )
    if world_size > 1 and has_experts and safe_getattr(args, "use_bmuf", False):
        problems.append(
            "--use-bmuf would overwrite the experts, which differ between processes (BMUF broadcasts rank 0's "
            "parameters after its warm-up and then averages every parameter across processes): drop --use-bmuf"
        )
    if has_experts and layout_problem(args.num_experts, world_size):
        problems.append(layout_problem(args.num_experts, world_size))
    for opt, count, dense_opt, _ in placements:
        layerdrop_opt = dense_opt.replace("-layers", "-layerdrop")
        layerdrop = safe_getattr(args, layerdrop_opt[2:].replace("-", "_"), 0.0) or 0.0
        if world_size > 1 and has_experts and count > 0 and layerdrop > 0:
            problems.append(
                f"{layerdrop_opt} {layerdrop} could skip an MoE layer on some processes and not on others, "
                f"whose all-to-alls would then wait forever: use {layerdrop_opt} 0 with expert parallelism"
            )
    for opt in ("character_embeddings", "adaptive_input"):
        if safe_getattr(args, opt, False):
            problems.append(f"--{opt.replace('_', '-')} is not supported by {model_name}")
    if problems:
        raise ValueError(f"{model_name}: " + "; ".join(problems))


@register_model("stablemoe_lm", dataclass=StableMoELanguageModelConfig)
class StableMoELanguageModel(TransformerLanguageModel):
    """Decoder-only StableMoE language model.

    ``--arch stablemoe_lm`` is a small model fit for CPU (4 layers, 256 dim,
    1024 FFN, 4 heads, 4 experts, one MoE layer); ``stablemoe_lm_base`` and
    ``stablemoe_lm_large`` are the paper's settings (see the module docstring).
    """

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def build_model(cls, args, task):
        validate_moe_args(args, [("--moe-layers", "--moe-layer-positions", "--decoder-layers")])
        # ``--arch stablemoe_lm`` (the model's own name) runs no architecture function:
        # its defaults are the dataclass's, completed here.
        for dim in ("decoder_input_dim", "decoder_output_dim"):
            if safe_getattr(args, dim, None) is None:
                setattr(args, dim, args.decoder_embed_dim)
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = StableMoEDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        return cls(decoder)

    @property
    def moe_layers(self) -> List[nn.Module]:
        """The MoE layers (``StableMoELayer``, or ``DenseFFNLayer`` for ``--moe-type dense``)."""
        return [layer.moe for layer in self.decoder.moe_layers]

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_moe_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def check_moe_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Clear errors, before torch's size-mismatch ones, for a checkpoint that does not fit ``model``.

    * a distilled router whose vocabulary is not the dictionary's;
    * a file holding another number of experts per layer than this process
      (a per-rank file opened in one process, or the other way round).
    """
    from .checkpoint_files import experts_per_layer

    for name, param in model.named_parameters():
        if name.endswith("distill_router.embed_tokens.weight") and name in state_dict:
            got, want = state_dict[name].shape[0], param.shape[0]
            if got != want:
                raise ValueError(
                    f"the checkpoint's distilled router ({name}) has {got} token ids but the "
                    f"dictionary has {want} entries: load it with the dictionary it was trained "
                    "with (the data directory given to fairseq-train)"
                )
    held = experts_per_layer(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            prefix = f"{name}.experts."
            if prefix in held and held[prefix] != len(module.experts):
                raise ValueError(
                    f"the checkpoint holds {held[prefix]} experts in {name} but this process holds "
                    f"{len(module.experts)} of --num-experts {module.num_experts}: a per-rank file of an "
                    "expert-parallel run opens in one process only after `stablemoe-consolidate FILE`, and "
                    "a consolidated file resumes on W processes after `stablemoe-consolidate FILE --shards W`"
                )


def _moe_defaults(args) -> None:
    """Fill the MoE options an architecture function did not set with the dataclass defaults."""
    for name, fld in StableMoELanguageModelConfig.__dataclass_fields__.items():
        if name in MoEOptions.__dataclass_fields__ or name in ("moe_layers", "moe_layer_positions"):
            setattr(args, name, safe_getattr(args, name, fld.default))


def _lm_setting(
    args, layers: int, dim: int, ffn: int, heads: int, sublayers: int, experts: Optional[int] = None
) -> None:
    """One size of the paper (or its code), with its training settings.

    Dropout and attention dropout 0, learned positions, ReLU, input and output
    embeddings tied (the paper code's ``--share-decoder-input-output-embed``),
    one MoE layer after the middle block (the default placement); every value
    can be overridden on the command line.
    """
    args.decoder_layers = safe_getattr(args, "decoder_layers", layers)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", dim)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", ffn)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", heads)
    args.decoder_learned_pos = safe_getattr(args, "decoder_learned_pos", True)
    args.dropout = safe_getattr(args, "dropout", 0.0)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.0)
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", True)
    args.activation_fn = safe_getattr(args, "activation_fn", "relu")
    args.moe_sublayers = safe_getattr(args, "moe_sublayers", sublayers)
    if experts is not None:
        args.num_experts = safe_getattr(args, "num_experts", experts)
    _moe_defaults(args)
    base_lm_architecture(args)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_base")
def stablemoe_lm_base(args):
    """The paper's base setting (Table 7): 12 x 768, FFN 3072, 12 heads, 32 experts of 3 sublayers."""
    _lm_setting(args, 12, 768, 3072, 12, sublayers=3, experts=32)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_small")
def stablemoe_lm_small(args):
    """Alias of ``stablemoe_lm_base``."""
    stablemoe_lm_base(args)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_large")
def stablemoe_lm_large(args):
    """The paper's large setting (Table 7): 24 x 1024, FFN 4096, 16 heads, 64 experts of 6 sublayers."""
    _lm_setting(args, 24, 1024, 4096, 16, sublayers=6, experts=64)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_fork_x1_medium")
def stablemoe_lm_fork_x1_medium(args):
    """The paper code's ``BaseGPT_x1_medium`` size: 24 x 1024, FFN 4096, 16 heads, 6 sublayers
    (experts: ``--num-experts``; the fork has one per GPU)."""
    _lm_setting(args, 24, 1024, 4096, 16, sublayers=6)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_medium")
def stablemoe_lm_medium(args):
    """Alias of ``stablemoe_lm_fork_x1_medium``."""
    stablemoe_lm_fork_x1_medium(args)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_fork_x1_large")
def stablemoe_lm_fork_x1_large(args):
    """The paper code's ``BaseGPT_x1_large`` size: 24 x 1536, FFN 6144, 16 heads, 3 sublayers
    (experts: ``--num-experts``; the fork has one per GPU)."""
    _lm_setting(args, 24, 1536, 6144, 16, sublayers=3)
