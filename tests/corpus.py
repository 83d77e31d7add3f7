"""Shared test helpers: a small synthetic corpus with Markov structure, binarised by fairseq."""

import os
import random
import socket
import sys
from pathlib import Path
from typing import Dict

import warm


def markov_lines(n: int, vocab: int, seed: int, prefix: str = "w", mult: int = 7, min_len: int = 6, max_len: int = 20):
    """``n`` sentences over ``vocab`` word types where each word mostly determines the next."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        w = rng.randrange(vocab)
        sent = []
        for _ in range(rng.randint(min_len, max_len)):
            sent.append(f"{prefix}{w}")
            w = (w * mult + rng.randint(0, 2)) % vocab
        lines.append(" ".join(sent))
    return lines


def binarise(tmp: Path, splits: Dict[str, list]) -> Path:
    """Write ``{split: lines}`` as text and run ``fairseq-preprocess --only-source``; returns the data dir."""
    for name, lines in splits.items():
        (tmp / f"{name}.txt").write_text("\n".join(lines) + "\n")
    args = [
        sys.executable,
        "-m",
        "fairseq_cli.preprocess",
        "--only-source",
        "--destdir",
        str(tmp / "bin"),
        "--workers",
        "1",
        "--trainpref",
        str(tmp / "train.txt"),
    ]
    for name in ("valid", "test"):
        if name in splits:
            args += [f"--{name}pref", str(tmp / f"{name}.txt")]
    out = warm.run(args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return tmp / "bin"


def markov_corpus(tmp: Path, n_train: int, n_valid: int, vocab: int, seed: int, **kwargs) -> Path:
    lines = markov_lines(n_train + n_valid, vocab, seed, **kwargs)
    return binarise(tmp, {"train": lines[:n_train], "valid": lines[n_train:]})


#: pytest-xdist worker gwK takes its ports from the K-th block of this range, below Linux's ephemeral ports
#: (32768 and up, where the kernel's own choices would collide with another worker's)
PORT_BLOCKS = range(12000, 32000, 2500)
_next_port = None


def free_port() -> int:
    """A port no other test of this run uses: free now, and in a block of ports of its xdist worker's own."""
    global _next_port
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = int(worker[2:]) % len(PORT_BLOCKS) if worker[2:].isdigit() else 0
    start = PORT_BLOCKS[block]
    if _next_port is None:
        _next_port = start + random.Random(os.getpid()).randrange(2000)
    for _ in range(2500):
        port, _next_port = _next_port, start + (_next_port + 1 - start) % 2500
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 2499}")


def run_checked(cmd, ok: bool = True, env=None, timeout: int = 300) -> str:
    """Run ``cmd`` (one thread per process); its output, after checking its exit status.

    The output is stdout, then stderr: captured apart, so that a warning or a log line on stderr never
    lands inside a line a tool prints on stdout (as it can when both go to one pipe from several processes).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    out = warm.run(cmd, env=env, timeout=timeout)
    text = out.stdout + ("\n" if out.stdout and not out.stdout.endswith("\n") else "") + out.stderr
    if ok:
        assert out.returncode == 0, text[-5000:]
    else:
        assert out.returncode != 0, text[-3000:]
    return text


def run_processes(target, world: int, *extra, timeout: float = 300) -> Dict[int, object]:
    """``target(rank, port, *extra, queue)`` on ``world`` spawned processes; ``{rank: what it put}``.

    Each process puts ``(rank, result)`` on the queue (a failing one its error's repr). A process stuck in
    a collective that another does not reach shows up as a timeout here.
    """
    ctx = warm.context()  # the fork server: torch already imported
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *extra, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=timeout) for _ in range(world))
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return got
