"""Shared fixtures of the end-to-end tests: a synthetic Markov corpus binarised by
fairseq-preprocess, a helper that runs fairseq's commands in a subprocess, and one small
two-stage training run whose checkpoints several test modules reuse.

The corpus is a first-order Markov chain over ``VOCAB`` word types: every word has
``len(SUCCESSOR_PROBS)`` possible successors with fixed probabilities, so a language model
can learn it and its true entropy rate is known (:func:`chain_entropy_nats`).
"""

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import warm
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_stablemoe")

# Every Python process the tests start (fairseq's tools, torchrun's and multiprocessing's workers)
# runs under the device guard (tests/device_guard.py): a collective handed a tensor that the plugin
# made on the host fails, as it would under NCCL. STABLEMOE_DEVICE_GUARD=0 turns it off.
os.environ.setdefault("STABLEMOE_DEVICE_GUARD", "1")
GUARD_SITE = str(REPO / "tests" / "guard_site")
if GUARD_SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (GUARD_SITE, os.environ.get("PYTHONPATH")) if p)

VOCAB = 200
SUCCESSOR_PROBS = (0.6, 0.25, 0.1, 0.05)
CORPUS_SEED = 1234

#: tiny model: every fairseq-train run takes seconds on a CPU
TINY_MODEL = [
    "--decoder-layers",
    "2",
    "--decoder-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "64",
    "--decoder-attention-heads",
    "2",
    "--num-experts",
    "4",
    "--distill-dim",
    "16",
    "--tokens-per-sample",
    "32",
    "--max-tokens",
    "512",
]

#: the stage boundary and length of the shared training run
BOUNDARY = 30
MAX_UPDATE = 120
SAVE_EVERY = 15


def successors(vocab: int = VOCAB, seed: int = CORPUS_SEED) -> Dict[int, List[int]]:
    """The fixed successor list of every word (distinct words, in probability order)."""
    rng = random.Random(seed)
    return {w: rng.sample(range(vocab), len(SUCCESSOR_PROBS)) for w in range(vocab)}


def markov_sentences(
    n: int, seed: int, vocab: int = VOCAB, prefix: str = "w", min_len: int = 4, max_len: int = 12
) -> List[str]:
    """``n`` sentences of the chain: uniform first word, then successors by ``SUCCESSOR_PROBS``."""
    succ = successors(vocab)
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        w = rng.randrange(vocab)
        words = [w]
        for _ in range(rng.randint(min_len, max_len) - 1):
            w = rng.choices(succ[w], weights=SUCCESSOR_PROBS)[0]
            words.append(w)
        lines.append(" ".join(f"{prefix}{x}" for x in words))
    return lines


def chain_entropy_nats() -> float:
    """Entropy of one transition of the chain (nats): a lower bound on what a model can reach
    for a word that follows another word of the same sentence."""
    return -sum(p * math.log(p) for p in SUCCESSOR_PROBS)


# ----------------------------------------------------------------------------- subprocesses


def run_cli(
    module: str, *args: str, check: bool = True, stdin: Optional[str] = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m fairseq_cli.<module> ARGS`` with this interpreter.

    ``check``: fail the test, showing the captured output, on a non-zero exit.
    Returns the completed process (``stdout``/``stderr`` as text).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", f"fairseq_cli.{module}", *[str(a) for a in args]]
    out = warm.run(cmd, cwd=str(REPO), env=env, input=stdin, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)}\nexited with {out.returncode}\n--- stdout (tail) ---\n{out.stdout[-4000:]}"
            f"\n--- stderr (tail) ---\n{out.stderr[-6000:]}",
            pytrace=False,
        )
    return out


def preprocess(workdir: Path, splits: Dict[str, Sequence[str]], destdir: Path) -> Path:
    """Write ``{split: lines}`` as text and binarise them with ``fairseq-preprocess --only-source``."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--only-source", "--destdir", str(destdir), "--workers", "1"]
    for split, lines in splits.items():
        path = workdir / f"{split}.txt"
        path.write_text("\n".join(lines) + "\n")
        args += [f"--{split}pref", str(path)]
    run_cli("preprocess", *args)
    return destdir


def train_inner_records(text: str) -> List[dict]:
    """The ``train_inner`` records of a ``--log-format json`` fairseq-train log, in order."""
    return [json.loads(m.group(1)) for m in re.finditer(r"\| train_inner \| (\{.*\})", text)]


def train_args(data: Path, save_dir: Path, *extra: str) -> List[str]:
    """fairseq-train arguments of the shared run's recipe (Adam with weight decay)."""
    return [
        str(data),
        "--user-dir",
        USER_DIR,
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        "--criterion",
        "stablemoe",
        *TINY_MODEL,
        "--two-stage-updates",
        str(BOUNDARY),
        "--optimizer",
        "adam",
        "--lr",
        "0.005",
        "--weight-decay",
        "0.01",
        "--clip-norm",
        "1.0",
        "--cpu",
        "--seed",
        "3",
        "--num-workers",
        "0",
        "--save-dir",
        str(save_dir),
        "--save-interval-updates",
        str(SAVE_EVERY),
        "--keep-interval-updates",
        "-1",
        "--no-epoch-checkpoints",
        "--log-format",
        "json",
        "--log-interval",
        "1",
        *extra,
    ]


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Corpus:
    data_dir: Path  # binarised: dict.txt, train/valid/test .bin/.idx
    text_dir: Path
    vocab: int  # word types of the chain
    dict_size: int  # the language model's vocabulary: word types + 4 specials, padded to a multiple of 8


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``DIR/name``, made by ``build(DIR/name)`` once per test run, whichever pytest-xdist worker asks first.

    ``DIR`` is the run's base temporary folder, which every worker of the run shares (a file lock
    orders them); a later run builds afresh.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)  # a build that failed part-way
            target.mkdir()
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def markov_data(tmp_path_factory) -> Corpus:
    def build(tmp: Path) -> None:
        lines = markov_sentences(3400, seed=CORPUS_SEED)
        splits = {"train": lines[:3000], "valid": lines[3000:3200], "test": lines[3200:]}
        preprocess(tmp / "text", splits, tmp / "bin")

    tmp = built_once(tmp_path_factory, "markov_corpus", build)
    data = tmp / "bin"
    from fairseq.data import Dictionary

    dictionary = Dictionary.load(str(data / "dict.txt"))
    dictionary.pad_to_multiple_(8)  # as fairseq's language_modeling task does
    words = [s for s in dictionary.symbols if re.fullmatch(r"w\d+", s)]
    assert len(words) == VOCAB, "every word type should occur in train"
    return Corpus(data_dir=data, text_dir=tmp / "text", vocab=VOCAB, dict_size=len(dictionary))


@dataclass
class TrainedRun:
    corpus: Corpus
    save_dir: Path
    log: str  # stdout + stderr of fairseq-train
    checkpoints: Dict[int, Path] = field(default_factory=dict)  # update count -> interval checkpoint


@pytest.fixture(scope="session")
def trained_run(markov_data, tmp_path_factory) -> TrainedRun:
    """fairseq-train across the stage boundary: updates 1..BOUNDARY in stage 1, the rest in
    stage 2, an interval checkpoint every SAVE_EVERY updates."""

    def build(tmp: Path) -> None:
        out = run_cli("train", *train_args(markov_data.data_dir, tmp / "ckpt", "--max-update", str(MAX_UPDATE)))
        (tmp / "train.log").write_text(out.stdout + out.stderr)

    tmp = built_once(tmp_path_factory, "trained_run", build)
    save = tmp / "ckpt"
    ckpts = {}
    for p in save.glob("checkpoint_*_*.pt"):
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", p.name)
        if m:
            ckpts[int(m.group(1))] = p
    return TrainedRun(corpus=markov_data, save_dir=save, log=(tmp / "train.log").read_text(), checkpoints=ckpts)
