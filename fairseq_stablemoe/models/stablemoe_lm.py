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
from typing import List, Optional, Sequence

import torch.nn as nn
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

from ..modules.moe_layer import moe_stats_read
from ..modules.options import MoEOptions
from .moe_stack import (
    MoEDecoderLayer,
    build_moe_layer,
    check_moe_state_dict,
    insert_moe_layers,
    resolved_moe_positions,
    validate_moe_args,
)

logger = logging.getLogger(__name__)


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
