"""End to end with fairseq's own commands on the synthetic Markov corpus (tests/conftest.py):

(a) fairseq-train across the stage boundary: stage losses in the json log, the distilled
    router bit-identical in every checkpoint after the boundary, the rest still training;
(b) resume before the boundary and past it, and resume after it with Adam + weight decay;
(c) fairseq-eval-lm perplexity against an in-process computation and the chain's entropy;
(d) generation: fairseq-interactive, hub loading with sample/score/generate;
(e) incremental decoding (with beam reordering) equals a full forward pass.
"""

import math
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import (
    BOUNDARY,
    MAX_UPDATE,
    SAVE_EVERY,
    SUCCESSOR_PROBS,
    USER_DIR,
    chain_entropy_nats,
    markov_sentences,
    run_cli,
    successors,
    train_args,
    train_inner_records,
)

import fairseq_stablemoe  # noqa: F401  (registers the plugin and the checkpoint allow-list)

MOE = "decoder.layers.1.moe"  # 2 dense layers + 1 MoE layer inserted at position 1


def load_state(path: Path) -> dict:
    # weights_only=True must work on the plugin's checkpoints (allow-listed fairseq/omegaconf types)
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_update(state: dict) -> int:
    return int(state["optimizer_history"][-1]["num_updates"])


def router_keys(model_state: Dict[str, torch.Tensor]) -> List[str]:
    return sorted(k for k in model_state if "router" in k)


def stage_of_record(update: int) -> str:
    """The train_inner record of update u is logged after step u, which ran with
    num_updates = u - 1: stage 1 iff u - 1 < BOUNDARY."""
    return "1" if update - 1 < BOUNDARY else "2"


def losses_by_update(log: str) -> Dict[int, dict]:
    return {int(r["num_updates"]): r for r in train_inner_records(log)}


# ----------------------------------------------------------------------------- (a) training


def test_train_log_stage_losses(trained_run):
    recs = train_inner_records(trained_run.log)
    assert [int(r["num_updates"]) for r in recs] == list(range(1, MAX_UPDATE + 1))
    for r in recs:
        u = int(r["num_updates"])
        assert r["stage"] == stage_of_record(u), u
        if r["stage"] == "1":
            assert float(r["balance_loss"]) > 0, r
            assert float(r["distill_loss"]) > 0, r
        else:
            assert float(r["balance_loss"]) == 0.0 and float(r["distill_loss"]) == 0.0, r
    # the LM learns: the last updates' loss is well below the first ones'
    first = sum(float(r["nll_loss"]) for r in recs[:5]) / 5
    last = sum(float(r["nll_loss"]) for r in recs[-5:]) / 5
    assert last < first - 2.0, (first, last)


def test_checkpoints_router_frozen_after_boundary(trained_run):
    ckpts = trained_run.checkpoints
    expected = list(range(SAVE_EVERY, MAX_UPDATE + 1, SAVE_EVERY))
    assert sorted(ckpts) == expected, sorted(ckpts)
    states = {}
    for u, p in ckpts.items():
        st = load_state(p)
        assert saved_update(st) == u
        states[u] = st["model"]
    before = [u for u in expected if u < BOUNDARY]
    after = [u for u in expected if u >= BOUNDARY]
    assert before and len(after) >= 3

    keys = router_keys(states[after[0]])
    params = [k for k in keys if torch.is_floating_point(states[after[0]][k])]
    assert f"{MOE}.distill_router.embed_tokens.weight" in params
    assert f"{MOE}.distill_router.centroids" in params
    # the frozen flag: off while in stage 1, on from the boundary (the model is frozen at the end of the
    # boundary update, before that update's checkpoint)
    for u in expected:
        assert bool(states[u][f"{MOE}.distill_router.frozen"]) == (u >= BOUNDARY), u
    # every router tensor is bit-identical from the boundary on
    for u in after[1:]:
        for k in keys:
            assert torch.equal(states[after[0]][k], states[u][k]), (k, u)
    # ... but it did train in stage 1 (so the check above can fail)
    for k in params:
        assert not torch.equal(states[before[0]][k], states[after[0]][k]), f"{k} should train in stage 1"
    # everything else keeps training in stage 2
    for k in (
        f"{MOE}.backbone.expert_centroids",
        f"{MOE}.experts.0.0.fc1.weight",
        f"{MOE}.experts.3.0.fc2.weight",
        "decoder.embed_tokens.weight",
    ):
        assert "router" not in k
        for a, b in zip(after, after[1:]):
            assert not torch.equal(states[a][k], states[b][k]), (k, a, b)


# ----------------------------------------------------------------------------- (b) resume


def _router_tensors(path: Path) -> Dict[str, torch.Tensor]:
    model = load_state(path)["model"]
    return {k: model[k] for k in router_keys(model)}


@pytest.mark.slow
def test_resume_before_boundary_then_past_it(trained_run, tmp_path):
    data = trained_run.corpus.data_dir
    save = tmp_path / "ckpt"
    stop, end = BOUNDARY - 10, BOUNDARY + SAVE_EVERY
    first = run_cli("train", *train_args(data, save, "--max-update", str(stop)))
    st = load_state(save / "checkpoint_last.pt")
    assert saved_update(st) == stop and not bool(st["model"][f"{MOE}.distill_router.frozen"])
    second = run_cli("train", *train_args(data, save, "--max-update", str(end)))
    log1, log2 = losses_by_update(first.stdout + first.stderr), losses_by_update(second.stdout + second.stderr)
    assert sorted(log1) == list(range(1, stop + 1))
    assert sorted(log2) == list(range(stop + 1, end + 1)), "the resumed run should continue the update count"
    for u, r in log2.items():
        assert r["stage"] == stage_of_record(u), u
        aux = float(r["balance_loss"]) > 0 and float(r["distill_loss"]) > 0
        assert aux == (r["stage"] == "1"), r
    # stop + resume is the same computation as the uninterrupted run (same seed and recipe)
    straight = losses_by_update(trained_run.log)
    for u in range(1, end + 1):
        got = (log1 if u <= stop else log2)[u]
        for key in ("loss", "balance_loss", "distill_loss"):
            assert got[key] == straight[u][key], (u, key, got[key], straight[u][key])
    # frozen at the boundary: the resumed run's router equals the uninterrupted run's, bit for bit
    resumed = _router_tensors(save / "checkpoint_last.pt")
    reference = _router_tensors(trained_run.checkpoints[end])
    assert resumed.keys() == reference.keys() and resumed
    for k in resumed:
        assert torch.equal(resumed[k], reference[k]), k
    assert bool(resumed[f"{MOE}.distill_router.frozen"])


def test_resume_after_boundary_with_adam_weight_decay(trained_run, tmp_path):
    """Restore a stage-2 checkpoint (Adam state, weight decay 0.01): the optimizer state must
    load (same parameter groups) and the router must stay exactly as frozen."""
    data = trained_run.corpus.data_dir
    # a checkpoint of the first epoch: fairseq itself (plain transformer_lm too) does not resume
    # bit-exactly from a mid-epoch checkpoint of a later epoch, and the losses are compared below
    start = BOUNDARY + SAVE_EVERY
    end = start + SAVE_EVERY
    src = trained_run.checkpoints[start]
    st = load_state(src)
    assert bool(st["model"][f"{MOE}.distill_router.frozen"])
    assert st["last_optimizer_state"]["state"], "the checkpoint should carry Adam's moments"
    save = tmp_path / "ckpt"
    out = run_cli("train", *train_args(data, save, "--max-update", str(end), "--restore-file", str(src)))
    text = out.stdout + out.stderr
    assert re.search(rf"loaded checkpoint {re.escape(str(src))} \(epoch \d+ @ {start} updates\)", text, re.I), text[
        -3000:
    ]
    log = losses_by_update(text)
    assert sorted(log) == list(range(start + 1, end + 1))
    straight = losses_by_update(trained_run.log)
    for u, r in log.items():
        assert r["stage"] == "2" and float(r["balance_loss"]) == 0 and float(r["distill_loss"]) == 0
        # the optimizer state was restored, not re-initialised: the same losses as without a stop
        assert r["loss"] == straight[u]["loss"], (u, r["loss"], straight[u]["loss"])
    frozen = _router_tensors(src)
    written = [save / "checkpoint_last.pt", *save.glob(f"checkpoint_*_{end}.pt")]
    assert len(written) == 2, sorted(p.name for p in save.iterdir())
    for path in written:
        got = _router_tensors(path)
        assert got.keys() == frozen.keys()
        for k in frozen:
            assert torch.equal(got[k], frozen[k]), (path.name, k)
    new = load_state(save / "checkpoint_last.pt")["model"]
    assert not torch.equal(new[f"{MOE}.backbone.expert_centroids"], st["model"][f"{MOE}.backbone.expert_centroids"])


# ----------------------------------------------------------------------------- (c) eval-lm


def eval_lm_ppl(data: Path, ckpt: Path) -> float:
    out = run_cli(
        "eval_lm",
        str(data),
        "--user-dir",
        USER_DIR,
        "--path",
        str(ckpt),
        "--gen-subset",
        "test",
        "--cpu",
        "--tokens-per-sample",
        "32",
        "--max-tokens",
        "4096",
        "--num-workers",
        "0",
    )
    m = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+|inf|nan)", out.stdout + out.stderr)
    assert m, (out.stdout + out.stderr)[-3000:]
    return float(m.group(2))


@pytest.fixture(scope="module")
def loaded(trained_run):
    """The final checkpoint as a model (eval mode) with its task and the test split."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(trained_run.save_dir / "checkpoint_last.pt")], arg_overrides={"data": str(trained_run.corpus.data_dir)}
    )
    task.load_dataset("test")
    return models[0].eval(), task


def oracle_perplexity(lines: List[str]) -> float:
    """Perplexity of the test text (words + one EOS per sentence) under the true generating process,
    given the whole past: the best any model can expect."""
    succ = successors()
    nll, n = 0.0, 0
    for line in lines:
        words = [int(w[1:]) for w in line.split()]
        nll += math.log(len(succ))  # uniform first word
        for i, (a, b) in enumerate(zip(words, words[1:])):
            length = i + 1  # words so far
            p_end = 1 / (13 - length) if length >= 4 else 0.0  # length uniform in 4..12
            nll -= math.log((1 - p_end) * sum(p for s, p in zip(succ[a], SUCCESSOR_PROBS) if s == b))
        nll -= math.log(1 / (13 - len(words)))  # EOS
        n += len(words) + 1
    return math.exp(nll / n)


def test_eval_lm_perplexity(trained_run, loaded):
    corpus = trained_run.corpus
    first = eval_lm_ppl(corpus.data_dir, trained_run.checkpoints[min(trained_run.checkpoints)])
    last = eval_lm_ppl(corpus.data_dir, trained_run.save_dir / "checkpoint_last.pt")
    assert math.isfinite(first) and math.isfinite(last)
    assert last < first / 3, (first, last)
    assert last < corpus.dict_size / 5, (last, corpus.dict_size)
    test_lines = (corpus.text_dir / "test.txt").read_text().splitlines()
    assert last > oracle_perplexity(test_lines), "below the entropy of the generating process"
    assert math.exp(chain_entropy_nats()) < last

    # the same number computed here: 32-token blocks, every target scored, inference routing
    model, task = loaded
    ds = task.dataset("test")
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            lp = model.get_normalized_probs(model(item["source"].unsqueeze(0)), log_probs=True)[0]
            nll -= lp.gather(1, item["target"].unsqueeze(1)).sum().item()
            n += item["target"].numel()
    assert n == sum(len(line.split()) + 1 for line in test_lines)
    here = 2 ** (nll / n / math.log(2))
    assert last == pytest.approx(here, rel=2e-3), (last, here)


# ----------------------------------------------------------------------------- (d) generation


def reference_log_probs(model, dictionary, tokens: torch.Tensor) -> torch.Tensor:
    """``(len, vocab)`` log-probs of the token after each prefix of [eos] + tokens[:-1] (full forward)."""
    src = torch.cat([torch.tensor([dictionary.eos()]), tokens[:-1]]).unsqueeze(0)
    with torch.no_grad():
        return model.get_normalized_probs(model(src), log_probs=True)[0]


def test_interactive_greedy_matches_full_forward(trained_run, loaded):
    model, task = loaded
    d = task.source_dictionary
    prompts = ["w3 w77", "w150", "w10 w11 w12"]
    out = run_cli(
        "interactive",
        str(trained_run.corpus.data_dir),
        "--user-dir",
        USER_DIR,
        "--task",
        "language_modeling",
        "--path",
        str(trained_run.save_dir / "checkpoint_last.pt"),
        "--beam",
        "1",
        "--max-len-b",
        "10",
        "--cpu",
        stdin="\n".join(prompts) + "\n",
    )
    hyps = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", out.stdout, re.M))
    pos = dict(re.findall(r"^P-(\d+)\t(.*)$", out.stdout, re.M))
    assert sorted(hyps) == sorted(pos) == ["0", "1", "2"], out.stdout[-2000:]
    follows = total = 0
    succ = successors()
    for i, prompt in enumerate(prompts):
        words = hyps[str(i)].split()
        assert words[: len(prompt.split())] == prompt.split()
        assert len(words) > len(prompt.split()), "nothing generated"
        tokens = torch.tensor([d.index(w) for w in words] + [d.eos()])
        assert d.unk() not in tokens.tolist()
        lp = reference_log_probs(model, d, tokens)
        scores = torch.tensor([float(x) for x in pos[str(i)].split()])
        assert scores.numel() == tokens.numel()
        # P- lines are base-2 log-probs of every token (prompt, generated, EOS), 4 decimals
        expected = lp.gather(1, tokens.unsqueeze(1)).squeeze(1) / math.log(2)
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-3)
        # greedy: every generated word is the arg-max of the full-forward distribution
        banned = [d.pad(), d.unk(), d.bos()]
        for t in range(len(prompt.split()), len(words)):
            row = lp[t].clone()
            row[banned] = -math.inf
            assert row.argmax().item() == tokens[t].item(), (prompt, t)
            follows += int(int(words[t][1:]) == succ[int(words[t - 1][1:])][0])
            total += 1
    # and it has learned the chain: greedy mostly takes the most likely successor
    assert follows >= 0.6 * total, (follows, total)


@pytest.fixture(scope="module")
def hub(trained_run):
    from fairseq_stablemoe.models.stablemoe_lm import StableMoELanguageModel

    return StableMoELanguageModel.from_pretrained(
        str(trained_run.save_dir),
        checkpoint_file="checkpoint_last.pt",
        data_name_or_path=str(trained_run.corpus.data_dir),
    ).eval()


def test_hub_score_and_generate(hub, loaded):
    model, task = loaded
    d = task.source_dictionary
    sentence = markov_sentences(1, seed=99)[0]
    scored = hub.score(sentence)
    tokens = torch.tensor([d.index(w) for w in sentence.split()])
    assert torch.equal(scored["tokens"][: len(tokens)], tokens)
    lp = reference_log_probs(model, d, torch.cat([tokens, torch.tensor([d.eos()])]))
    expected = lp[: len(tokens)].gather(1, tokens.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(scored["positional_scores"], expected, rtol=0, atol=1e-4)

    hypo = hub.generate([hub.encode("w42 w7")], beam=2, max_len_b=8)[0][0]
    gen = hypo["tokens"]
    assert gen[:2].tolist() == [d.index("w42"), d.index("w7")] and gen[-1].item() == d.eos()
    lp = reference_log_probs(model, d, gen)
    torch.testing.assert_close(hypo["positional_scores"], lp.gather(1, gen.unsqueeze(1)).squeeze(1), rtol=0, atol=1e-4)


def test_hub_sample(hub):
    torch.manual_seed(0)
    outs = hub.sample(["w5 w9"] * 4, beam=1, sampling=True, sampling_topk=3, max_len_b=10)
    assert len(outs) == 4
    vocab = {f"w{i}" for i in range(200)}
    for out in outs:
        words = out.split()
        assert words[:2] == ["w5", "w9"] and len(words) > 2
        assert set(words) <= vocab, out


# ----------------------------------------------------------------------------- (e) incremental


def test_incremental_decoding_equals_full_forward(loaded):
    model, task = loaded
    ds = task.dataset("test")
    T = 20
    tokens = torch.stack([ds[i]["source"][:T] for i in range(6)])  # (B, T)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    reorder_at = 9
    with torch.no_grad():
        full = model.get_normalized_probs(model(tokens), log_probs=True)
        # after the reorder at step `reorder_at`, row b continues the prefix of row order[b]
        reordered = tokens[order]
        full_reordered = full[order]

        state: Dict = {}
        steps, load = [], torch.zeros(model.moe_layers[0].num_experts)
        prefix = tokens
        for t in range(T):
            if t == reorder_at:  # as SequenceGenerator does between beam steps
                model.decoder.reorder_incremental_state_scripting(state, order)
                prefix = reordered
            out = model.decoder(prefix[:, : t + 1], incremental_state=state)
            assert out[0].shape[1] == 1, "incremental decoding should compute one position per step"
            steps.append(model.get_normalized_probs(out, log_probs=True)[:, -1])
            load += out[1]["moe"][0]["load"]
        incremental = torch.stack(steps, dim=1)
        _, extra = model.decoder.extract_features(tokens, None)
    torch.testing.assert_close(incremental[:, :reorder_at], full[:, :reorder_at], rtol=0, atol=1e-5)
    torch.testing.assert_close(incremental[:, reorder_at:], full_reordered[:, reorder_at:], rtol=0, atol=1e-5)
    # routing is by token id at inference: the same tokens, the same per-expert load
    full_load = extra["moe"][0]["load"]
    assert load.sum() == full_load.sum() == tokens.numel()
    assert torch.equal(load, full_load), (load, full_load)
    assert (full_load > 0).sum() > 1, f"routing should use several experts: {full_load}"
    # and the MoE layer matters: the output changes if its experts are skipped
    moe = model.moe_layers[0]
    saved = [p.detach().clone() for p in moe.experts.parameters()]
    try:
        with torch.no_grad():
            for p in moe.experts.parameters():
                p.zero_()
            zeroed = model.get_normalized_probs(model(tokens), log_probs=True)
    finally:
        with torch.no_grad():
            for p, s in zip(moe.experts.parameters(), saved):
                p.copy_(s)
    assert (zeroed - full).abs().max() > 1e-3
