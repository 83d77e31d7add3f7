"""``stablemoe_lm``: a decoder-only Transformer LM with StableMoE layers.

Built on fairseq's :class:`TransformerLanguageModel` and
:class:`TransformerDecoder`, so ``--task language_modeling``,
``fairseq-eval-lm``, ``fairseq-generate``/``fairseq-interactive`` (incremental
decoding) and hub loading work unchanged. ``--moe-layers K`` extra MoE layers
are inserted among the ``L`` dense decoder layers, layer ``i`` at position
``((i + 1) * L) // (K + 1)``, as fairseq's BASE layers are.
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

from .layer import BaseLayer, DenseFFNLayer, HashLayer, MoELayer, StableMoELayer, SwitchLayer
from .parallel import layout_problem, world_size_and_rank

MOE_TYPES = ["stablemoe", "switch", "base", "hash", "dense"]

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
    moe_sublayers: int = field(
        default=1, metadata={"help": "residual FFN sublayers stacked in every expert"}
    )
    distill_dim: int = field(
        default=50, metadata={"help": "embedding size of the distilled (token-id) router"}
    )
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
    collapse_updates: int = field(
        default=100, metadata={"help": "...for this many consecutive updates"}
    )
    capacity_factor: Optional[float] = field(
        default=None,
        metadata={
            "help": "optional expert capacity as a multiple of tokens/N; tokens over it pass "
            "through unchanged. Unset: no token is ever dropped"
        },
    )


@dataclass
class StableMoELanguageModelConfig(TransformerLanguageModelConfig, MoEOptions):
    # The small CPU default of ``--arch stablemoe_lm`` (the other architectures set theirs).
    decoder_embed_dim: int = field(default=256, metadata={"help": "decoder embedding dimension"})
    decoder_ffn_embed_dim: int = field(
        default=1024, metadata={"help": "FFN dimension of dense layers and experts"}
    )
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
        metadata={"help": "number of MoE layers, inserted evenly among the dense decoder layers"},
    )
    # from other parts of the config: expert parallelism needs legacy_ddp
    ddp_backend: str = II("distributed_training.ddp_backend")


def moe_layer_positions(num_dense_layers: int, num_moe_layers: int) -> List[int]:
    """Insertion indices of the MoE layers, BASE-layers style.

    Inserting layer ``i`` (in order) at ``((i + 1) * L) // (K + 1)`` of the growing list.
    """
    return [((i + 1) * num_dense_layers) // (num_moe_layers + 1) for i in range(num_moe_layers)]


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
        self.last_stats: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """``x``: ``(T, B, d)`` -> ``(x, None, None)`` (decoder) or ``x`` (encoder)."""
        if self.input_tokens is None:
            raise RuntimeError(
                "MoE layer called without token ids: run it through a StableMoE encoder/decoder, "
                "which passes the input tokens to the router"
            )
        x, self.last_stats = self.moe(x, self.input_tokens)
        return (x, None, None) if self.decoder else x

    def upgrade_state_dict_named(self, state_dict, name: str) -> None:
        """fairseq's encoder calls this on every layer when loading; nothing to upgrade."""


def insert_moe_layers(
    layers: nn.ModuleList, num_moe_layers: int, build: Any, decoder: bool, where: str
) -> List[MoEDecoderLayer]:
    """Insert ``num_moe_layers`` MoE layers among ``layers`` (BASE-layers placement).

    ``build()`` makes one MoE layer; ``where`` names the stack in log messages.
    """
    inserted: List[MoEDecoderLayer] = []
    for pos in moe_layer_positions(len(layers), num_moe_layers):
        layer = MoEDecoderLayer(build(), decoder=decoder)
        layers.insert(pos, layer)
        inserted.append(layer)
    for idx, layer in enumerate(layers):
        if isinstance(layer, MoEDecoderLayer) and hasattr(layer.moe, "layer_name"):
            layer.moe.layer_name = f"{where} MoE layer {inserted.index(layer)} ({where}.layers.{idx})"
    return inserted


def build_moe_layer(args, dictionary, embed_dim: int, ffn_dim: int) -> nn.Module:
    """The MoE layer of ``--moe-type`` (input ``(T, B, d)`` and token ids ``(T, B)``).

    ``dictionary``: of the token ids the layer sees (the distilled router's and
    the hash map's vocabulary).
    """
    moe_type = str(args.moe_type)
    if moe_type == "dense":
        return DenseFFNLayer(embed_dim, ffn_dim, args.moe_sublayers, args.activation_fn)
    common = dict(
        embed_dim=embed_dim,
        ffn_dim=ffn_dim,
        num_experts=args.num_experts,
        num_sublayers=args.moe_sublayers,
        padding_idx=dictionary.pad(),
        capacity_factor=args.capacity_factor,
        activation_fn=args.activation_fn,
        collapse_share=safe_getattr(args, "collapse_share", 0.8),
        collapse_updates=safe_getattr(args, "collapse_updates", 100),
    )
    if moe_type == "stablemoe":
        return StableMoELayer(
            vocab_size=len(dictionary),
            distill_dim=args.distill_dim,
            two_stage_updates=args.two_stage_updates,
            **common,
        )
    if moe_type == "switch":
        return SwitchLayer(**common)
    if moe_type == "base":
        return BaseLayer(**common)
    if moe_type == "hash":
        return HashLayer(symbols=list(dictionary.symbols), **common)
    raise ValueError(f"unknown --moe-type {moe_type!r}: choose one of {', '.join(MOE_TYPES)}")


class StableMoEDecoder(TransformerDecoder):
    """fairseq's Transformer decoder with MoE layers inserted.

    ``extract_features`` returns, besides fairseq's ``attn`` and
    ``inner_states``, ``extra["moe"]``: one statistics dict per MoE layer (see
    :meth:`StableMoELayer.forward`).
    """

    #: set by the ``stablemoe`` criterion: training with a criterion that ignores the
    #: auxiliary losses is refused at the first training forward
    aux_loss_consumer = False

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=True, num_moe_layers: Optional[int] = None):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        self.moe_layers: List[MoEDecoderLayer] = insert_moe_layers(
            self.layers,
            args.moe_layers if num_moe_layers is None else num_moe_layers,
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
            if self.training and not self.aux_loss_consumer and any(
                s is not None and ("balance_loss" in s or "distill_loss" in s) for s in extra["moe"]
            ):
                raise RuntimeError(
                    "the MoE layers' balance/distillation losses are not used by this criterion, so the "
                    "routers would not learn (StableMoE's distilled router would stay random): train with "
                    "--criterion stablemoe"
                )
        finally:
            for layer in self.moe_layers:
                layer.input_tokens = None
                layer.last_stats = None
        return x, extra


def validate_moe_args(args, placements: Sequence[Tuple[str, int, str, int]], model_name: str = "stablemoe_lm") -> None:
    """Refuse bad MoE options with an error that names the option and the fix.

    ``placements``: ``(moe option, its value, dense-layers option, its value)``
    for every stack that gets MoE layers.
    """
    problems = []
    if args.num_experts < 1:
        problems.append(f"--num-experts must be >= 1 (got {args.num_experts})")
    for opt, count, dense_opt, dense in placements:
        if count < 0 or count > dense:
            problems.append(
                f"{opt} must be between 0 and {dense_opt} ({dense}) (got {count}); "
                f"raise {dense_opt} or lower {opt}"
            )
    if args.moe_sublayers < 1:
        problems.append(f"--moe-sublayers must be >= 1 (got {args.moe_sublayers})")
    if args.distill_dim < 1:
        problems.append(f"--distill-dim must be >= 1 (got {args.distill_dim})")
    if args.two_stage_updates < 0:
        problems.append(
            f"--two-stage-updates must be >= 0 (got {args.two_stage_updates}); "
            "it is the update count at which the distilled router takes over"
        )
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
    1024 FFN, 4 heads, 4 experts, one MoE layer); ``stablemoe_lm_small``,
    ``_medium`` and ``_large`` are the paper code's sizes.
    """

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def build_model(cls, args, task):
        validate_moe_args(args, [("--moe-layers", args.moe_layers, "--decoder-layers", args.decoder_layers)])
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
    from .checkpointing import experts_per_layer

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


def _moe_defaults(args, sublayers: int = 1) -> None:
    args.num_experts = safe_getattr(args, "num_experts", 4)
    args.moe_layers = safe_getattr(args, "moe_layers", 1)
    args.moe_sublayers = safe_getattr(args, "moe_sublayers", sublayers)
    args.distill_dim = safe_getattr(args, "distill_dim", 50)
    args.two_stage_updates = safe_getattr(args, "two_stage_updates", 1000)
    args.capacity_factor = safe_getattr(args, "capacity_factor", None)
    args.moe_type = safe_getattr(args, "moe_type", "stablemoe")


def _paper_size(args, layers: int, dim: int, ffn: int, heads: int, sublayers: int) -> None:
    args.decoder_layers = safe_getattr(args, "decoder_layers", layers)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", dim)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", ffn)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", heads)
    args.decoder_learned_pos = safe_getattr(args, "decoder_learned_pos", True)
    args.activation_fn = safe_getattr(args, "activation_fn", "relu")
    _moe_defaults(args, sublayers=sublayers)
    base_lm_architecture(args)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_small")
def stablemoe_lm_small(args):
    """The paper code's base size: 12 x 768, FFN 3072, 12 heads, 3 sublayers per expert."""
    _paper_size(args, 12, 768, 3072, 12, 3)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_medium")
def stablemoe_lm_medium(args):
    """24 x 1024, FFN 4096, 16 heads, 6 sublayers per expert."""
    _paper_size(args, 24, 1024, 4096, 16, 6)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_large")
def stablemoe_lm_large(args):
    """24 x 1536, FFN 6144, 16 heads, 3 sublayers per expert."""
    _paper_size(args, 24, 1536, 6144, 16, 3)
