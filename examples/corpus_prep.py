"""The steps the example corpora share: split documents into train/valid/test, train and apply a
sentencepiece model, binarise with ``fairseq-preprocess --only-source``.

``prepare(work, documents)`` runs them; every step is skipped when its output exists. Each corpus's own
script (``examples/shakespeare/prepare.py``, ``examples/sotu/prepare.py``) downloads and cleans its
text and hands the documents over: ``{name: [line, ...]}``, one sentence or verse line a line.
"""

import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

#: pieces of the unigram sentencepiece model trained on each corpus's train split
VOCAB = 4000
#: every document is split by contiguous blocks of lines: its first 90% to train, 5% to valid, 5% to test
SPLITS = (("train", 0.90), ("valid", 0.05), ("test", 0.05))


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def split_text(documents: Dict[str, List[str]], out: Path) -> None:
    if all((out / f"{name}.txt").exists() for name, _ in SPLITS):
        return
    out.mkdir(parents=True, exist_ok=True)
    parts: Dict[str, List[str]] = {name: [] for name, _ in SPLITS}
    for lines in documents.values():
        n, start = len(lines), 0
        for i, (name, share) in enumerate(SPLITS):
            stop = n if i == len(SPLITS) - 1 else start + int(round(share * n))
            parts[name].extend(lines[start:stop])
            start = stop
    for name, lines in parts.items():
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        log(f"{name}: {len(lines)} lines, {sum(len(line.split()) for line in lines)} words")


def sentencepiece(text: Path, out: Path) -> None:
    import sentencepiece as spm

    model = out / "spm.model"
    if not model.exists():
        log(f"training a {VOCAB}-piece unigram sentencepiece model on train")
        out.mkdir(parents=True, exist_ok=True)
        spm.SentencePieceTrainer.train(
            input=str(text / "train.txt"),
            model_prefix=str(out / "spm"),
            vocab_size=VOCAB,
            model_type="unigram",
            character_coverage=1.0,
            num_threads=2,
            minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for name, _ in SPLITS:
        dest = out / f"{name}.spm"
        if not dest.exists():
            lines = (text / f"{name}.txt").read_text(encoding="utf-8").splitlines()
            dest.write_text("\n".join(" ".join(p) for p in sp.encode(lines, out_type=str)) + "\n", encoding="utf-8")


def binarise(spm_dir: Path, out: Path) -> None:
    if (out / "dict.txt").exists():
        return
    log("binarising with fairseq-preprocess")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--only-source",
            "--trainpref",
            str(spm_dir / "train.spm"),
            "--validpref",
            str(spm_dir / "valid.spm"),
            "--testpref",
            str(spm_dir / "test.spm"),
            "--destdir",
            str(out),
            "--workers",
            "2",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def prepare(work: Path, documents: Callable[[], Dict[str, List[str]]]) -> Path:
    """``work/text``, ``work/spm`` and ``work/data-bin`` from ``documents()`` (called only when the split
    text is missing); returns the binarised data folder."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "text" / "train.txt").exists():
        split_text(documents(), work / "text")
    sentencepiece(work / "text", work / "spm")
    binarise(work / "spm", work / "data-bin")
    log(f"data ready in {work / 'data-bin'}")
    return work / "data-bin"
