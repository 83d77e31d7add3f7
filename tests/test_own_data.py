"""docs/own-data.md, followed as written: the page's ```bash blocks, in order, in one bash process, on a
small corpus of raw text files that the test writes (CRLF line ends, blank lines, runs of whitespace, a
subfolder, a file name with a space, a file without a final newline, a short file, a file that is not
``.txt``).

For speed a short, explicit list of substitutions shrinks the vocabulary, the model and the schedule;
each must apply exactly once, so a change of the page that one of them no longer matches fails here
instead of silently running the page's full schedule. Everything else runs as the page has it.

The outcome is checked, not only the exit status: the splits are the page's rule applied to the
cleaned files, every line is encoded, the training crosses the stage boundary and saves its
checkpoints, eval-lm's perplexity is finite, well below the uniform one over the vocabulary, and
counts the tokens the page says it counts, and the routing summary covers the test split.
"""

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import REPO, VOCAB, markov_sentences

PAGE = REPO / "docs" / "own-data.md"

#: (the page's text, what the test runs instead): each must occur exactly once in the page's bash blocks
SUBSTITUTIONS = [
    ("RAW=my_texts ", "RAW={raw} "),
    ("WORK=runs/my_texts ", "WORK={work} "),
    ("vocab_size=8000", "vocab_size=150"),
    (
        "--arch stablemoe_lm --num-experts 8 ",
        "--arch stablemoe_lm --num-experts 4 --decoder-layers 2 --decoder-embed-dim 64 "
        "--decoder-ffn-embed-dim 128 --decoder-attention-heads 2 ",
    ),
    ("--two-stage-updates 300 ", "--two-stage-updates 20 "),
    ("--warmup-updates 300 ", "--warmup-updates 10 "),
    ("--max-tokens 4096 ", "--max-tokens 1024 "),
    ("--max-update 3000 ", "--max-update 60 "),
    ("--save-interval-updates 500 ", "--save-interval-updates 30 "),
    ("--validate-interval-updates 500 ", "--validate-interval-updates 30 "),
    ("--log-interval 50 ", "--log-interval 10 "),
]
MAX_UPDATE, BOUNDARY = 60, 20


def bash_blocks(page: str) -> List[str]:
    return re.findall(r"^```bash\n(.*?)^```", page, flags=re.S | re.M)


def page_script(raw: Path, work: Path) -> str:
    script = "\n".join(bash_blocks(PAGE.read_text()))
    for old, new in SUBSTITUTIONS:
        assert script.count(old) == 1, f"docs/own-data.md: {old!r} occurs {script.count(old)} times, not once"
        script = script.replace(old, new.format(raw=raw, work=work))
    return script


SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ra", "to", "vi", "de", "po", "gu", "sha", "te", "rin", "mo"]


def word(i: int) -> str:
    """A made-up word of 1-3 syllables for word type ``i`` < 225 of the Markov chain."""
    n = len(SYLLABLES)
    w = SYLLABLES[i % n] + (SYLLABLES[i // n] if i >= n else "")
    return w + (SYLLABLES[(7 * i) % n] if i % 4 == 0 and i >= n else "")


def write_raw_corpus(raw: Path) -> Dict[str, List[str]]:
    """Raw files in awkward shapes; returns each .txt file's lines as the page's cleaning should leave them,
    in the order the page reads the files (sorted paths)."""
    assert len({word(i) for i in range(VOCAB)}) == VOCAB
    lines = [" ".join(word(int(w[1:])) for w in line.split()) for line in markov_sentences(3000, seed=7)]
    docs = {
        "a.txt": lines[:1200],
        "d e.txt": lines[1200:2100],
        "sub/b.txt": lines[2100:2975],
        "sub/ten.txt": lines[2975:2985],  # 10 lines: 9 to train, none to valid, 1 to test (as the page says)
        "z_short.txt": lines[2985:3000],  # 15 lines: 13 to train, 1 to valid, 1 to test
    }
    (raw / "sub").mkdir(parents=True)
    for name, doc in docs.items():
        out = []
        for i, line in enumerate(doc):
            words = line.split()
            if i % 7 == 0:  # runs of whitespace, tabs, leading and trailing blanks
                line = "  " + "\t ".join(words) + "  "
            out.append(line)
            if i % 11 == 0:
                out.append("   " if i % 2 else "")  # empty and blank lines
        text = ("\r\n" if name == "a.txt" else "\n").join(out)
        if name != "sub/b.txt":
            text += "\r\n" if name == "a.txt" else "\n"
        (raw / name).write_bytes(text.encode("utf-8"))
    (raw / "notes.md").write_text("not a .txt file: left out\n")
    return {name: doc for name, doc in sorted(docs.items(), key=lambda kv: str(raw / kv[0]))}


def expected_splits(docs: Dict[str, List[str]]) -> Dict[str, List[str]]:
    splits: Dict[str, List[str]] = {"train": [], "valid": [], "test": []}
    for doc in docs.values():
        n = len(doc)
        a, b = n * 90 // 100, n * 95 // 100
        splits["train"] += doc[:a]
        splits["valid"] += doc[a:b]
        splits["test"] += doc[b:]
    return splits


@pytest.fixture(scope="module")
def followed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own_data")
    raw, work = tmp / "raw", tmp / "work"
    docs = write_raw_corpus(raw)
    script = page_script(raw, work)
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    out = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=str(tmp),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"the page's commands failed (exit {out.returncode}):\n{out.stdout[-6000:]}"
    return {"work": work, "docs": docs, "log": out.stdout}


def test_the_substitutions_are_all_the_test_changes():
    page = PAGE.read_text()
    blocks = bash_blocks(page)
    assert len(blocks) == 7, "the page's steps: names, split, sentencepiece, preprocess, train, eval, routing"
    script = "\n".join(blocks)
    for old, _ in SUBSTITUTIONS:
        assert script.count(old) == 1, old
    # the page's own advice about the stage boundary holds for the commands it gives
    boundary = int(re.search(r"--two-stage-updates (\d+)", script).group(1))
    max_update = int(re.search(r"--max-update (\d+)", script).group(1))
    assert boundary == max_update // 10, (boundary, max_update)


@pytest.mark.slow  # the page followed end to end
def test_splits_follow_the_page(followed):
    text = followed["work"] / "text"
    for split, lines in expected_splits(followed["docs"]).items():
        got = (text / f"{split}.txt").read_bytes().decode("utf-8")
        assert got.splitlines() == lines, split
        assert "\r" not in got and "\t" not in got
    assert not (text / "one.txt").exists()
    ten = expected_splits({"ten": [str(i) for i in range(10)]})
    assert [len(ten[k]) for k in ("train", "valid", "test")] == [9, 0, 1]
    assert "(10 lines: 9 to train, 1 to test)" in PAGE.read_text()


@pytest.mark.slow  # the page followed end to end
def test_every_line_is_encoded(followed):
    work = followed["work"]
    assert (work / "spm" / "spm.model").exists()
    for split in ("train", "valid", "test"):
        text = (work / "text" / f"{split}.txt").read_text().splitlines()
        pieces = (work / "spm" / f"{split}.spm").read_text().splitlines()
        assert len(pieces) == len(text) and all(pieces), split
        # pieces spell the text again (sentencepiece's word-boundary mark is U+2581)
        assert "".join(pieces[0].split()).replace("\u2581", " ").strip() == text[0]
    data = work / "data-bin"
    for name in ["dict.txt", *(f"{s}.{e}" for s in ("train", "valid", "test") for e in ("bin", "idx"))]:
        assert (data / name).exists(), name


@pytest.mark.slow  # the page followed end to end
def test_training_crosses_the_boundary_and_saves(followed):
    work = followed["work"]
    log = (work / "train.log").read_text()
    updates = [int(u) for u in re.findall(r"\| train_inner \|.*num_updates=(\d+)", log)]
    stages = re.findall(r"\| train_inner \|.* stage=([0-9.]+),", log)
    assert updates and updates[-1] == MAX_UPDATE, updates
    assert float(stages[0]) == 1 and float(stages[-1]) == 2, stages
    assert "done training" in log
    ckpts = work / "checkpoints"
    assert (ckpts / "checkpoint_last.pt").exists() and (ckpts / "checkpoint_best.pt").exists()
    assert len(list(ckpts.glob("checkpoint_*_*.pt"))) == MAX_UPDATE // 30


def unigram_perplexity(train: Path, test: Path) -> float:
    """Perplexity of ``test``'s pieces and line ends under ``train``'s piece frequencies (add-one)."""
    counts = Counter(p for line in train.read_text().splitlines() for p in [*line.split(), "</s>"])
    total, types = sum(counts.values()), len(counts)
    test_pieces = [p for line in test.read_text().splitlines() for p in [*line.split(), "</s>"]]
    nll = -sum(math.log((counts[p] + 1) / (total + types)) for p in test_pieces)
    return math.exp(nll / len(test_pieces))


@pytest.mark.slow  # the page followed end to end
def test_eval_lm_perplexity(followed):
    work = followed["work"]
    log = (work / "eval_test.log").read_text()
    m = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+|inf|nan)", log)
    assert m, log[-3000:]
    loss, ppl = float(m.group(1)), float(m.group(2))
    assert math.isfinite(ppl) and ppl == pytest.approx(2**loss, rel=1e-3)
    # better than the uniform distribution over the pieces, and than train's piece frequencies: the model
    # has learnt the context
    pieces = len((work / "data-bin" / "dict.txt").read_text().splitlines())
    assert ppl < pieces, (ppl, pieces)
    assert ppl < 0.8 * unigram_perplexity(work / "spm" / "train.spm", work / "spm" / "test.spm"), ppl
    # the page's per-word formula counts T as the test split's pieces plus one end-of-line per line
    tokens = int(re.search(r"Evaluated ([0-9,]+) tokens", log).group(1).replace(",", ""))
    test_spm = (work / "spm" / "test.spm").read_text().splitlines()
    assert tokens == sum(len(line.split()) for line in test_spm) + len(test_spm)


@pytest.mark.slow  # the page followed end to end
def test_routing_summary(followed):
    work = followed["work"]
    summary = json.loads((work / "routing_summary.json").read_text())
    (layer,) = summary["layers"]
    assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
    assert layer["handover"] is not None, "a checkpoint after the boundary keeps the stage hand-over"


def test_sentencepiece_message_quoted_on_the_page(tmp_path):
    """The page quotes sentencepiece's refusal of a vocabulary the text cannot fill."""
    import sentencepiece as spm

    quoted = re.search(r"`(Vocabulary size too high \(8000\)\. Please set it to a value <= )N\.`", PAGE.read_text())
    assert quoted, "docs/own-data.md no longer quotes sentencepiece's message"
    (tmp_path / "t.txt").write_text("\n".join(markov_sentences(20, seed=1)) + "\n")
    with pytest.raises(RuntimeError) as err:
        spm.SentencePieceTrainer.train(
            input=str(tmp_path / "t.txt"),
            model_prefix=str(tmp_path / "m"),
            vocab_size=8000,
            model_type="unigram",
            character_coverage=1.0,
            minloglevel=2,
        )
    assert re.search(re.escape(quoted.group(1)) + r"\d+\.", str(err.value)), str(err.value)


@pytest.mark.slow  # the page followed end to end
def test_python_page_on_this_model(followed):
    """docs/python.md's code on the model and sentencepiece model this page trains (tests/test_python_use.py
    runs it on the shared word-level run)."""
    import sentencepiece as spm
    from fairseq import checkpoint_utils
    from test_python_use import CHECKPOINTS, DATA, PROMPT, SPM, TEXT, check_page_results, run_python_page

    work = followed["work"]
    text = (work / "text" / "train.txt").read_text().splitlines()[0]  # every piece of train is in dict.txt
    prompt = " ".join(text.split()[:2])
    ns = run_python_page(
        [
            (CHECKPOINTS, repr(str(work / "checkpoints"))),
            (DATA, repr(str(work / "data-bin"))),
            (SPM, repr(str(work / "spm" / "spm.model"))),
            (TEXT, f"text = {text!r}"),
            (PROMPT, f"prompt = {prompt!r}"),
        ]
    )
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(work / "checkpoints" / "checkpoint_last.pt")], arg_overrides={"data": str(work / "data-bin")}
    )
    d = task.source_dictionary
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm" / "spm.model"))
    text_ids, prompt_ids = ([d.index(p) for p in sp.encode(x, out_type=str)] for x in (text, prompt))
    check_page_results(ns, models[0].eval(), d, text_ids, prompt_ids)
