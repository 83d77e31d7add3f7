"""stablemoe_transformer: training across the stage boundary, beam search, and
incremental decoding against a full forward pass."""

import random
import re
import sys
from pathlib import Path

import pytest
import torch
import warm

import fairseq_stablemoe  # noqa: F401  (allow-lists the checkpoint types for torch.load)

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_stablemoe")
pytestmark = pytest.mark.slow  # a translation model trained end to end


def _sentences(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.randrange(60)
        words = []
        for _ in range(rng.randint(3, 10)):
            words.append(f"w{w}")
            w = (w * 5 + rng.randint(0, 2)) % 60
        out.append(words)
    return out


def _translate(words):
    """The 'language pair': reversed word order and a renamed vocabulary."""
    return ["v" + w[1:] for w in reversed(words)]


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mt")
    for split, n, seed in (("train", 2500, 0), ("valid", 100, 1), ("test", 100, 2)):
        sents = _sentences(n, seed)
        (tmp / f"{split}.src").write_text("\n".join(" ".join(s) for s in sents) + "\n")
        (tmp / f"{split}.tgt").write_text("\n".join(" ".join(_translate(s)) for s in sents) + "\n")
    warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            str(tmp / "train"),
            "--validpref",
            str(tmp / "valid"),
            "--testpref",
            str(tmp / "test"),
            "--destdir",
            str(tmp / "bin"),
            "--workers",
            "1",
        ],
        check=True,
    )
    save = tmp / "ckpt"
    out = warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.train",
            str(tmp / "bin"),
            "--user-dir",
            USER_DIR,
            "--task",
            "translation",
            "--arch",
            "stablemoe_transformer",
            "--encoder-layers",
            "2",
            "--decoder-layers",
            "2",
            "--encoder-embed-dim",
            "48",
            "--decoder-embed-dim",
            "48",
            "--encoder-ffn-embed-dim",
            "96",
            "--decoder-ffn-embed-dim",
            "96",
            "--encoder-attention-heads",
            "2",
            "--decoder-attention-heads",
            "2",
            "--criterion",
            "stablemoe",
            "--label-smoothing",
            "0.1",
            "--num-experts",
            "4",
            "--two-stage-updates",
            "60",
            "--optimizer",
            "adam",
            "--lr",
            "0.004",
            "--max-tokens",
            "2048",
            "--max-update",
            "240",
            "--cpu",
            "--save-dir",
            str(save),
            "--log-format",
            "json",
            "--log-interval",
            "20",
            "--seed",
            "2",
        ],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # epoch checkpoints, keyed by their update count
    ckpts = {}
    for p in save.glob("checkpoint[0-9]*.pt"):
        ckpts[torch.load(p, weights_only=True)["optimizer_history"][-1]["num_updates"]] = p
    return tmp, ckpts, out.stdout + out.stderr


def _bleu(data: Path, ckpt: Path) -> float:
    out = warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.generate",
            str(data),
            "--user-dir",
            USER_DIR,
            "--path",
            str(ckpt),
            "--beam",
            "4",
            "--cpu",
            "--max-tokens",
            "4096",
            "--gen-subset",
            "test",
            "--scoring",
            "sacrebleu",
        ],
    )
    m = re.search(r"BLEU = ([0-9.]+)", out.stdout + out.stderr)
    assert out.returncode == 0 and m, out.stderr[-3000:]
    return float(m.group(1))


def test_training_across_boundary_improves_bleu(mt_run):
    tmp, ckpts, log = mt_run
    updates = sorted(ckpts)
    assert updates[0] < 60 and updates[-1] == 240
    stages = re.findall(r'"stage": "([0-9.]+)"', log)
    assert "1" in stages and "2" in stages
    first, last = _bleu(tmp / "bin", ckpts[updates[0]]), _bleu(tmp / "bin", ckpts[240])
    assert last > first + 5, (first, last)
    # encoder and decoder routers frozen after the boundary
    after = [u for u in updates if u > 60]
    a = torch.load(ckpts[after[0]], weights_only=True)["model"]
    b = torch.load(ckpts[240], weights_only=True)["model"]
    router = [k for k in a if "distill_router" in k and k.endswith(("weight", "centroids"))]
    assert any(k.startswith("encoder.") for k in router) and any(k.startswith("decoder.") for k in router)
    for k in router:
        assert torch.equal(a[k], b[k]), k


def test_beam_search_scores_equal_full_forward(mt_run):
    tmp, ckpts, _ = mt_run
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(ckpts[max(ckpts)])], arg_overrides={"data": str(tmp / "bin")}
    )
    model = models[0].eval()
    task.load_dataset("test")
    itr = task.get_batch_iterator(task.dataset("test"), max_tokens=1000).next_epoch_itr(shuffle=False)
    sample = next(iter(itr))
    from fairseq.dataclass.configs import GenerationConfig

    generator = task.build_generator(models, GenerationConfig(beam=4))
    hypos = task.inference_step(generator, models, sample)
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    experts_used = set()
    checked = 0
    for i, nbest in enumerate(hypos):
        for hyp in nbest[:2]:
            tokens = hyp["tokens"]
            prev = torch.cat([tokens.new_tensor([task.target_dictionary.eos()]), tokens[:-1]]).unsqueeze(0)
            with torch.no_grad():
                net_output = model(src[i : i + 1], src_len[i : i + 1], prev)
                lprobs = model.get_normalized_probs(net_output, log_probs=True)[0]
            full = lprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(hyp["positional_scores"], full, rtol=1e-4, atol=1e-4)
            for stats in net_output[1]["moe"]:
                experts_used.update(torch.nonzero(stats["load"]).flatten().tolist())
            checked += 1
    assert checked >= 8
    assert len(experts_used) > 1


def test_bad_moe_layer_count(tmp_path, mt_run):
    tmp, _, _ = mt_run
    out = warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.train",
            str(tmp / "bin"),
            "--user-dir",
            USER_DIR,
            "--task",
            "translation",
            "--arch",
            "stablemoe_transformer",
            "--encoder-layers",
            "2",
            "--encoder-moe-layers",
            "3",
            "--criterion",
            "stablemoe",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--max-tokens",
            "512",
            "--max-update",
            "1",
            "--cpu",
            "--save-dir",
            str(tmp_path),
        ],
    )
    assert out.returncode != 0
    assert "--encoder-moe-layers must be between 0 and --encoder-layers (2)" in out.stderr
