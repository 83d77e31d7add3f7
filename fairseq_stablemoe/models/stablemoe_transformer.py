"""``stablemoe_transformer``: fairseq's encoder-decoder Transformer with MoE layers.

``--encoder-moe-layers K`` and ``--decoder-moe-layers K`` insert MoE layers
among the dense layers as in the language model, or
``--encoder-moe-layer-positions``/``--decoder-moe-layer-positions P1,P2,...``
one after each listed dense block (0: before the first). The encoder's routers read
the source token ids, the decoder's the target prefix. Works with
``--task translation`` and ``translation_multi_simple_epoch``,
``fairseq-generate`` and ``fairseq-interactive`` (MoE layers keep no
incremental state: a causal distilled router reads the decoder's whole target
prefix, which the generator reorders with the beams).

``stablemoe_transformer_base`` is the paper's translation setting (Table 8).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerEncoder, TransformerModel, base_architecture
from fairseq.utils import safe_getattr

from ..modules.options import MoEOptions
from .moe_stack import (
    MoEDecoderLayer,
    build_moe_layer,
    check_moe_state_dict,
    insert_moe_layers,
    resolved_moe_positions,
    validate_moe_args,
)
from .stablemoe_lm import StableMoEDecoder


@dataclass
class StableMoETranslationOptions(MoEOptions):
    encoder_moe_layers: int = field(
        default=1,
        metadata={"help": "number of MoE layers among the encoder layers, placed as --moe-layers places them"},
    )
    decoder_moe_layers: int = field(
        default=1,
        metadata={"help": "number of MoE layers among the decoder layers, placed as --moe-layers places them"},
    )
    encoder_moe_layer_positions: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated encoder block indices p in [0, --encoder-layers]: one MoE layer after "
            "block p each (0: before the first block); replaces --encoder-moe-layers"
        },
    )
    decoder_moe_layer_positions: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated decoder block indices p in [0, --decoder-layers]: one MoE layer after "
            "block p each (0: before the first block); replaces --decoder-moe-layers"
        },
    )


class StableMoEEncoder(TransformerEncoder):
    """fairseq's Transformer encoder with MoE layers inserted.

    Its output dict carries ``"moe"``: one statistics dict per MoE layer, which
    the decoder puts before its own in ``extra["moe"]``.
    """

    def __init__(self, args, dictionary, embed_tokens, moe_positions: Sequence[int]):
        super().__init__(args, dictionary, embed_tokens)
        self.moe_layers: List[MoEDecoderLayer] = insert_moe_layers(
            self.layers,
            moe_positions,
            lambda: build_moe_layer(args, dictionary, self.cfg.encoder.embed_dim, self.cfg.encoder.ffn_embed_dim),
            decoder=False,
            where="encoder",
        )

    def forward_scriptable(self, src_tokens, src_lengths=None, return_all_hiddens: bool = False, token_embeddings=None):
        tokens = src_tokens.transpose(0, 1)  # (T, B)
        for layer in self.moe_layers:
            layer.input_tokens = tokens
            layer.last_stats = None
        try:
            out = super().forward_scriptable(src_tokens, src_lengths, return_all_hiddens, token_embeddings)
            out["moe"] = [layer.last_stats for layer in self.moe_layers]
        finally:
            for layer in self.moe_layers:
                layer.input_tokens = None
                layer.last_stats = None
        return out


@register_model("stablemoe_transformer")
class StableMoETransformerModel(TransformerModel):
    """Encoder-decoder StableMoE (``--arch stablemoe_transformer`` is a small CPU model,
    ``stablemoe_transformer_base`` has fairseq's ``transformer`` base sizes)."""

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # no defaults in the parser: the architecture functions fill what was not given
        gen_parser_from_dataclass(parser, StableMoETranslationOptions(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        validate_moe_args(
            args,
            [
                ("--encoder-moe-layers", "--encoder-moe-layer-positions", "--encoder-layers"),
                ("--decoder-moe-layers", "--decoder-moe-layer-positions", "--decoder-layers"),
            ],
            model_name="stablemoe_transformer",
        )
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        positions = resolved_moe_positions(
            cfg, "--encoder-moe-layers", "--encoder-moe-layer-positions", "--encoder-layers"
        )
        return StableMoEEncoder(cfg, src_dict, embed_tokens, moe_positions=positions)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return StableMoEDecoder(
            cfg,
            tgt_dict,
            embed_tokens,
            no_encoder_attn=safe_getattr(cfg, "no_cross_attention", False),
            moe_positions=resolved_moe_positions(
                cfg, "--decoder-moe-layers", "--decoder-moe-layer-positions", "--decoder-layers"
            ),
        )

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_moe_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def _moe_translation_defaults(args) -> None:
    for fld, default in StableMoETranslationOptions.__dataclass_fields__.items():
        if not fld.startswith("_"):
            setattr(args, fld, safe_getattr(args, fld, default.default))


@register_model_architecture("stablemoe_transformer", "stablemoe_transformer")
def stablemoe_transformer(args):
    """Small, CPU-friendly: 3+3 layers, 256 dim, 1024 FFN, 4 heads, 4 experts, 1+1 MoE layers."""
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 3)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 1024)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 3)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    _moe_translation_defaults(args)
    base_architecture(args)


@register_model_architecture("stablemoe_transformer", "stablemoe_transformer_base")
def stablemoe_transformer_base(args):
    """The paper's translation setting (Table 8): fairseq's ``transformer`` base sizes (6+6 blocks,
    512 dim, 2048 FFN, 8 heads, dropout 0.1) with one MoE layer after the 3rd encoder and one after
    the 3rd decoder block (the default placement of one layer among 6), 32 experts of 3 sublayers each."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 6)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 6)
    args.num_experts = safe_getattr(args, "num_experts", 32)
    args.moe_sublayers = safe_getattr(args, "moe_sublayers", 3)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    _moe_translation_defaults(args)
    base_architecture(args)
