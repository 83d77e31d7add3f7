"""Benchmark tables written into a markdown page (``--markdown FILE``).

A benchmark writes its table as a block delimited by ``<!-- begin: KEY -->`` and
``<!-- end: KEY -->``: the block of the same key in ``FILE`` is replaced, or the block is
appended when ``FILE`` has none (``FILE`` is created if missing). The first line of a block
is the command that wrote it, so the page says how to regenerate each table.
"""

import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """The running command, with the script's path relative to the repository: ``python benchmarks/x.py ...``."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list:
    """A markdown table's lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def write_block(path: Path, key: str, lines: Sequence[str]) -> None:
    """Write ``lines`` (after a line with the command that ran) as block ``key`` of the page ``path``."""
    path = Path(path)
    begin, end = f"<!-- begin: {key} -->", f"<!-- end: {key} -->"
    block = "\n".join([begin, f"`{command_line()}`", "", *lines, end])
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
    print(f"# table {key!r} written to {path}", flush=True)
