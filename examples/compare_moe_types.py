"""Train StableMoE and its baselines with the same budget, evaluate them, measure
routing fluctuation, and write ``docs/results.md`` with plots.

Every type gets the same data, model size, experts, MoE placement, updates,
learning-rate schedule and seeds; only ``--moe-type`` differs.

    python examples/compare_moe_types.py --data runs/shakespeare/data-bin --work runs/compare \\
        --out docs/results.md --max-update 1200 --seeds 1

(the data directory is the one ``scripts/demo.sh`` builds.)
"""

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
TYPES = ["stablemoe", "switch", "base", "hash", "dense"]


def model_flags(opts) -> List[str]:
    return [
        "--task", "language_modeling", "--arch", "stablemoe_lm", "--criterion", "stablemoe",
        "--decoder-layers", str(opts.layers), "--decoder-embed-dim", str(opts.dim),
        "--decoder-ffn-embed-dim", str(opts.ffn), "--decoder-attention-heads", str(opts.heads),
        "--num-experts", str(opts.experts), "--moe-layers", str(opts.moe_layers),
        "--tokens-per-sample", str(opts.tokens_per_sample), "--sample-break-mode", "none",
    ]


def train(opts, moe_type: str, seed: int, save_dir: Path) -> Dict[str, object]:
    """One fairseq-train run; returns its log records and wall time."""
    interval = max(1, opts.max_update // opts.checkpoints)
    cmd = [
        sys.executable, "-m", "fairseq_cli.train", str(opts.data), "--user-dir", str(REPO / "fairseq_stablemoe"),
        *model_flags(opts), "--moe-type", moe_type,
        "--two-stage-updates", str(int(opts.max_update * opts.stage1_fraction)),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(opts.lr), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(opts.warmup), "--warmup-init-lr", "1e-07", "--weight-decay", "0.01",
        "--clip-norm", "0.5", "--dropout", "0.1", "--max-tokens", str(opts.max_tokens),
        "--max-update", str(opts.max_update), "--seed", str(seed), "--cpu", "--num-workers", "0",
        "--save-dir", str(save_dir), "--save-interval-updates", str(interval), "--keep-interval-updates", "-1",
        "--validate-interval-updates", str(interval), "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", str(max(1, interval // 2)),
    ]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"training {moe_type} failed:\n{out.stderr[-3000:]}")
    records = []
    for line in (out.stdout + out.stderr).splitlines():
        m = re.search(r"\| (train_inner|valid|train) \| (\{.*\})$", line)
        if m:
            records.append((m.group(1), json.loads(m.group(2))))
    return {"records": records, "seconds": time.time() - start, "command": " ".join(cmd)}


def eval_lm(opts, checkpoint: Path, split: str) -> float:
    cmd = [
        sys.executable, "-m", "fairseq_cli.eval_lm", str(opts.data), "--user-dir", str(REPO / "fairseq_stablemoe"),
        "--path", str(checkpoint), "--gen-subset", split, "--cpu", "--max-tokens", "4096",
        "--tokens-per-sample", str(opts.tokens_per_sample), "--sample-break-mode", "none",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Perplexity: ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"eval-lm failed on {checkpoint}:\n{out.stderr[-3000:]}")
    return float(m.group(1))


def param_counts(checkpoint: Path) -> Dict[str, int]:
    """Total parameters, and active ones per token (shared + one expert per MoE layer)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    total = expert = 0
    experts_per_layer: Dict[str, set] = {}
    for key, value in state.items():
        if not torch.is_floating_point(value) or "snapshot" in key:
            continue
        total += value.numel()
        m = re.search(r"^(.*\.experts)\.(\d+)\.", key)
        if m:
            expert += value.numel()
            experts_per_layer.setdefault(m.group(1), set()).add(m.group(2))
    n = max((len(v) for v in experts_per_layer.values()), default=1)
    return {"total": total, "active": total - expert + expert // n}


def fluctuation(opts, checkpoints: Sequence[Path], out_json: Path) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "fairseq_stablemoe.fluctuation", str(opts.data), *map(str, checkpoints),
           "--split", "valid", "--json", str(out_json), "--cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fluctuation failed:\n{out.stderr[-3000:]}")
    return json.loads(out_json.read_text())


def run_one(opts, moe_type: str, seed: int) -> Dict[str, object]:
    save_dir = opts.work / f"{moe_type}-seed{seed}"
    done = save_dir / "result.json"
    config = {k: str(v) for k, v in sorted(vars(opts).items()) if k not in ("out", "fresh", "types", "seeds", "work")}
    cached = json.loads(done.read_text()) if done.exists() and not opts.fresh else None
    if cached is not None and cached.get("config") == config:
        print(f"[compare] {moe_type} seed {seed}: reusing {done} (--fresh retrains)", flush=True)
        return cached
    if save_dir.exists():
        # an interrupted run: start it over rather than resume with another budget
        shutil.rmtree(save_dir)
    log = train(opts, moe_type, seed, save_dir)
    final = save_dir / "checkpoint_last.pt"
    interval_ckpts = sorted(save_dir.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    wps = [r["wps"] for kind, r in log["records"] if kind == "train_inner" and "wps" in r]
    valid_curve = [(int(r["valid_num_updates"]), float(r["valid_ppl"])) for kind, r in log["records"] if kind == "valid"]
    result: Dict[str, object] = {
        "moe_type": moe_type,
        "seed": seed,
        "valid_ppl": eval_lm(opts, final, "valid"),
        "test_ppl": eval_lm(opts, final, "test"),
        "params": param_counts(final),
        "train_wps": statistics.median(float(w) for w in wps) if wps else float("nan"),
        "train_seconds": log["seconds"],
        "valid_curve": valid_curve,
    }
    if moe_type != "dense" and len(interval_ckpts) >= 2:
        fl = fluctuation(opts, interval_ckpts, save_dir / "fluctuation.json")
        result["fluctuation"] = [(p["to_update"], p["ratio"]) for p in fl["pairs"]]
        result["final_fluctuation"] = fl["final_pair_ratio"]
        result["late_share"] = fl["share_last_fluctuation_after_20pct"]
    result["config"] = config
    done.write_text(json.dumps(result))
    print(f"[compare] {moe_type} seed {seed}: valid ppl {result['valid_ppl']:.2f}, test ppl {result['test_ppl']:.2f}, "
          f"{result['train_seconds']:.0f}s", flush=True)
    return result


def _mean_spread(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_report(opts, results: List[Dict[str, object]], argv: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    ppl_png, fl_png = out.with_name(out.stem + "_valid_ppl.png"), out.with_name(out.stem + "_fluctuation.png")
    rows = []
    fig1, ax1 = plt.subplots(figsize=(6, 4))
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for moe_type in opts.types:
        runs = [r for r in results if r["moe_type"] == moe_type]
        if not runs:
            continue
        p = runs[0]["params"]
        fl = [r.get("final_fluctuation") for r in runs]
        late = [r.get("late_share") for r in runs]
        rows.append(
            f"| {moe_type} | {_mean_spread([r['valid_ppl'] for r in runs])} | {_mean_spread([r['test_ppl'] for r in runs])} "
            f"| {p['total'] / 1e6:.2f}M | {p['active'] / 1e6:.2f}M | {_mean_spread([r['train_wps'] for r in runs])} "
            f"| {'n/a' if fl[0] is None else _mean_spread([100 * x for x in fl]) + '%'} "
            f"| {'n/a' if late[0] is None else _mean_spread([100 * x for x in late]) + '%'} |"
        )
        curve = runs[0]["valid_curve"]
        if curve:
            ax1.plot([u for u, _ in curve], [v for _, v in curve], marker=".", label=moe_type)
        if runs[0].get("fluctuation"):
            ax2.plot([u for u, _ in runs[0]["fluctuation"]], [100 * x for _, x in runs[0]["fluctuation"]], marker=".", label=moe_type)
    ax1.set_xlabel("update"), ax1.set_ylabel("validation perplexity"), ax1.set_yscale("log"), ax1.legend()
    ax2.set_xlabel("update"), ax2.set_ylabel("tokens whose expert changed since the previous checkpoint (%)"), ax2.legend()
    if opts.stage1_fraction > 0:
        ax2.axvline(int(opts.max_update * opts.stage1_fraction), color="grey", linestyle=":", label="StableMoE stage 2")
    for fig, path in ((fig1, ppl_png), (fig2, fl_png)):
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    seeds = sorted({r["seed"] for r in results})
    text = [
        "# StableMoE against its baselines at small scale",
        "",
        f"Generated by `python examples/compare_moe_types.py {' '.join(argv)}` on {time.strftime('%Y-%m-%d')} "
        f"(2 CPU cores; seeds {seeds}; mean ± standard deviation over seeds where there are several).",
        "",
        f"Model: {opts.layers} dense decoder layers, d={opts.dim}, FFN {opts.ffn}, {opts.heads} heads, "
        f"{opts.moe_layers} MoE layer(s) of {opts.experts} experts; {opts.max_update} updates of {opts.max_tokens} tokens, "
        f"StableMoE stage 2 from update {int(opts.max_update * opts.stage1_fraction)}. Perplexities from `fairseq-eval-lm` "
        "on the last checkpoint (inference routing: StableMoE's distilled router). Fluctuation: share of validation "
        "tokens whose expert (with the routing training used at that update) changed between the last two checkpoints; "
        "'late' is the share of tokens whose last fluctuation is past 20% of training (paper, Figure 2).",
        "",
        "| type | valid ppl | test ppl | params | active params | train words/s | final fluctuation | late (>20%) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"![validation perplexity]({ppl_png.name})",
        "",
        f"![fluctuation]({fl_png.name})",
        "",
    ]
    out.write_text("\n".join(text))
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=2))


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "runs/shakespeare/data-bin")
    parser.add_argument("--work", type=Path, default=REPO / "runs/compare")
    parser.add_argument("--out", type=Path, default=REPO / "docs/results.md")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--max-update", type=int, default=1200)
    parser.add_argument("--stage1-fraction", type=float, default=0.25, help="StableMoE's --two-stage-updates / --max-update")
    parser.add_argument("--checkpoints", type=int, default=12, help="interval checkpoints per run (fluctuation points)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--moe-layers", type=int, default=1)
    parser.add_argument("--tokens-per-sample", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every run (default: reuse a run's result.json from an earlier, identical study)")
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parser.parse_args(argv)
    opts.types = [t.strip() for t in opts.types.split(",") if t.strip()]
    unknown = [t for t in opts.types if t not in TYPES]
    if unknown:
        parser.error(f"unknown --types {unknown}: choose from {TYPES}")
    if not (opts.data / "dict.txt").exists():
        parser.error(f"{opts.data} has no dict.txt: build the data with scripts/demo.sh first (or pass --data)")
    opts.work.mkdir(parents=True, exist_ok=True)
    results = [run_one(opts, t, int(s)) for s in opts.seeds.split(",") for t in opts.types]
    write_report(opts, results, argv)
    print(opts.out.read_text())


if __name__ == "__main__":
    main()
