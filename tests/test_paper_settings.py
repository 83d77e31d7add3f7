"""The paper's settings: architectures as resolved by fairseq's parser (Tables 7 and 8), and MoE
placement (Table 4) against a direct count of the dense blocks below every MoE layer."""

import argparse
from types import SimpleNamespace

import pytest
import torch
from conftest import BOUNDARY, USER_DIR, run_cli, train_args
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.utils import import_user_module

from fairseq_stablemoe.models.moe_stack import MoEDecoderLayer, moe_layer_positions, resolved_moe_positions
from fairseq_stablemoe.models.stablemoe_lm import StableMoELanguageModel

import_user_module(argparse.Namespace(user_dir=USER_DIR))


def lm_args(tmp_path, arch, *extra):
    """``--arch`` resolved as fairseq-train resolves it (parser, architecture function, model config)."""
    (tmp_path / "dict.txt").write_text("a 1\nb 1\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            str(tmp_path),
            "--user-dir",
            USER_DIR,
            "--task",
            "language_modeling",
            "--arch",
            arch,
            "--criterion",
            "stablemoe",
            *extra,
        ],
    )
    return args, convert_namespace_to_omegaconf(args).model


PAPER_LM = {
    # arch: layers, dim, ffn, heads, experts, sublayers, MoE layer after block
    "stablemoe_lm_base": (12, 768, 3072, 12, 32, 3, 6),
    "stablemoe_lm_small": (12, 768, 3072, 12, 32, 3, 6),
    "stablemoe_lm_large": (24, 1024, 4096, 16, 64, 6, 12),
}


@pytest.mark.parametrize("arch", sorted(PAPER_LM))
def test_lm_architectures_resolve_to_the_papers_table7(tmp_path, arch):
    layers, dim, ffn, heads, experts, sublayers, after = PAPER_LM[arch]
    _, cfg = lm_args(tmp_path, arch)
    assert (cfg.decoder_layers, cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim, cfg.decoder_attention_heads) == (
        layers,
        dim,
        ffn,
        heads,
    )
    assert (cfg.num_experts, cfg.moe_sublayers, cfg.moe_layers) == (experts, sublayers, 1)
    assert cfg.dropout == 0.0 and cfg.attention_dropout == 0.0 and cfg.activation_dropout == 0.0
    assert cfg.share_decoder_input_output_embed is True
    assert cfg.decoder_learned_pos is True and cfg.no_token_positional_embeddings is False
    assert cfg.activation_fn == "relu" and cfg.decoder_normalize_before is True
    assert resolved_moe_positions(cfg, "--moe-layers", "--moe-layer-positions", "--decoder-layers") == [after]
    assert (cfg.stage1_assignment, cfg.distill_router, cfg.distill_dim) == ("greedy", "wordemb", 50)


def test_fork_sizes_keep_their_names_and_command_line_wins(tmp_path):
    _, cfg = lm_args(tmp_path, "stablemoe_lm_fork_x1_large")
    assert (cfg.decoder_layers, cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim, cfg.moe_sublayers) == (
        24,
        1536,
        6144,
        3,
    )
    assert cfg.dropout == 0.0 and cfg.share_decoder_input_output_embed is True
    _, cfg = lm_args(
        tmp_path, "stablemoe_lm_base", "--dropout", "0.2", "--num-experts", "8", "--moe-layer-positions", "0,12"
    )
    assert (cfg.dropout, cfg.num_experts) == (0.2, 8)
    assert resolved_moe_positions(cfg, "--moe-layers", "--moe-layer-positions", "--decoder-layers") == [0, 12]


def test_translation_architecture_is_the_papers_table8(tmp_path):
    for lang in ("src", "tgt"):
        (tmp_path / f"dict.{lang}.txt").write_text("a 1\nb 1\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            str(tmp_path),
            "--user-dir",
            USER_DIR,
            "--task",
            "translation",
            "-s",
            "src",
            "-t",
            "tgt",
            "--arch",
            "stablemoe_transformer_base",
            "--criterion",
            "stablemoe",
        ],
    )
    assert (args.encoder_layers, args.decoder_layers, args.encoder_embed_dim, args.decoder_embed_dim) == (
        6,
        6,
        512,
        512,
    )
    assert (args.encoder_ffn_embed_dim, args.encoder_attention_heads, args.decoder_attention_heads) == (2048, 8, 8)
    assert (args.num_experts, args.moe_sublayers, args.dropout) == (32, 3, 0.1)
    for stack in ("encoder", "decoder"):
        got = resolved_moe_positions(
            args, f"--{stack}-moe-layers", f"--{stack}-moe-layer-positions", f"--{stack}-layers"
        )
        assert got == [3], stack  # after the 3rd block


# ----------------------------------------------------------------------------- placement


def build_tiny_lm(tmp_path, *extra):
    _, cfg = lm_args(
        tmp_path,
        "stablemoe_lm",
        "--decoder-layers",
        "4",
        "--decoder-embed-dim",
        "16",
        "--decoder-ffn-embed-dim",
        "32",
        "--decoder-attention-heads",
        "2",
        "--num-experts",
        "2",
        "--tokens-per-sample",
        "16",
        *extra,
    )
    dictionary = Dictionary()
    for w in "abcdef":
        dictionary.add_symbol(w)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return StableMoELanguageModel.build_model(cfg, task)


def dense_blocks_below_each_moe_layer(model):
    below, dense = [], 0
    for layer in model.decoder.layers:
        if isinstance(layer, MoEDecoderLayer):
            below.append(dense)
        else:
            dense += 1
    return below, dense


@pytest.mark.parametrize(
    "spec, expected", [("0", [0]), ("4", [4]), ("2,2,2", [2, 2, 2]), ("3,1,2", [1, 2, 3]), ("0,4", [0, 4])]
)
def test_moe_layer_positions_place_layers_after_the_given_blocks(tmp_path, spec, expected):
    model = build_tiny_lm(tmp_path, "--moe-layer-positions", spec)
    assert dense_blocks_below_each_moe_layer(model) == (expected, 4)
    assert len(model.moe_layers) == len(expected)
    tokens = torch.randint(4, 10, (2, 7))
    assert model.eval()(tokens)[0].shape == (2, 7, len(model.decoder.dictionary))


def test_default_placement_is_unchanged():
    """The BASE-layers rule, written as insertion into a growing list, against the positions."""
    for L in range(1, 13):
        for K in range(0, L + 1):
            layers = ["d"] * L
            for i in range(K):
                layers.insert(((i + 1) * L) // (K + 1), "m")
            below = []
            for idx, kind in enumerate(layers):
                if kind == "m":
                    below.append(layers[:idx].count("d"))
            assert moe_layer_positions(L, K) == below, (L, K)


@pytest.mark.parametrize("spec", ["5", "-1", "a,b", ","])
def test_bad_positions_are_refused_with_the_option_named(tmp_path, spec):
    with pytest.raises(ValueError, match="--moe-layer-positions"):
        build_tiny_lm(tmp_path, f"--moe-layer-positions={spec}")


@pytest.mark.slow
def test_training_with_moe_at_the_bottom_and_the_top(markov_data, tmp_path):
    """fairseq-train and fairseq-eval-lm with the MoE layer before the first block and after the last."""
    for spec in ("0", "2"):
        save = tmp_path / f"at{spec}"
        out = run_cli(
            "train",
            *train_args(
                markov_data.data_dir,
                save,
                "--max-update",
                str(BOUNDARY + 5),
                "--moe-layer-positions",
                spec,
                "--save-interval-updates",
                "100",
            ),
        )
        state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
        index = 0 if spec == "0" else 2  # 2 dense blocks (TINY_MODEL); the MoE layer sits at this index
        assert f"decoder.layers.{index}.moe.distill_router.centroids" in state, sorted(state)[:20]
        assert bool(state[f"decoder.layers.{index}.moe.distill_router.frozen"])
        assert "stage" in out.stdout + out.stderr
