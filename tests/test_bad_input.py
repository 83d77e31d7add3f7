"""Bad input: refused before any training step with a message naming the option; a checkpoint
opened with another dictionary; NaN/inf affinities in the assignment."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, USER_DIR, markov_sentences, preprocess, run_cli

import fairseq_stablemoe  # noqa: F401
from fairseq_stablemoe.modules.moe_layer import reading_moe_stats
from fairseq_stablemoe.modules.stablemoe_layer import StableMoELayer


def train_cmd(data: Path, save: Path, *extra: str):
    return [
        str(data),
        "--user-dir",
        USER_DIR,
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        *TINY_MODEL,
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--max-update",
        "3",
        "--cpu",
        "--num-workers",
        "0",
        "--save-dir",
        str(save),
        "--log-format",
        "json",
        "--log-interval",
        "1",
        *extra,
    ]


def assert_refused_before_training(out, save: Path, *needles: str):
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    # no training step ran: no update logged, no epoch begun, nothing saved
    assert "train_inner" not in text and '"num_updates"' not in text, text[-3000:]
    assert "begin training epoch" not in text, text[-3000:]
    assert not save.exists() or not list(save.glob("*.pt"))
    for needle in needles:
        assert needle in text, (needle, text[-3000:])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--num-experts", "0"], ["--num-experts", "(got 0)"]),
        (["--moe-layers", "-1"], ["--moe-layers", "(got -1)"]),
        (["--moe-layers", "3"], ["--moe-layers", "--decoder-layers (2)", "(got 3)"]),
        (["--two-stage-updates", "-1"], ["--two-stage-updates", "(got -1)"]),
    ],
    ids=["num-experts-0", "moe-layers-negative", "moe-layers-too-many", "two-stage-updates-negative"],
)
def test_bad_moe_option(markov_data, tmp_path, extra, needles):
    save = tmp_path / "ckpt"
    out = run_cli("train", *train_cmd(markov_data.data_dir, save, "--criterion", "stablemoe", *extra), check=False)
    assert_refused_before_training(out, save, *needles)


def test_control_the_same_command_trains(markov_data, tmp_path):
    """The command of the cases above, with valid options, does train (so they fail for their option)."""
    save = tmp_path / "ckpt"
    out = run_cli(
        "train",
        *train_cmd(
            markov_data.data_dir,
            save,
            "--criterion",
            "stablemoe",
            "--num-experts",
            "2",
            "--moe-layers",
            "2",
            "--two-stage-updates",
            "0",
        ),
    )
    text = out.stdout + out.stderr
    assert '"num_updates": "3"' in text and "train_inner" in text and "begin training epoch" in text
    assert (save / "checkpoint_last.pt").exists()


def test_moe_option_for_a_criterion_without_it(markov_data, tmp_path):
    save = tmp_path / "ckpt"
    out = run_cli(
        "train",
        *train_cmd(markov_data.data_dir, save, "--criterion", "cross_entropy", "--balance-factor", "0.3"),
        check=False,
    )
    assert_refused_before_training(out, save, "--balance-factor")


@pytest.fixture(scope="module")
def other_dictionary(tmp_path_factory):
    """A data dir binarised with another dictionary (90 word types 'z0'..'z89')."""
    tmp = tmp_path_factory.mktemp("other_dict")
    lines = [ln.replace("w", "z") for ln in markov_sentences(400, seed=5, vocab=90)]
    return preprocess(tmp / "text", {"train": lines[:350], "test": lines[350:]}, tmp / "bin")


def lm_dictionary_size(data: Path) -> int:
    """Entries of the dictionary fairseq's language_modeling task builds from ``data`` (padded to 8)."""
    from fairseq.data import Dictionary

    d = Dictionary.load(str(data / "dict.txt"))
    d.pad_to_multiple_(8)
    return len(d)


def test_eval_lm_with_another_dictionary(trained_run, other_dictionary):
    ckpt = trained_run.save_dir / "checkpoint_last.pt"
    ours, theirs = lm_dictionary_size(trained_run.corpus.data_dir), lm_dictionary_size(other_dictionary)
    assert ours != theirs
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert saved["decoder.embed_tokens.weight"].shape[0] == ours
    out = run_cli(
        "eval_lm",
        str(other_dictionary),
        "--user-dir",
        USER_DIR,
        "--path",
        str(ckpt),
        "--gen-subset",
        "test",
        "--cpu",
        "--tokens-per-sample",
        "32",
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "Perplexity" not in text
    # the error (last line) names the dictionary and both sizes, not torch's bare size mismatch
    error = text.strip().splitlines()[-1]
    assert "dictionary" in error, text[-3000:]
    assert re.search(rf"\b{ours}\b", error) and re.search(rf"\b{theirs}\b", error), error
    assert "size mismatch" not in text


def test_hub_loading_with_another_dictionary(trained_run, other_dictionary):
    from fairseq_stablemoe.models.stablemoe_lm import StableMoELanguageModel

    with pytest.raises(ValueError, match="dictionary") as err:
        StableMoELanguageModel.from_pretrained(
            str(trained_run.save_dir), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(other_dictionary)
        )
    sizes = (lm_dictionary_size(trained_run.corpus.data_dir), lm_dictionary_size(other_dictionary))
    assert all(re.search(rf"\b{n}\b", str(err.value)) for n in sizes), str(err.value)


# ----------------------------------------------------------------------------- NaN / inf affinities

PAD, VOCAB, N, D, T = 1, 20, 4, 8, 24


def make_layer(two_stage: int = 100) -> StableMoELayer:
    torch.manual_seed(0)
    layer = StableMoELayer(
        embed_dim=D,
        ffn_dim=16,
        num_experts=N,
        num_sublayers=1,
        vocab_size=VOCAB,
        padding_idx=PAD,
        distill_dim=6,
        two_stage_updates=two_stage,
    )
    with torch.no_grad():
        for p in layer.experts.parameters():  # non-zero experts (the second linear starts at 0)
            if p.dim() == 2:
                p.normal_(std=0.5)
        layer.backbone.expert_centroids.normal_()
        layer.distill_router.centroids.normal_()
    return layer


def inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(T, D, generator=g)
    tokens = torch.randint(2, VOCAB, (T,), generator=g)
    tokens[-3:] = PAD
    return h, tokens


def modes():
    """(name, num_updates, train?) for stage 1 training, stage 2 training and inference."""
    return [("stage1", 0, True), ("stage2", 100, True), ("eval", 0, False)]


@pytest.mark.parametrize("mode, updates, training", modes(), ids=[m[0] for m in modes()])
def test_nan_backbone_centroid(mode, updates, training):
    h, tokens = inputs()
    clean = make_layer()
    bad = make_layer()
    k = 2
    with torch.no_grad():
        bad.backbone.expert_centroids[k, 3] = float("nan")  # column k of the affinities is NaN for every token
    for layer in (clean, bad):
        layer.set_num_updates(updates)
        layer.train(training)
    # the replaced entries are counted at eval too (validation logs them)
    with torch.no_grad(), reading_moe_stats():
        out_clean, _ = clean(h, tokens)
        out, stats = bad(h, tokens)
    assert torch.isfinite(out).all()
    assert stats["nonfinite"].item() == T  # one replaced entry per token, padding rows included
    for key in ("balance_loss", "distill_loss"):
        if key in stats:
            assert torch.isfinite(stats[key])
    assert stats["load"].sum().item() == T - 3

    scores = h @ clean.backbone.expert_centroids.detach().t()
    finite = scores.clone()
    finite[:, k] = float("nan")
    fill = finite[torch.isfinite(finite)].min()  # the smallest finite affinity replaces the NaNs
    distill = clean.distill_router.embed_tokens.weight.detach()[tokens] @ clean.distill_router.centroids.detach().t()
    if mode == "stage1":
        expect_choice = torch.where(torch.arange(N) == k, torch.full_like(scores, -math.inf), scores).argmax(1)
    else:
        expect_choice = distill.argmax(1)
    valid = tokens.ne(PAD)
    expect_load = torch.zeros(N).index_add_(0, expect_choice[valid], torch.ones(int(valid.sum())))
    assert torch.equal(stats["load"], expect_load)
    if mode == "stage1":
        assert stats["load"][k] == 0, "the expert whose centroid is NaN gets no token"
    # tokens routed elsewhere than k (with their own finite affinity as gate) are unaffected
    unaffected = (
        valid & expect_choice.ne(k) & scores.argmax(1).eq(expect_choice)
        if mode == "stage1"
        else valid & expect_choice.ne(k)
    )
    assert unaffected.any()
    torch.testing.assert_close(out[unaffected], out_clean[unaffected], rtol=1e-6, atol=1e-6)
    # tokens sent to k are gated with sigmoid(fill) instead of NaN
    to_k = valid & expect_choice.eq(k)
    if to_k.any():
        expert_k = bad.experts[k]
        ref = h[to_k] + torch.sigmoid(fill) * (expert_k(h[to_k]) - h[to_k])
        torch.testing.assert_close(out[to_k], ref, rtol=1e-5, atol=1e-5)
    # padding passes through unchanged
    assert torch.equal(out[~valid], h[~valid])


@pytest.mark.parametrize("updates", [0, 100], ids=["live-router", "frozen-router"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_plain_inference_gates_nonfinite_affinities_as_validation(updates, value):
    """Outside reading_moe_stats the gate reads only the chosen backbone affinity: the same replacement, bit for bit."""
    h, tokens = inputs()
    layer = make_layer()
    with torch.no_grad():
        layer.backbone.expert_centroids[2, 3] = value
        if value != value:  # NaN: also a whole column of the distilled router's affinities
            layer.distill_router.centroids[0, 1] = value
    layer.set_num_updates(updates)
    layer.eval()
    with torch.no_grad():
        plain, _ = layer(h, tokens)
        with reading_moe_stats():
            logged, stats = layer(h, tokens)
    assert stats["nonfinite"].item() > 0
    assert torch.isfinite(plain).all()
    assert torch.equal(plain, logged)


def test_nonfinite_features_leave_other_tokens_alone():
    layer = make_layer()
    layer.train()
    h, tokens = inputs()
    bad_rows = [4, 9]
    h_bad = h.clone()
    h_bad[4, 0] = float("nan")
    h_bad[9, 5] = float("inf")
    out, stats = layer(h_bad, tokens)
    raw = h_bad @ layer.backbone.expert_centroids.detach().t()
    assert stats["nonfinite"].item() == (~torch.isfinite(raw)).sum().item() == 2 * N
    others = [t for t in range(T) if t not in bad_rows]
    assert torch.isfinite(out[others]).all()
    assert torch.isfinite(stats["balance_loss"]) and torch.isfinite(stats["distill_loss"])
    # the other tokens' routing and outputs are those of a run without the bad rows
    with torch.no_grad():
        ref, ref_stats = layer(h[others], tokens[others])
    torch.testing.assert_close(out[others].detach(), ref, rtol=1e-6, atol=1e-6)
    # the bad rows still count as routed tokens; each goes to one expert
    assert stats["load"].sum().item() == ref_stats["load"].sum().item() + len(bad_rows)


def test_all_affinities_nan():
    layer = make_layer()
    with torch.no_grad():
        layer.backbone.expert_centroids.fill_(float("nan"))
    layer.train()
    h, tokens = inputs()
    out, stats = layer(h, tokens)
    assert stats["nonfinite"].item() == T * N
    assert torch.isfinite(out).all()
    # no finite affinity: every entry becomes 0, arg-max picks expert 0, gate sigmoid(0) = 1/2
    valid = tokens.ne(PAD)
    assert stats["load"].tolist() == [float(valid.sum()), 0.0, 0.0, 0.0]
    with torch.no_grad():
        ref = h[valid] + 0.5 * (layer.experts[0](h[valid]) - h[valid])
    torch.testing.assert_close(out[valid].detach(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(stats["balance_loss"]) and torch.isfinite(stats["distill_loss"])
