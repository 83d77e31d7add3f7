"""Build a small parallel corpus offline: English lines and their Pig Latin.

Pig Latin is a deterministic, word-level rewrite (move the leading consonant
cluster to the end and add "ay"; vowel-initial words get "way"), so a
translation model can learn it exactly, yet it needs real sequence modelling:
every word changes and new subwords appear. The source side is real text
(Shakespeare, from ``scripts/demo.sh``'s data preparation).

    python make_pig_latin.py TEXT_DIR OUT_DIR [--max-words 30] [--max-lines 40000]
"""

import argparse
import re
from pathlib import Path

VOWELS = set("aeiouAEIOU")
WORD = re.compile(r"[A-Za-z]+|[^A-Za-z\s]")


def pig_latin_word(word: str) -> str:
    if not word[0].isalpha():
        return word
    lower = word.lower()
    if lower[0] in VOWELS:
        out = lower + "way"
    else:
        i = 0
        while i < len(lower) and lower[i] not in VOWELS and not (i > 0 and lower[i] == "y"):
            i += 1
        out = lower[i:] + lower[:i] + "ay"
    return out.capitalize() if word[0].isupper() else out


def tokenize(line: str) -> list:
    return WORD.findall(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text_dir", type=Path, help="directory with train.txt, valid.txt, test.txt")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-words", type=int, default=30, help="skip longer lines")
    parser.add_argument("--max-lines", type=int, default=40000, help="lines per split at most")
    opts = parser.parse_args()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        src_lines, tgt_lines = [], []
        for line in (opts.text_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            words = tokenize(line)
            if not 3 <= len(words) <= opts.max_words:
                continue
            src_lines.append(" ".join(words))
            tgt_lines.append(" ".join(pig_latin_word(w) for w in words))
            if len(src_lines) >= opts.max_lines:
                break
        (opts.out_dir / f"{split}.en").write_text("\n".join(src_lines) + "\n", encoding="utf-8")
        (opts.out_dir / f"{split}.pig").write_text("\n".join(tgt_lines) + "\n", encoding="utf-8")
        print(f"{split}: {len(src_lines)} sentence pairs")


if __name__ == "__main__":
    main()
