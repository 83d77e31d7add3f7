"""Bad input on the command line: a clear error that names the option and the fix, before any
training step (test_bad_input.py covers the option ranges and a mismatched dictionary)."""

import os
import sys
from pathlib import Path

import pytest
import warm
from corpus import free_port, markov_corpus

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_stablemoe")
TINY = [
    "--decoder-layers",
    "2",
    "--decoder-embed-dim",
    "16",
    "--decoder-ffn-embed-dim",
    "32",
    "--decoder-attention-heads",
    "2",
    "--tokens-per-sample",
    "16",
    "--max-tokens",
    "256",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return markov_corpus(tmp_path_factory.mktemp("cli_errors"), 300, 50, vocab=50, seed=2)


def train(data: Path, *extra, save=None):
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(data),
        "--user-dir",
        USER_DIR,
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        *TINY,
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--max-update",
        "2",
        "--cpu",
        "--log-format",
        "json",
        "--log-interval",
        "1",
        *extra,
    ]
    cmd += ["--save-dir", str(save)] if save else ["--no-save"]
    return warm.run(cmd)


def assert_refused(out, *needles):
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-2000:]
    assert '"num_updates": "1"' not in text, "refused only after a training step"
    for needle in needles:
        assert needle in text, (needle, text[-2000:])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--capacity-factor", "0"], ["--capacity-factor must be > 0 or unset"]),
        (["--moe-type", "topk"], ["--moe-type", "stablemoe", "switch", "base", "hash", "dense"]),
    ],
)
def test_bad_model_options(data, extra, needles):
    assert_refused(train(data, "--criterion", "stablemoe", *extra), *needles)


def test_criterion_that_ignores_the_auxiliary_losses(data):
    assert_refused(train(data, "--criterion", "cross_entropy", "--balance-factor", "0.3"), "--balance-factor")
    assert_refused(train(data, "--criterion", "cross_entropy"), "--criterion stablemoe")
    # the dense twin has no auxiliary loss: cross_entropy is fine there
    assert train(data, "--criterion", "cross_entropy", "--moe-type", "dense").returncode == 0


def two_procs(data: Path, *extra):
    """fairseq-train on 2 gloo processes with ``extra``: (exit codes, both outputs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = []
    for rank in range(2):
        cmd = [
            sys.executable,
            "-m",
            "fairseq_cli.train",
            str(data),
            "--user-dir",
            USER_DIR,
            "--task",
            "language_modeling",
            "--arch",
            "stablemoe_lm",
            *TINY,
            "--criterion",
            "stablemoe",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--max-update",
            "2",
            "--cpu",
            "--no-save",
            "--distributed-init-method",
            "env://",
            "--distributed-world-size",
            "2",
            "--distributed-rank",
            str(rank),
            "--distributed-no-spawn",
            "--device-id",
            "0",
            "--distributed-backend",
            "gloo",
            *extra,
        ]
        procs.append(warm.start(cmd, env=dict(env, RANK=str(rank)), merge=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def test_c10d_with_expert_parallelism_and_experts_not_divisible(data):
    codes, text = two_procs(data, "--ddp-backend", "c10d", "--num-experts", "4")
    assert all(c != 0 for c in codes) and "use --ddp-backend legacy_ddp" in text
    codes, text = two_procs(data, "--ddp-backend", "legacy_ddp", "--num-experts", "3")
    assert all(c != 0 for c in codes)
    assert "--num-experts 3 does not fit 2 data-parallel processes" in text


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--zero-sharding", "os"], ["--zero-sharding os would overwrite", "use --zero-sharding none"]),
        (["--use-bmuf"], ["--use-bmuf would overwrite the experts", "drop --use-bmuf"]),
    ],
    ids=["zero_sharding", "bmuf"],
)
def test_options_that_overwrite_the_experts_with_expert_parallelism(data, extra, needles):
    # without the check, both runs train (and end with exit code 0) with experts copied across processes
    codes, text = two_procs(data, "--ddp-backend", "legacy_ddp", "--num-experts", "4", *extra)
    assert all(c != 0 for c in codes), text[-2000:]
    assert '"num_updates": "1"' not in text, "refused only after a training step"
    for needle in needles:
        assert needle in text, (needle, text[-2000:])
