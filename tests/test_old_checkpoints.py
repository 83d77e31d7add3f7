"""Checkpoints written by package version 0.1.0 (its flat module layout) load with today's code.

``tests/fixtures/checkpoints_0.1/`` holds a tiny two-stage StableMoE LM saved after its stage boundary,
as one file and as an expert-parallel pair, with the log-probabilities the saving code's model gave a
fixed batch (``make.py`` there says how they were made). Today's fairseq loading, ``stablemoe-consolidate``
and ``fairseq-train --restore-file`` must read them and give the same model.
"""

import shutil
import sys
from pathlib import Path

import torch
from conftest import run_cli
from corpus import markov_lines, run_checked

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoints_0.1"


def log_probs(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from fairseq import checkpoint_utils

    import fairseq_stablemoe  # noqa: F401  (registers stablemoe_lm)

    models, _ = checkpoint_utils.load_model_ensemble([str(path)], arg_overrides={"data": str(FIXTURE)})
    model = models[0].eval()
    with torch.no_grad():
        return model.get_normalized_probs(model(tokens), log_probs=True)


def test_a_one_process_checkpoint_gives_the_saved_model():
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    got = log_probs(FIXTURE / "one.pt", expected["tokens"])
    torch.testing.assert_close(got, expected["one"], rtol=0, atol=1e-5)


def test_a_per_rank_pair_consolidates_to_the_saved_model(tmp_path):
    for r in range(2):
        shutil.copy(FIXTURE / f"two-rank{r}-of2.pt", tmp_path / f"two-rank{r}-of2.pt")
    run_checked([sys.executable, "-m", "fairseq_stablemoe.cli.consolidate", str(tmp_path / "two.pt")])
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    got = log_probs(tmp_path / "two.pt", expected["tokens"])
    torch.testing.assert_close(got, expected["two"], rtol=0, atol=1e-5)


def test_training_resumes_from_an_old_checkpoint_in_stage_2(tmp_path):
    """The optimizer state and the frozen token-to-expert table come back: two more updates train the
    backbone and leave the frozen distilled router as it was saved."""
    text = tmp_path / "train.txt"
    text.write_text("\n".join(markov_lines(200, 40, seed=5)) + "\n")
    data = tmp_path / "bin"
    run_cli("preprocess", "--only-source", "--srcdict", str(FIXTURE / "dict.txt"), "--trainpref", str(text),
            "--validpref", str(text), "--destdir", str(data), "--workers", "1")  # fmt: skip
    save = tmp_path / "ckpt"
    save.mkdir()
    shutil.copy(FIXTURE / "one.pt", save / "checkpoint_last.pt")
    old = torch.load(save / "checkpoint_last.pt", weights_only=True)
    recipe = [
        "--task", "language_modeling", "--arch", "stablemoe_lm", "--criterion", "stablemoe",
        "--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
        "--decoder-attention-heads", "2", "--num-experts", "4", "--distill-dim", "8",
        "--tokens-per-sample", "16", "--max-tokens", "128", "--two-stage-updates", "3", "--max-update", "8",
        "--optimizer", "adam", "--lr", "0.005", "--dropout", "0", "--seed", "3", "--num-workers", "0", "--cpu",
        "--no-epoch-checkpoints", "--required-batch-size-multiple", "1", "--save-dir", str(save),
    ]  # fmt: skip
    out = run_checked([sys.executable, "-m", "fairseq_stablemoe.launch", str(data), *recipe])
    assert "checkpoint_last.pt (epoch 1 @ 6 updates)" in out, out[-3000:]
    new = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert new["optimizer_history"][-1]["num_updates"] == 8
    router = "decoder.layers.1.moe.distill_router."
    for key in (router + "embed_tokens.weight", router + "centroids", router + "refit_choice"):
        assert torch.equal(new["model"][key], old["model"][key]), key
    assert not torch.equal(new["model"]["decoder.embed_tokens.weight"], old["model"]["decoder.embed_tokens.weight"])
