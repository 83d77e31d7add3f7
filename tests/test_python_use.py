"""docs/python.md, run as written: the page's ```python blocks, in order, in one namespace, against the
shared trained run's checkpoint (tests/conftest.py), with its paths and example texts substituted (the
run's corpus is word-level, so the sentencepiece arguments go too; tests/test_own_data.py runs the page
with them, on the sentencepiece model that docs/own-data.md trains). Each substitution must apply
exactly once.

The page's results are checked against the model loaded on its own with fairseq's
``load_model_ensemble_and_task`` and run by hand: the score is the sum of the log-probabilities of the
text's tokens, each given the tokens before it; the next-token distribution is the model's; the
samples start with the prompt and have the requested length, and each
sampled token is among the model's 50 most likely (``sampling_topk=50``) with its log-probability as
its score.
"""

import math
import re
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from conftest import REPO, USER_DIR, markov_sentences

PAGE = REPO / "docs" / "python.md"

#: the page's placeholders: its paths, the sentencepiece arguments, its example texts
CHECKPOINTS = '"runs/my_texts/checkpoints"'
DATA = '"runs/my_texts/data-bin"'
SPM = '"runs/my_texts/spm/spm.model"'
BPE_ARGS = '    bpe="sentencepiece",\n    sentencepiece_model="runs/my_texts/spm/spm.model",\n'
TEXT = 'text = "It was the best of times, it was the worst of times."'
PROMPT = 'prompt = "It was"'
#: what the page asks of the samples
N_NEW, TOP_K, N_SAMPLES, MAX_LEN = 20, 50, 3, 40


def python_blocks() -> List[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def run_python_page(substitutions: Sequence[Tuple[str, str]]) -> Dict[str, object]:
    """The namespace the page's Python code leaves, after each ``(old, new)`` replaced exactly once."""
    code = "\n".join(python_blocks())
    for old, new in substitutions:
        assert code.count(old) == 1, f"docs/python.md: {old!r} occurs {code.count(old)} times, not once"
        code = code.replace(old, new)
    namespace: Dict[str, object] = {"__name__": "docs_python_md"}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


def log_probs(model, dictionary, ids: List[int]) -> torch.Tensor:
    """``(len(ids) + 1, vocab)``: the model's log-probabilities after [eos] + each prefix of ``ids``."""
    src = torch.tensor([dictionary.eos(), *ids]).unsqueeze(0)
    with torch.no_grad():
        return model.get_normalized_probs(model(src), log_probs=True)[0]


def check_page_results(ns: Dict[str, object], model, dictionary, text_ids: List[int], prompt_ids: List[int]):
    """The page's variables against the model run by hand (``model``: loaded on its own, eval mode)."""
    d = dictionary
    assert d.unk() not in text_ids and d.unk() not in prompt_ids
    lp = log_probs(model, d, text_ids)
    expected = lp[:-1].gather(1, torch.tensor(text_ids).unsqueeze(1)).squeeze(1)

    # score
    scored = ns["scored"]
    assert scored["tokens"].tolist() == text_ids
    torch.testing.assert_close(scored["positional_scores"], expected, rtol=0, atol=1e-4)
    assert ns["n"] == len(text_ids)
    assert ns["logp"] == pytest.approx(expected.sum().item(), abs=1e-3)
    assert ns["ppl"] == pytest.approx(math.exp(-expected.sum().item() / len(text_ids)), rel=1e-4)
    assert ns["logp_by_hand"] == pytest.approx(ns["logp"], abs=1e-3)

    # the next piece's distribution
    probs = lp[-1].exp()
    top = probs.topk(5)
    assert [s for s, _ in ns["next_pieces"]] == [d[i] for i in top.indices.tolist()]
    assert [p for _, p in ns["next_pieces"]] == pytest.approx(top.values.tolist(), abs=1e-5)

    # lm.sample: decoded strings that start with the prompt
    samples = ns["samples"]
    assert isinstance(samples, list) and len(samples) == N_SAMPLES
    for sample in samples:
        assert sample.startswith(ns["prompt"]), sample  # an end of sentence may come first: the prompt alone

    # lm.generate: exactly N new tokens after the prompt, then the end of sentence
    hypo, P, N = ns["hypo"], ns["P"], ns["N"]
    tokens = hypo["tokens"].tolist()
    assert (P, N) == (len(prompt_ids), N_NEW)
    assert len(tokens) == P + N + 1 and tokens[:P] == prompt_ids and tokens[-1] == d.eos()
    assert ns["new_tokens"].tolist() == tokens[P:-1]
    lp = log_probs(model, d, tokens[:-1])
    torch.testing.assert_close(
        hypo["positional_scores"], lp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1), rtol=0, atol=1e-4
    )
    for t in range(P, P + N):  # sampled among the 50 most likely (eos is barred before min_len, pad always)
        row = lp[t].clone()
        row[[d.eos(), d.pad()]] = -math.inf
        assert tokens[t] not in (d.eos(), d.pad()) and tokens[t] < len(d)
        assert (row > row[tokens[t]]).sum().item() < TOP_K, (t, tokens[t])


def test_page_has_the_placeholders_the_test_replaces():
    code = "\n".join(python_blocks())
    for old in (CHECKPOINTS, DATA, BPE_ARGS, TEXT, PROMPT):
        assert code.count(old) == 1, old
    assert f"max_len_b={MAX_LEN}" in code and f"N = {N_NEW}" in code and f"sampling_topk={TOP_K}" in code
    assert f"[prompt] * {N_SAMPLES}" in code


@pytest.fixture(scope="module")
def loaded_on_its_own(trained_run):
    """The checkpoint loaded without the hub interface."""
    from fairseq import checkpoint_utils

    import fairseq_stablemoe  # noqa: F401  (registers stablemoe_lm)

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(trained_run.save_dir / "checkpoint_last.pt")], arg_overrides={"data": str(trained_run.corpus.data_dir)}
    )
    return models[0].eval(), task.source_dictionary


def test_python_page_on_the_trained_run(trained_run, loaded_on_its_own):
    model, d = loaded_on_its_own
    sentence = markov_sentences(1, seed=2024)[0]
    prompt = " ".join(sentence.split()[:2])
    ns = run_python_page(
        [
            (CHECKPOINTS, repr(str(trained_run.save_dir))),
            (DATA, repr(str(trained_run.corpus.data_dir))),
            (BPE_ARGS, ""),
            (TEXT, f"text = {sentence!r}"),
            (PROMPT, f"prompt = {prompt!r}"),
        ]
    )
    check_page_results(ns, model, d, [d.index(w) for w in sentence.split()], [d.index(w) for w in prompt.split()])
    # word-level samples: at most max_len_b words, prompt included, each a word of the corpus (so no <unk>)
    words = {f"w{i}" for i in range(trained_run.corpus.vocab)}
    for sample in ns["samples"]:
        assert set(sample.split()) <= words and len(sample.split()) <= MAX_LEN, sample


def test_fairseq_class_with_user_dir(trained_run, loaded_on_its_own):
    """The page's alternative: fairseq's own TransformerLanguageModel with ``user_dir``."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    model, d = loaded_on_its_own
    lm = TransformerLanguageModel.from_pretrained(
        str(trained_run.save_dir),
        checkpoint_file="checkpoint_last.pt",
        data_name_or_path=str(trained_run.corpus.data_dir),
        user_dir=USER_DIR,
    ).eval()
    assert "user_dir=USER_DIR" in PAGE.read_text()
    sentence = markov_sentences(1, seed=7)[0]
    ids = [d.index(w) for w in sentence.split()]
    expected = log_probs(model, d, ids)[:-1].gather(1, torch.tensor(ids).unsqueeze(1)).sum().item()
    assert lm.score(sentence)["positional_scores"].sum().item() == pytest.approx(expected, abs=1e-3)
