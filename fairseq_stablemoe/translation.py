"""``stablemoe_transformer``: fairseq's encoder-decoder Transformer with MoE layers.

``--encoder-moe-layers K`` and ``--decoder-moe-layers K`` insert MoE layers
among the dense layers as in the language model. The encoder's routers read
the source token ids, the decoder's the target prefix. Works with
``--task translation`` and ``translation_multi_simple_epoch``,
``fairseq-generate`` and ``fairseq-interactive`` (MoE layers keep no
incremental state, so beam reordering needs nothing from them).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerEncoder, TransformerModel, base_architecture
from fairseq.utils import safe_getattr

from .model import (
    MoEDecoderLayer,
    MoEOptions,
    StableMoEDecoder,
    build_moe_layer,
    check_moe_state_dict,
    insert_moe_layers,
    validate_moe_args,
)


@dataclass
class StableMoETranslationOptions(MoEOptions):
    encoder_moe_layers: int = field(
        default=1, metadata={"help": "number of MoE layers inserted evenly among the encoder layers"}
    )
    decoder_moe_layers: int = field(
        default=1, metadata={"help": "number of MoE layers inserted evenly among the decoder layers"}
    )


class StableMoEEncoder(TransformerEncoder):
    """fairseq's Transformer encoder with MoE layers inserted.

    Its output dict carries ``"moe"``: one statistics dict per MoE layer, which
    the decoder puts before its own in ``extra["moe"]``.
    """

    def __init__(self, args, dictionary, embed_tokens, num_moe_layers: int):
        super().__init__(args, dictionary, embed_tokens)
        self.moe_layers: List[MoEDecoderLayer] = insert_moe_layers(
            self.layers,
            num_moe_layers,
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
        gen_parser_from_dataclass(parser, StableMoETranslationOptions())

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        validate_moe_args(
            args,
            [
                ("--encoder-moe-layers", args.encoder_moe_layers, "--encoder-layers", args.encoder_layers),
                ("--decoder-moe-layers", args.decoder_moe_layers, "--decoder-layers", args.decoder_layers),
            ],
            model_name="stablemoe_transformer",
        )
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return StableMoEEncoder(cfg, src_dict, embed_tokens, num_moe_layers=cfg.encoder_moe_layers)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return StableMoEDecoder(
            cfg,
            tgt_dict,
            embed_tokens,
            no_encoder_attn=safe_getattr(cfg, "no_cross_attention", False),
            num_moe_layers=cfg.decoder_moe_layers,
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
    """fairseq's ``transformer`` base sizes (6+6 layers, 512 dim, 2048 FFN, 8 heads)."""
    _moe_translation_defaults(args)
    base_architecture(args)
