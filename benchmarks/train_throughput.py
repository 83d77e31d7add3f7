"""Training words per second of ``fairseq-train``: ``stablemoe_lm`` against its dense twin
(``--moe-type dense``: the same model with one FFN of the same sublayers in place of each
MoE layer, i.e. the same active parameters per token), same data, batch and updates.

Runs alternate (stablemoe, dense, stablemoe, dense, ...) so that a slow spell of the
machine hits both; each run's words/s is the median of fairseq's logged ``wps`` after the
first log interval (warm-up). Prints

    stablemoe_wps=<median> dense_wps=<median> ratio=<stablemoe/dense>

    python benchmarks/train_throughput.py [--data DATA_BIN] [--rounds 2] [--updates 60]

``--counts``: instead, StableMoE with its routing counts (exact distillation's statistics) against
the same run with ``--no-routing-counts``, the whole run in stage 1 (where the counting happens):

    counting_wps=<median> no_counting_wps=<median> ratio=<counting/no counting>

``--markdown FILE`` also writes the result as a table into FILE (see benchmarks/markdown.py).
"""

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from markdown import table, write_block  # noqa: E402


def synthetic_data(tmp: Path) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(20000):
        w = rng.randrange(2000)
        sent = []
        for _ in range(rng.randint(8, 40)):
            sent.append(f"w{w}")
            w = (w * 7 + rng.randint(0, 5)) % 2000
        lines.append(" ".join(sent))
    (tmp / "train.txt").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--only-source",
            "--trainpref",
            str(tmp / "train.txt"),
            "--validpref",
            str(tmp / "train.txt"),
            "--destdir",
            str(tmp / "bin"),
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    return tmp / "bin"


def run(data: Path, flags, opts, two_stage: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(data),
        "--user-dir",
        str(REPO / "fairseq_stablemoe"),
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        *flags,
        "--criterion",
        "stablemoe",
        "--num-experts",
        str(opts.experts),
        "--two-stage-updates",
        str(two_stage),
        "--tokens-per-sample",
        "128",
        "--sample-break-mode",
        "none",
        "--max-tokens",
        str(opts.max_tokens),
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--max-update",
        str(opts.updates),
        "--cpu",
        "--num-workers",
        "0",
        "--no-save",
        "--disable-validation",
        "--log-format",
        "json",
        "--log-interval",
        str(opts.log_interval),
        "--seed",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    wps = [
        float(json.loads(m.group(1))["wps"])
        for m in re.finditer(r"\| train_inner \| (\{.*\})", out.stdout + out.stderr)
    ]
    if len(wps) < 2:
        raise RuntimeError("too few log intervals: raise --updates")
    return statistics.median(wps[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="binarised LM data (default: a synthetic corpus)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the result as a table into FILE")
    parser.add_argument("--counts", action="store_true", help="routing counts on against off (see above)")
    opts = parser.parse_args()
    if opts.counts:
        variants = {"counting": ["--moe-type", "stablemoe"], "no_counting": ["--no-routing-counts"]}
        two_stage = opts.updates + 1  # stage 1 throughout
    else:
        variants = {"stablemoe": ["--moe-type", "stablemoe"], "dense": ["--moe-type", "dense"]}
        two_stage = opts.updates // 2
    with tempfile.TemporaryDirectory() as tmp:
        data = opts.data or synthetic_data(Path(tmp))
        results = {name: [] for name in variants}
        for _ in range(opts.rounds):
            for name, flags in variants.items():
                results[name].append(run(data, flags, opts, two_stage))
                print(f"# {name}: {results[name][-1]:.0f} words/s", flush=True)
    if opts.counts:
        c, n = statistics.median(results["counting"]), statistics.median(results["no_counting"])
        print(f"counting_wps={c:.0f} no_counting_wps={n:.0f} ratio={c / n:.3f}")
        if opts.markdown:
            header = (
                f"`fairseq-train --arch stablemoe_lm` ({opts.experts} experts, {opts.max_tokens} tokens per update, "
                f"{opts.updates} updates, all in stage 1) with the routing counts against `--no-routing-counts`, "
                f"{opts.rounds} alternating rounds; words/s: median of fairseq's logged `wps` after the first interval."
            )
            rows = [[f"{c:.0f}", f"{n:.0f}", f"{c / n:.3f}"]]
            write_block(
                opts.markdown,
                "train_throughput_counts",
                [header, "", *table(["counting words/s", "no counting words/s", "ratio"], rows)],
            )
        return
    s, d = statistics.median(results["stablemoe"]), statistics.median(results["dense"])
    print(f"stablemoe_wps={s:.0f} dense_wps={d:.0f} ratio={s / d:.3f}")
    if opts.markdown:
        header = (
            f"`fairseq-train --arch stablemoe_lm` ({opts.experts} experts, {opts.max_tokens} tokens per update, "
            f"{opts.updates} updates, stage 2 from update {opts.updates // 2}) against `--moe-type dense`, "
            f"{opts.rounds} alternating rounds, data: {'the given directory' if opts.data else 'a synthetic corpus'}; "
            "words/s: median of fairseq's logged `wps` after the first interval."
        )
        rows = [[f"{s:.0f}", f"{d:.0f}", f"{s / d:.3f}"]]
        write_block(
            opts.markdown,
            "train_throughput",
            [header, "", *table(["stablemoe words/s", "dense words/s", "ratio"], rows)],
        )


if __name__ == "__main__":
    main()
