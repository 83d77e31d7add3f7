"""The paper's experiments at a scale that fits a CPU: StableMoE against its baselines over
several seeds, its ablations, and a training-length sweep; writes a report with plots and one
JSON record per run.

Every run gets the same data, model size, experts, updates, learning-rate schedule and seed list;
a run differs from the main comparison only in what its study varies. Finished runs are reused
(their ``result.json`` records the configuration), interrupted ones resume from their last
checkpoint, so a long study can be stopped and continued: run the same command again.

    python examples/compare_moe_types.py --data runs/shakespeare/data-bin --work runs/study \
        --out docs/study_results.md --study main --seeds 1,2,3 --max-update 3000 --stage1-fraction 0.1

``--study``: ``main`` (every ``--types`` x ``--seeds``), ``ablations`` (StableMoE variants: the
paper's Tables 4, 5 and 6), ``length`` (every type at each of ``--lengths``), ``long`` (every
``--long-types`` x ``--long-seeds`` at ``--long-update`` updates), or several, comma-separated. The
data directory is the one ``examples/shakespeare/prepare.py`` builds.

Types: the ``--moe-type`` values, and ``stablemoe-refit`` (StableMoE with ``--distill-refit``:
exact distillation). A StableMoE run of the main and long studies also saves the checkpoint of
its stage boundary (training stops there once and resumes), from which the record keeps the
hand-over: the frozen routing's agreement with the backbone's majority routing, its ceiling, and
the share of validation tokens whose expert changes across the boundary.
"""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TYPES = ["stablemoe", "stablemoe-refit", "switch", "base", "hash", "dense"]
#: a type's extra fairseq-train flags (the others are --moe-type values)
TYPE_FLAGS = {"stablemoe-refit": ("--distill-refit",)}
STUDIES = ["main", "ablations", "length", "long"]


def moe_type_of(label: str) -> str:
    return "stablemoe" if label.startswith("stablemoe") else label


class Run(NamedTuple):
    """One training run of a study."""

    label: str  # e.g. "stablemoe", "placement-bottom"
    moe_type: str
    seed: int
    max_update: int
    stage1_fraction: float
    flags: tuple = ()  # extra fairseq-train flags
    study: str = "main"

    @property
    def name(self) -> str:
        frac = f"-s1{int(round(100 * self.stage1_fraction))}" if self.moe_type == "stablemoe" else ""
        return f"{self.label}-u{self.max_update}{frac}-seed{self.seed}"


def ablation_runs(opts, seed: int) -> List[Run]:
    """StableMoE variants (the paper's Tables 4, 5, 6), at ``--ablation-update`` updates."""
    U, f, L = opts.ablation_update, opts.stage1_fraction, opts.layers
    scattered = ",".join(str((k * L) // 4) for k in (1, 2, 3))
    mk = lambda label, frac=f, flags=(), moe_type="stablemoe": Run(  # noqa: E731
        label, moe_type, seed, U, frac, tuple(flags), "ablations"
    )
    return [
        mk("stablemoe"),  # the reference: middle placement, wordemb, greedy, stage 1 at --stage1-fraction
        mk("base", moe_type="base"),
        # Table 4: placement of 3 MoE sublayers: stacked in one MoE layer after the middle block, before
        # the first block, after the last; or scattered as 3 MoE layers of 1 sublayer after L/4, 2L/4, 3L/4
        mk("placement-middle", flags=("--moe-sublayers", "3")),
        mk("placement-bottom", flags=("--moe-layer-positions", "0", "--moe-sublayers", "3")),
        mk("placement-top", flags=("--moe-layer-positions", str(L), "--moe-sublayers", "3")),
        mk("placement-scattered", flags=("--moe-layer-positions", scattered, "--moe-sublayers", "1")),
        # Table 5: fixed routing on BASE layers; StableMoE with stage 1 only (never frozen in training)
        mk("base-fixed-routing", flags=("--stage1-assignment", "balanced", "--balance-factor", "0")),
        mk("stage1-only", frac=1.0),
        # Table 6: stage-1 share and distilled-router architecture
        mk("stage1-25pct", frac=0.25),
        mk("stage1-50pct", frac=0.5),
        mk("router-cnn", flags=("--distill-router", "cnn")),
        mk("router-transformer1", flags=("--distill-router", "transformer", "--distill-router-layers", "1")),
        mk("router-transformer2", flags=("--distill-router", "transformer", "--distill-router-layers", "2")),
    ]


def plan(opts) -> List[Run]:
    runs: List[Run] = []
    for study in opts.study:
        if study in ("main", "long"):
            types, seeds, U = (
                (opts.types, opts.seeds, opts.max_update)
                if study == "main"
                else (opts.long_types, opts.long_seeds, opts.long_update)
            )
            runs += [
                Run(t, moe_type_of(t), s, U, opts.stage1_fraction, TYPE_FLAGS.get(t, ()), study)
                for s in seeds
                for t in types
            ]
        elif study == "ablations":
            for s in opts.ablation_seeds:
                runs += ablation_runs(opts, s)
        elif study == "length" and "stablemoe" in opts.types:
            # only StableMoE depends on the run's length (its boundary is a share of it): the other
            # types' schedules do not, so their first u updates of a longer run are a u-update run
            # (deterministic on CPU), and the sweep reads them from the main comparison's curves
            runs += [
                Run("stablemoe", "stablemoe", s, u, opts.stage1_fraction, (), "length")
                for u in opts.lengths
                for s in opts.length_seeds
            ]
    unique: Dict[str, Run] = {}
    for r in runs:
        unique.setdefault(r.name, r)  # the same run in two studies trains once
    return list(unique.values())


def model_flags(opts) -> List[str]:
    return [
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        "--criterion",
        "stablemoe",
        "--decoder-layers",
        str(opts.layers),
        "--decoder-embed-dim",
        str(opts.dim),
        "--decoder-ffn-embed-dim",
        str(opts.ffn),
        "--decoder-attention-heads",
        str(opts.heads),
        "--num-experts",
        str(opts.experts),
        "--moe-sublayers",
        str(opts.sublayers),
        "--tokens-per-sample",
        str(opts.tokens_per_sample),
        "--sample-break-mode",
        "none",
        "--decoder-learned-pos",
        "--share-decoder-input-output-embed",
    ]


def train_command(opts, run: Run, save_dir: Path) -> List[str]:
    interval = max(1, run.max_update // opts.checkpoints)
    return [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(opts.data),
        "--user-dir",
        str(REPO / "fairseq_stablemoe"),
        *model_flags(opts),
        "--moe-type",
        run.moe_type,
        "--two-stage-updates",
        str(int(round(run.max_update * run.stage1_fraction))),
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
        "--lr",
        str(opts.lr),
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        str(opts.warmup),
        "--warmup-init-lr",
        "1e-07",
        "--weight-decay",
        "0.01",
        "--clip-norm",
        str(opts.clip_norm),
        "--dropout",
        str(opts.dropout),
        "--max-tokens",
        str(opts.max_tokens),
        "--max-update",
        str(run.max_update),
        "--seed",
        str(run.seed),
        "--cpu",
        "--num-workers",
        "0",
        "--save-dir",
        str(save_dir),
        "--save-interval-updates",
        str(interval),
        "--keep-interval-updates",
        "-1",
        "--validate-interval-updates",
        str(interval),
        "--no-epoch-checkpoints",
        "--log-format",
        "json",
        "--log-interval",
        str(max(1, interval // 2)),
        *run.flags,
    ]


def boundary_of(run: Run) -> int:
    return int(round(run.max_update * run.stage1_fraction))


def keeps_boundary(run: Run) -> bool:
    """Whether the run saves its stage boundary's checkpoint (StableMoE in the main and long studies)."""
    return run.moe_type == "stablemoe" and run.study in ("main", "long") and 0 < boundary_of(run) < run.max_update


BOUNDARY_CHECKPOINT = "checkpoint_boundary.pt"


def train(opts, run: Run, save_dir: Path) -> float:
    """fairseq-train for one run (resuming from ``save_dir/checkpoint_last.pt`` if there);
    appends its log to ``save_dir/train.log`` and returns this session's seconds.

    With :func:`keeps_boundary`, training first stops at the boundary (fairseq saves the frozen
    model there), keeps that checkpoint, and resumes (exactly: fairseq restores the data
    iterator, optimizer and schedule, and seeds every update from the seed and update count)."""
    start = time.time()
    boundary = save_dir / BOUNDARY_CHECKPOINT
    if keeps_boundary(run) and not boundary.exists():
        _train_to(opts, run, save_dir, boundary_of(run))
        shutil.copyfile(save_dir / "checkpoint_last.pt", boundary)
    _train_to(opts, run, save_dir, run.max_update)
    return time.time() - start


def _train_to(opts, run: Run, save_dir: Path, max_update: int) -> None:
    cmd = train_command(opts, run, save_dir)
    cmd[cmd.index("--max-update") + 1] = str(max_update)
    with open(save_dir / "train.log", "a") as log:
        log.write(f"# session {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        log.flush()
        out = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        tail = (save_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {run.name} failed (log: {save_dir / 'train.log'}):\n{tail}")


def log_records(save_dir: Path) -> List[tuple]:
    """``(kind, record)`` of every json log line of every session, a resumed session's repeats dropped."""
    records: Dict[tuple, dict] = {}
    for line in (save_dir / "train.log").read_text().splitlines():
        m = re.search(r"\| (train_inner|valid|train) \| (\{.*\})$", line)
        if m:
            rec = json.loads(m.group(2))
            step = rec.get("num_updates", rec.get("valid_num_updates", rec.get("train_num_updates")))
            records[(m.group(1), str(step))] = rec
    return list(((k, r) for (k, _), r in records.items()))


def eval_lm(opts, checkpoint: Path, split: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.eval_lm",
        str(opts.data),
        "--user-dir",
        str(REPO / "fairseq_stablemoe"),
        "--path",
        str(checkpoint),
        "--gen-subset",
        split,
        "--cpu",
        "--max-tokens",
        "4096",
        "--tokens-per-sample",
        str(opts.tokens_per_sample),
        "--sample-break-mode",
        "none",
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
    cmd = [
        sys.executable,
        "-m",
        "fairseq_stablemoe.cli.fluctuation",
        str(opts.data),
        *map(str, checkpoints),
        "--split",
        "valid",
        "--json",
        str(out_json),
        "--cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fluctuation failed:\n{out.stderr[-3000:]}")
    return json.loads(out_json.read_text())


#: the options every run of a study shares (a run is reused only if they all match)
SHARED = (
    "data",
    "layers",
    "dim",
    "ffn",
    "heads",
    "experts",
    "sublayers",
    "tokens_per_sample",
    "max_tokens",
    "lr",
    "warmup",
    "clip_norm",
    "dropout",
    "checkpoints",
)


def data_fingerprint(data: Path) -> Optional[str]:
    """The binarised data's identity (its dictionary and the splits' indexes), not its path; None without data."""
    import hashlib

    if not (data / "dict.txt").exists():
        return None

    digest = hashlib.sha1()
    for name in ("dict.txt", "train.idx", "valid.idx", "test.idx"):
        if (data / name).exists():
            digest.update((data / name).read_bytes())
    return "sha1:" + digest.hexdigest()[:16]


def same_config(recorded: Optional[Dict[str, object]], expected: Dict[str, object]) -> bool:
    """Whether a record was made with the expected configuration. Without the data directory
    (``--report-only`` reads only the records) the data's fingerprint is not compared."""
    if recorded is None:
        return False
    if "boundary_checkpoint" not in recorded:  # a run made before the boundary was kept: the same training
        expected = {k: v for k, v in expected.items() if k != "boundary_checkpoint"}
    if expected.get("data") is None:
        recorded = {k: v for k, v in recorded.items() if k != "data"}
        expected = {k: v for k, v in expected.items() if k != "data"}
    return recorded == expected


def run_config(opts, run: Run) -> Dict[str, object]:
    config = {k: (data_fingerprint(opts.data) if k == "data" else getattr(opts, k)) for k in SHARED}
    config.update(
        label=run.label,
        moe_type=run.moe_type,
        seed=run.seed,
        max_update=run.max_update,
        stage1_fraction=run.stage1_fraction,
        flags=list(run.flags),
        two_stage_updates=boundary_of(run),
    )
    if keeps_boundary(run):
        config["boundary_checkpoint"] = True
    return config


def wall_at(records: Sequence[tuple], update: int) -> Optional[float]:
    """Training seconds up to ``update``: the sum of fairseq's per-interval ``train_wall``
    (time in training steps, not validation or checkpointing; robust to resumes, unlike ``wall``)."""
    steps = [
        (int(r["num_updates"]), float(r["train_wall"])) for k, r in records if k == "train_inner" and "train_wall" in r
    ]
    if not steps:
        return None
    return sum(w for u, w in steps if u <= update)


def run_one(opts, run: Run) -> Optional[Dict[str, object]]:
    """Train (or resume, or reuse) one run, evaluate it, measure its routing fluctuation."""
    save_dir = opts.work / run.name
    config = run_config(opts, run)
    done, started = save_dir / "result.json", save_dir / "config.json"
    kept = opts.records / f"{run.name}.json"  # committed: finished runs survive the session's work dir
    for path in (kept, done):
        if path.exists() and not opts.fresh:
            cached = json.loads(path.read_text())
            if cached.get("config") == config:
                print(f"[study] {run.name}: reusing {path.name} (--fresh retrains)", flush=True)
                return cached
    if save_dir.exists() and (opts.fresh or not started.exists() or json.loads(started.read_text()) != config):
        shutil.rmtree(save_dir)  # another configuration: start over
    resuming = (save_dir / "checkpoint_last.pt").exists()
    save_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(config))
    sessions = json.loads((save_dir / "sessions.json").read_text()) if (save_dir / "sessions.json").exists() else []
    log = save_dir / "train.log"
    last_session = log.read_text().rsplit("# session", 1)[-1] if log.exists() else ""
    if resuming and "done training" in last_session and f"--max-update {run.max_update} " in last_session:
        # trained to the end, stopped before its evaluation: resuming fairseq-train would add an update
        print(f"[study] {run.name}: trained, evaluating", flush=True)
    else:
        print(f"[study] {run.name}: {'resuming' if resuming else 'training'} ({time.strftime('%H:%M:%S')})", flush=True)
        sessions.append(train(opts, run, save_dir))
    (save_dir / "sessions.json").write_text(json.dumps(sessions))

    records = log_records(save_dir)
    final = save_dir / "checkpoint_last.pt"
    interval_ckpts = sorted(save_dir.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    wps = [r["wps"] for kind, r in records if kind == "train_inner" and "wps" in r]
    # (update, valid ppl, training seconds so far)
    valid_curve = sorted(
        (int(r["valid_num_updates"]), float(r["valid_ppl"]), wall_at(records, int(r["valid_num_updates"])))
        for kind, r in records
        if kind == "valid"
    )
    result: Dict[str, object] = {
        "moe_type": run.moe_type,
        "label": run.label,
        "study": run.study,
        "seed": run.seed,
        "valid_ppl": eval_lm(opts, final, "valid"),
        "test_ppl": eval_lm(opts, final, "test"),
        "params": param_counts(final),
        "train_wps": statistics.median(float(w) for w in wps) if wps else float("nan"),
        "train_seconds": wall_at(records, run.max_update),  # training steps only
        "launch_seconds": sum(sessions),  # whole fairseq-train launches (an interrupted one is not counted)
        "launches": len(sessions),
        # intra-op threads of the training processes: the thread count changes fp32 reduction orders, so a
        # run is reproduced bit for bit only with the same count
        "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
        "valid_curve": valid_curve,
    }
    if run.moe_type != "dense" and len(interval_ckpts) >= 2:
        fl = fluctuation(opts, interval_ckpts, save_dir / "fluctuation.json")
        result["fluctuation"] = [(p["to_update"], p["ratio"]) for p in fl["pairs"]]
        result["last_fluctuation"] = fl.get("last_fluctuation")
        result["final_fluctuation"] = fl["final_pair_ratio"]
        result["late_share"] = fl["share_last_fluctuation_after_20pct"]
        result["stage1_last_fluctuation"] = stage1_last_fluctuation(dict(result, config=config))
    if keeps_boundary(run):
        result.update(hand_over(opts, save_dir / BOUNDARY_CHECKPOINT, final, save_dir))
    result["config"] = config
    done.write_text(json.dumps(result))
    opts.records.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"[study] {run.name}: valid ppl {result['valid_ppl']:.2f}, test ppl {result['test_ppl']:.2f}, "
        f"{result['train_seconds']:.0f}s",
        flush=True,
    )
    return result


def routing_summary(opts, checkpoint: Path, out_json: Path) -> Dict[str, object]:
    cmd = [
        sys.executable,
        "-m",
        "fairseq_stablemoe.cli.routing_summary",
        str(opts.data),
        "--path",
        str(checkpoint),
        "--split",
        "valid",
        "--cpu",
        "--json",
        str(out_json),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"routing summary failed on {checkpoint}:\n{out.stderr[-3000:]}")
    return json.loads(out_json.read_text())


def hand_over(opts, boundary: Path, final: Path, save_dir: Path) -> Dict[str, object]:
    """StableMoE's hand-over, read from its boundary checkpoint (the frozen model, routing counts
    kept in it) and its last one, on the validation split.

    ``handover``: over the refit window, the frozen routing's agreement with the backbone's majority
    routing and with the backbone, and the ceiling; ``boundary_change``: the share of validation
    tokens whose expert changes across the boundary (the backbone at the boundary, which routed
    stage 1, against the frozen router, which routes from then on); ``stage2_max_load``: max over
    mean load of the frozen routing on the validation split at the end."""
    at_boundary = routing_summary(opts, boundary, save_dir / "routing_boundary.json")["layers"][0]
    at_end = routing_summary(opts, final, save_dir / "routing_final.json")["layers"][0]
    return {
        "handover": at_boundary.get("handover"),
        "boundary_change": 1.0 - at_boundary["agreement"],
        "stage2_max_load": at_end["max_over_mean"],
    }


def stage1_last_fluctuation(result: Dict[str, object]) -> Optional[float]:
    """StableMoE's fluctuation between its last two checkpoints of stage 1, or None.

    Both must be before the boundary: a checkpoint saved at update ``two_stage_updates`` is routed
    as stage 2 (the frozen distilled router), like every later one. Computed from the record's
    pairs, so a record written with an older rule reads the same.
    """
    if result["moe_type"] != "stablemoe" or not result.get("fluctuation"):
        return None
    boundary = result["config"]["two_stage_updates"]
    stage1 = [ratio for update, ratio in result["fluctuation"] if update < boundary]
    return stage1[-1] if stage1 else None


def _mean_spread(values: Sequence[Optional[float]], scale: float = 1.0, unit: str = "") -> str:
    values = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{unit} (n={len(values)})"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("compare_moe_types.py: the plots need matplotlib (a dependency of fairseq-stablemoe: pip install .)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: the type the perplexity plots are drawn against (the first type run if it is not)
PLOT_REFERENCE = "stablemoe"
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_DASHES = ["-", "--", "-.", ":"]


def _style(i: int) -> Dict[str, object]:
    """Line ``i``'s colour, marker and dashes. Markers are hollow and shrink with ``i``, so that lines
    which coincide (two types that never change expert, say) stay visible one inside the other."""
    return {
        "color": f"C{i % 10}",
        "marker": _MARKERS[i % len(_MARKERS)],
        "linestyle": _DASHES[i % len(_DASHES)],
        "markersize": max(9.0 - 1.4 * i, 3.5),
        "markerfacecolor": "none",
        "markeredgewidth": 1.3,
        "linewidth": 1.4,
    }


def _per_update(runs: Sequence[Dict[str, object]], points) -> List[tuple]:
    """``(x, [value of each run])`` at the x every run has; ``points(run)`` gives a run's ``[[x, value], ...]``."""
    series = [{p[0]: p[1] for p in points(r)} for r in runs]
    common = set.intersection(*(set(s) for s in series)) if series else set()
    return [(x, [s[x] for s in series]) for x in sorted(common)]


def _spread_line(ax, xs, values, style, label: str, scale: float = 1.0) -> None:
    """The seed mean of ``values`` (one list per x) against ``xs``, shaded ±1 sample s.d. when there are seeds."""
    mean = [scale * statistics.mean(v) for v in values]
    ax.plot(xs, mean, label=label, **style)
    if values and min(len(v) for v in values) > 1:
        sd = [scale * statistics.stdev(v) for v in values]
        ax.fill_between(
            xs, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], color=style["color"], alpha=0.12
        )


def _gap_line(ax, runs, ref_runs, style, label: str, cost=None, ref_cost=None) -> None:
    """Validation perplexity minus the reference's seed mean, against updates (or, with ``cost`` and
    ``ref_cost`` in seconds per update, against training time: the reference read at the same time,
    linear between its points); shaded: the type's own seed spread."""
    curve = _per_update(runs, lambda r: r["valid_curve"])
    ref = [(u, statistics.mean(v)) for u, v in _per_update(ref_runs, lambda r: r["valid_curve"])]
    if cost is None:
        ref_at = dict(ref)
        pts = [(u, [p - ref_at[u] for p in v]) for u, v in curve if u in ref_at]
    else:
        ref_t = [(u * ref_cost, p) for u, p in ref]
        pts = []
        for u, v in curve:
            t = u * cost
            for (t0, p0), (t1, p1) in zip(ref_t, ref_t[1:]):
                if t0 <= t <= t1:
                    at = p0 + (p1 - p0) * (t - t0) / (t1 - t0)
                    pts.append((t, [p - at for p in v]))
                    break
    if pts:
        _spread_line(ax, [x for x, _ in pts], [v for _, v in pts], style, label)


def measure_step_cost(opts, updates: int, rounds: int) -> Dict[str, object]:
    """Seconds per training update of every type, measured side by side on this machine.

    The runs of a study are hours apart and share the machine with whatever else runs then, so
    their own training times do not compare types fairly. Here every type trains ``updates``
    updates of the study's model and batch (no checkpoints, no validation), in ``rounds`` rounds
    whose order alternates, one run right after the other; a type's cost is the median over its
    runs of the median seconds per update of its log intervals (tokens per update over fairseq's
    logged words per second, which has more digits than its ``train_wall``; the first interval,
    with the start-up, is left out).
    """
    import tempfile

    samples: Dict[str, List[float]] = {t: [] for t in opts.types}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for t in opts.types if r % 2 == 0 else opts.types[::-1]:
                save_dir = Path(tmp) / f"{t}-{r}"
                save_dir.mkdir()
                run = Run(t, t, 1, updates, opts.stage1_fraction)
                cmd = train_command(opts, run, save_dir) + ["--no-save", "--disable-validation", "--log-interval", "25"]
                with open(save_dir / "train.log", "w") as log:
                    if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                        raise RuntimeError(
                            f"step-cost run of {t} failed:\n{(save_dir / 'train.log').read_text()[-3000:]}"
                        )
                steps = sorted(
                    (int(rec["num_updates"]), float(rec["wpb"]) / float(rec["wps"]))
                    for k, rec in log_records(save_dir)
                    if k == "train_inner" and "wps" in rec
                )
                samples[t].append(statistics.median(cost for _, cost in steps[1:]))
                print(f"[step-cost] round {r + 1}: {t} {samples[t][-1]:.4f} s/update", flush=True)
    return {
        "updates": updates,
        "rounds": rounds,
        "samples": samples,
        "seconds_per_update": {t: statistics.median(v) for t, v in samples.items()},
    }


def at_time(runs: Sequence[Dict[str, object]], seconds: float, cost: float) -> Optional[float]:
    """Seed-mean validation perplexity after ``seconds`` of training at ``cost`` seconds per update
    (linear between the validation points; None outside the curve)."""
    curve = _mean_curve(runs, 0)
    updates = seconds / cost
    for (u0, p0), (u1, p1) in zip(curve, curve[1:]):
        if u0 <= updates <= u1:
            return p0 + (p1 - p0) * (updates - u0) / (u1 - u0)
    return None


def _mean_curve(runs: Sequence[Dict[str, object]], column: int, cost: Optional[float] = None) -> List[tuple]:
    """Seed-mean of the validation curves: ``(x, ppl)`` with x = update (column 0) or wall time (2);
    with ``cost`` (seconds per update), x = update x cost."""
    by_update: Dict[int, List[tuple]] = {}
    for r in runs:
        for point in r["valid_curve"]:
            by_update.setdefault(point[0], []).append(point)
    out = []
    for u in sorted(by_update):
        pts = by_update[u]
        if len(pts) < len(runs):
            continue
        if cost is not None:
            out.append((u * cost, statistics.mean(p[1] for p in pts)))
        elif all(p[column] is not None for p in pts):
            out.append((statistics.mean(p[column] for p in pts), statistics.mean(p[1] for p in pts)))
    return out


def write_report(opts, results: List[Dict[str, object]], argv: Sequence[str]) -> None:
    plt = _pyplot()
    out = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    text = [
        "# StableMoE against its baselines: study results (generated)",
        "",
        f"Generated by `python examples/compare_moe_types.py {' '.join(argv)}` on {time.strftime('%Y-%m-%d')} "
        "(mean ± sample standard deviation over seeds where there are several).",
        "",
        f"Model: {opts.layers} dense decoder layers, d={opts.dim}, FFN {opts.ffn}, {opts.heads} heads, one MoE layer "
        f"of {opts.experts} experts x {opts.sublayers} sublayer(s) after the middle block (unless a run says "
        f"otherwise); {opts.max_tokens} tokens per update ({opts.tokens_per_sample}-token samples), Adam, inverse-sqrt "
        f"schedule (lr {opts.lr}, warmup {opts.warmup}), clip {opts.clip_norm}, dropout {opts.dropout}. Perplexities "
        "from `fairseq-eval-lm` on the last checkpoint (inference routing: StableMoE's distilled router). Fluctuation: "
        "share of validation tokens whose expert (with the routing training used at that update) changed between "
        "consecutive checkpoints; 'late' is the share whose last change is past 20% of training (paper, Figure 2).",
        "",
    ]
    cost_file = Path(f"{stem}_step_cost.json")
    cost = json.loads(cost_file.read_text())["seconds_per_update"] if cost_file.exists() else {}
    main = [
        r
        for r in results
        if r["config"]["max_update"] == opts.max_update
        and r["label"] in TYPES
        and r["config"]["flags"] == list(TYPE_FLAGS.get(r["label"], ()))
        and (r["moe_type"] != "stablemoe" or r["config"]["stage1_fraction"] == opts.stage1_fraction)
    ]
    if main:
        if cost:
            text += [
                "Training time: 'train s' is each run's own (fairseq's `train_wall`), which depends on what else "
                "ran on the machine then; 's/update side by side' is the cost per update of each type measured "
                f"side by side in one run (`--step-cost`, {cost_file.name}), and Figure 4's time axis is updates "
                "x that cost.",
                "",
            ]
        # the fluctuation of StableMoE's stage-1 routing needs two checkpoints in stage 1
        stage1_col = any(stage1_last_fluctuation(r) is not None for r in main)
        text += [
            f"## Main comparison: {opts.max_update} updates, StableMoE stage 1 {100 * opts.stage1_fraction:.0f}%",
            "",
            "| type | seeds | valid ppl | test ppl | params | active | train s | s/update side by side "
            "| final fluctuation | late (>20%) |" + (" StableMoE stage-1 last pair |" if stage1_col else ""),
            "|---" * (11 if stage1_col else 10) + "|",
        ]
        fig, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
        (ax_upd, ax_wall), (ax_pair, ax_last) = axes
        by_type = {t: sorted((r for r in main if r["label"] == t), key=lambda r: r["seed"]) for t in opts.types}
        by_type = {t: runs for t, runs in by_type.items() if runs}
        ref = PLOT_REFERENCE if PLOT_REFERENCE in by_type else next(iter(by_type))
        for i, (t, runs) in enumerate(by_type.items()):
            p = runs[0]["params"]
            text.append(
                f"| {t} | {','.join(str(r['seed']) for r in runs)} | {_mean_spread([r['valid_ppl'] for r in runs])} "
                f"| {_mean_spread([r['test_ppl'] for r in runs])} | {p['total'] / 1e6:.2f}M | {p['active'] / 1e6:.2f}M "
                f"| {_mean_spread([r['train_seconds'] for r in runs])} "
                f"| {f'{cost[t]:.4f}' if t in cost else 'n/a'} "
                f"| {_mean_spread([r.get('final_fluctuation') for r in runs], 100, '%')} "
                f"| {_mean_spread([r.get('late_share') for r in runs], 100, '%')} |"
                + (f" {_mean_spread([stage1_last_fluctuation(r) for r in runs], 100, '%')} |" if stage1_col else "")
            )
            label = f"{t} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            _gap_line(ax_upd, runs, by_type[ref], _style(i), label)
            if cost and t in cost and ref in cost:
                _gap_line(ax_wall, runs, by_type[ref], _style(i), label, cost[t], cost[ref])
            if all(r.get("fluctuation") for r in runs):
                pts = _per_update(runs, lambda r: r["fluctuation"])
                _spread_line(ax_pair, [u for u, _ in pts], [v for _, v in pts], _style(i), label, 100)
            if all(r.get("last_fluctuation") for r in runs):
                pts = _per_update(
                    runs,
                    lambda r: list(zip(r["last_fluctuation"]["update_pct"], r["last_fluctuation"]["cumulative_share"])),
                )
                _spread_line(ax_last, [u for u, _ in pts], [v for _, v in pts], _style(i), label, 100)
        for ax in (ax_upd, ax_wall):
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_ylabel(f"validation perplexity minus {ref}'s")
        ax_upd.set(
            xlabel="update",
            title=f"perplexity gap to {ref} (seed means; band: ±1 s.d. over seeds)\nabove 0: worse than {ref}",
        )
        ax_wall.set(
            xlabel="training time: updates x seconds per update measured side by side (s)",
            title=f"the same at equal training time (paper's Figure 4)\n{ref} read at the same time",
        )
        if not cost:
            ax_wall.text(
                0.5, 0.5, "no side-by-side cost measured (--step-cost)", ha="center", transform=ax_wall.transAxes
            )
        boundary = opts.max_update * opts.stage1_fraction
        ax_pair.axvline(boundary, color="grey", linestyle=":", label=f"StableMoE's stage 2 from update {boundary:.0f}")
        ax_pair.set(
            xlabel="update (checkpoint)",
            ylabel="tokens whose expert changed (%)",
            title="fluctuation since the previous checkpoint (validation tokens)",
        )
        ax_last.set(
            xlabel="training progress (%)",
            ylabel="tokens that no longer change (%)",
            title="last fluctuation step (paper's Figures 2 and 7)",
        )
        for ax in axes.flat:
            if ax.has_data():
                ax.legend(fontsize=8)
        fig.savefig(f"{stem}_main.png", dpi=110)
        plt.close(fig)
        text += ["", f"![main comparison]({Path(f'{stem}_main.png').name})", ""]
        fastest = min(
            (t for t in opts.types if t in cost and any(r["label"] == t for r in main)),
            key=lambda t: cost[t],
            default=None,
        )
        if fastest is not None:
            budget = opts.max_update * cost[fastest]
            text += [
                f"At equal training time ({fastest}'s {opts.max_update} updates, {budget:.0f} s at the side-by-side "
                "cost; fairseq-train's validation perplexity, seed mean, interpolated between validation "
                "points): "
                + ", ".join(
                    f"{t} {v:.2f} ({budget / cost[t]:.0f} updates)"
                    for t, v in (
                        (t, at_time([r for r in main if r["label"] == t], budget, cost[t]))
                        for t in opts.types
                        if t in cost
                    )
                    if v is not None
                ),
                "",
            ]

    text += handover_section(opts, results)
    text += long_section(opts, results)
    ablations = [r for r in results if r["study"] == "ablations"]
    if ablations:
        ref = [r["valid_ppl"] for r in ablations if r["label"] == "stablemoe"]
        text += [
            f"## Ablations: {opts.ablation_update} updates (paper: Tables 4, 5, 6)",
            "",
            "Fluctuation columns as in the main table; 'stage-1 last pair': StableMoE's routing in training "
            "between the last two checkpoints before the boundary (needs two checkpoints in stage 1; "
            "`stage1-only` is never frozen, so its columns are StableMoE's stage-1 routing over the whole run, "
            "the paper's Figure 7).",
            "",
            "| run | flags | stage 1 | seeds | valid ppl | test ppl | valid ppl - stablemoe "
            "| final fluctuation | late (>20%) | stage-1 last pair |",
            "|---" * 10 + "|",
        ]
        fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
        drawn = 0
        for label in dict.fromkeys(r["label"] for r in ablations):
            runs = sorted((r for r in ablations if r["label"] == label), key=lambda r: r["seed"])
            c = runs[0]["config"]
            delta = (statistics.mean(r["valid_ppl"] for r in runs) - statistics.mean(ref)) if ref else float("nan")
            text.append(
                f"| {label} | `{' '.join(c['flags']) or '-'}` | {100 * c['stage1_fraction']:.0f}% "
                f"| {','.join(str(r['seed']) for r in runs)} | {_mean_spread([r['valid_ppl'] for r in runs])} "
                f"| {_mean_spread([r['test_ppl'] for r in runs])} | {delta:+.2f} "
                f"| {_mean_spread([r.get('final_fluctuation') for r in runs], 100, '%')} "
                f"| {_mean_spread([r.get('late_share') for r in runs], 100, '%')} "
                f"| {_mean_spread([stage1_last_fluctuation(r) for r in runs], 100, '%')} |"
            )
            # routing policy and stage-1 share, not placement (the placements route as the reference does)
            if all(r.get("fluctuation") for r in runs) and not c["flags"]:
                style = _style(drawn)
                pts = _per_update(runs, lambda r: r["fluctuation"])
                seeds = ",".join(str(r["seed"]) for r in runs)
                _spread_line(ax, [u for u, _ in pts], [v for _, v in pts], style, f"{label} (seed {seeds})", 100)
                if runs[0]["moe_type"] == "stablemoe" and c["stage1_fraction"] < 1:
                    ax.axvline(c["two_stage_updates"], color=style["color"], linestyle=":", linewidth=1)
                drawn += 1
        ax.set(
            xlabel="update (checkpoint)",
            ylabel="tokens whose expert changed (%)",
            title="fluctuation since the previous checkpoint, ablation runs\n"
            "(dotted: each StableMoE run's stage boundary)",
        )
        ax.legend(fontsize=8)
        fig.savefig(f"{stem}_ablations.png", dpi=110)
        plt.close(fig)
        text += ["", f"![ablations' fluctuation]({Path(f'{stem}_ablations.png').name})", ""]

    lengths = sorted(set(opts.lengths)) if "length" in opts.study else []
    if lengths:

        def at(t, u):
            """Validation ppl (fairseq-train's) after u updates of a u-update run, seed mean over --length-seeds:
            StableMoE's own u-update run; another type's shortest run of at least u updates (the same training
            up to u: its schedule does not depend on the run's length)."""
            values = []
            for seed in opts.length_seeds:
                runs = [
                    r
                    for r in results
                    if r["moe_type"] == t
                    and r["label"] == t
                    and not r["config"]["flags"]
                    and r["seed"] == seed
                    and (r["config"]["max_update"] == u if t == "stablemoe" else r["config"]["max_update"] >= u)
                    and (t != "stablemoe" or r["config"]["stage1_fraction"] == opts.stage1_fraction)
                ]
                points = [
                    p[1]
                    for r in sorted(runs, key=lambda r: r["config"]["max_update"])
                    for p in r["valid_curve"]
                    if p[0] == u
                ][:1]
                values += points
            return statistics.mean(values) if len(values) == len(opts.length_seeds) else None

        types = [t for t in opts.types if t not in TYPE_FLAGS]  # the sweep runs the --moe-type values
        value = {(t, u): at(t, u) for t in types for u in lengths}

        def gap(t, u):
            return None if None in (value[t, u], value["stablemoe", u]) else value["stablemoe", u] - value[t, u]

        others = [t for t in types if t != "stablemoe"]
        text += [
            f"## Training-length sweep (valid ppl after u updates, seed {','.join(map(str, opts.length_seeds))}; "
            f"StableMoE stage 1 at {100 * opts.stage1_fraction:.0f}% of each length)",
            "",
            "fairseq-train's validation perplexity at the end of a u-update run (not fairseq-eval-lm's, which "
            "reads about 0.07 lower here). StableMoE: its own u-update run. The other types: their run's "
            "validation at update u, which is their u-update run (their schedule does not depend on the run's "
            "length; e.g. switch-u2000-seed1 and switch-u3000-seed1 both log 73.66 at update 2000). "
            "'stablemoe - X': negative when StableMoE is ahead. One seed: read the gaps against the seed "
            "spread of the main comparison.",
            "",
            "| updates | " + " | ".join(types) + " | " + " | ".join(f"stablemoe - {t}" for t in others) + " |",
            "|---" * (len(types) + len(others) + 1) + "|",
        ]
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        spread = [r["valid_ppl"] for r in main if r["label"] == "stablemoe"]
        if len(spread) > 1:
            sd = statistics.stdev(spread)
            ax.axhspan(
                -sd,
                sd,
                color="grey",
                alpha=0.15,
                label=f"stablemoe's seed spread at {opts.max_update} updates (±1 s.d.)",
            )
        ax.axhline(0, color="grey", linewidth=0.8)
        for i, t in enumerate(types):
            pts = [(u, -gap(t, u)) for u in lengths if t != "stablemoe" and gap(t, u) is not None]
            if pts:
                ax.plot([u for u, _ in pts], [v for _, v in pts], label=t, **_style(i))
        for u in lengths:
            text.append(
                f"| {u} | "
                + " | ".join("n/a" if value[t, u] is None else f"{value[t, u]:.2f}" for t in types)
                + " | "
                + " | ".join("n/a" if gap(t, u) is None else f"{gap(t, u):+.2f}" for t in others)
                + " |"
            )
        text += ["", "StableMoE ahead of (lower valid ppl than) each baseline at:", ""]
        for t in others:
            ahead = [u for u in lengths if gap(t, u) is not None and gap(t, u) < 0]
            text.append(f"* {t}: {', '.join(map(str, ahead)) if ahead else 'none of the lengths run'}")
        ax.set(
            xlabel="run length (updates)",
            ylabel="validation perplexity minus stablemoe's",
            title=f"each type against stablemoe after u updates (seed {','.join(map(str, opts.length_seeds))})"
            "\nabove 0: stablemoe ahead",
            xticks=lengths,
        )
        ax.legend(fontsize=8)
        fig.savefig(f"{stem}_length.png", dpi=110)
        plt.close(fig)
        text += ["", f"![length sweep]({Path(f'{stem}_length.png').name})", ""]

    out.write_text("\n".join(text))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


def _gap(runs: Sequence[Dict[str, object]], others: Sequence[Dict[str, object]]) -> str:
    """Mean valid ppl of ``runs`` minus that of ``others``, with the standard error of the difference
    (unpaired: ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``; "n/a" without two seeds on each side)."""
    a, b = [r["valid_ppl"] for r in runs], [r["valid_ppl"] for r in others]
    if not a or not b:
        return "n/a"
    diff = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{diff:+.2f}"
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return f"{diff:+.2f} ± {se:.2f}"


def _select(results, study: str, label: str, max_update: int, opts) -> List[Dict[str, object]]:
    """The records of one type (label) in one study at one length, by seed."""
    return sorted(
        (
            r
            for r in results
            if r["study"] == study
            and r["label"] == label
            and r["config"]["max_update"] == max_update
            and r["config"]["flags"] == list(TYPE_FLAGS.get(label, ()))
            and (r["moe_type"] != "stablemoe" or r["config"]["stage1_fraction"] == opts.stage1_fraction)
        ),
        key=lambda r: r["seed"],
    )


def handover_section(opts, results) -> List[str]:
    """StableMoE's stage hand-over, per run type of the main and long studies (see :func:`hand_over`)."""
    rows = []
    for study, U in (("main", opts.max_update), ("long", opts.long_update)):
        for label in ("stablemoe", "stablemoe-refit"):
            runs = [r for r in _select(results, study, label, U, opts) if r.get("handover")]
            if not runs:
                continue
            h = lambda key: [r["handover"][key] for r in runs]  # noqa: E731
            rows.append(
                f"| {label} | {U} | {','.join(str(r['seed']) for r in runs)} "
                f"| {_mean_spread(h('agree_majority'), 100, '%')} | {_mean_spread(h('agree_backbone'), 100, '%')} "
                f"| {_mean_spread(h('ceiling'), 100, '%')} "
                f"| {_mean_spread([r['boundary_change'] for r in runs], 100, '%')} "
                f"| {_mean_spread([1 - r['handover']['ceiling'] for r in runs], 100, '%')} "
                f"| {_mean_spread([r['stage2_max_load'] for r in runs])} "
                f"| {_mean_spread([r['valid_ppl'] for r in runs])} | {_mean_spread([r['test_ppl'] for r in runs])} "
                f"| {_gap(runs, _select(results, study, 'hash', U, opts))} "
                f"| {_gap(runs, _select(results, study, 'base', U, opts))} |"
            )
    if not rows:
        return []
    return [
        "## Stage hand-over: StableMoE and exact distillation (`stablemoe-refit`, `--distill-refit`)",
        "",
        "Read from each run's boundary checkpoint (kept by the study) and its last one. Over the refit window "
        "(the last half of stage 1): 'agrees w/ majority', the share of tokens whose frozen expert is their id's "
        "most frequent backbone expert; 'agrees w/ backbone', the share routed by the frozen table as the "
        "backbone routed them; 'ceiling', the share whose backbone expert is their id's most frequent one (the "
        "best a token-id router can reach). 'changed at boundary': validation tokens whose expert changes "
        "across the boundary (the backbone at the boundary against the frozen routing), beside 1 - ceiling. "
        "'stage-2 load': max over mean load of the frozen routing on the validation split at the end. Gaps: "
        "valid ppl minus the type's, ± the standard error of the difference (unpaired); negative: StableMoE "
        "ahead.",
        "",
        "| type | updates | seeds | agrees w/ majority | agrees w/ backbone | ceiling | changed at boundary "
        "| 1 - ceiling | stage-2 load | valid ppl | test ppl | gap to hash | gap to base |",
        "|---" * 13 + "|",
        *rows,
        "",
    ]


def long_section(opts, results) -> List[str]:
    """The long study: every ``--long-types`` at ``--long-update`` updates, beside their main-study length."""
    if not any(r["study"] == "long" for r in results):
        return []
    lines = [
        f"## Twice the training: {opts.long_update} updates (StableMoE stage 1 at {100 * opts.stage1_fraction:.0f}%)",
        "",
        f"Valid and test perplexity at {opts.long_update} updates, beside the main comparison's {opts.max_update}; "
        "gaps: valid ppl minus the type's at the same length, ± the standard error of the difference.",
        "",
        f"| type | seeds | valid ppl at {opts.max_update} | valid ppl | test ppl | gap to hash | gap to base |",
        "|---" * 7 + "|",
    ]
    for label in opts.long_types:
        runs = _select(results, "long", label, opts.long_update, opts)
        if not runs:
            continue
        shorter = _select(results, "main", label, opts.max_update, opts)
        gaps = [
            "" if label == other else _gap(runs, _select(results, "long", other, opts.long_update, opts))
            for other in ("hash", "base")
        ]
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in runs)} | {_mean_spread([r['valid_ppl'] for r in shorter])} "
            f"| {_mean_spread([r['valid_ppl'] for r in runs])} | {_mean_spread([r['test_ppl'] for r in runs])} "
            f"| {gaps[0]} | {gaps[1]} |"
        )
    return lines + [""]


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    """The study's options from ``argv`` (lists parsed, checked; the work directory made)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "runs/shakespeare/data-bin")
    parser.add_argument("--work", type=Path, default=REPO / "runs/study")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs/study_results.md",
        help="the report; its .json (one record per run) and _*.png plots go beside it",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=REPO / "docs/study_runs",
        help="one JSON record per finished run, kept in the repository: a later run of the command reuses "
        "them (the work directory with the checkpoints need not survive)",
    )
    parser.add_argument("--study", default="main", help=f"comma-separated, of {STUDIES}")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the main comparison")
    parser.add_argument("--max-update", type=int, default=3000, help="updates of the main comparison")
    parser.add_argument(
        "--stage1-fraction", type=float, default=0.1, help="StableMoE's --two-stage-updates / --max-update"
    )
    parser.add_argument("--ablation-update", type=int, default=1500)
    parser.add_argument("--ablation-seeds", default="1")
    parser.add_argument(
        "--lengths",
        default="500,1000,1500,2000,3000",
        help="run lengths of StableMoE's length sweep (in the order they run)",
    )
    parser.add_argument("--length-seeds", default="1")
    parser.add_argument("--long-update", type=int, default=6000, help="updates of the long study")
    parser.add_argument("--long-types", default="stablemoe,stablemoe-refit,hash,base")
    parser.add_argument("--long-seeds", default="1,2")
    parser.add_argument("--checkpoints", type=int, default=12, help="interval checkpoints per run (fluctuation points)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--sublayers", type=int, default=1, help="sublayers per expert")
    parser.add_argument("--tokens-per-sample", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clip-norm", type=float, default=0.1, help="the paper's 0.1")
    parser.add_argument("--dropout", type=float, default=0.0, help="the paper's 0")
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        help="hours: start no new run after this long (the report covers the finished runs; "
        "run the same command again to go on)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs (and which are finished) and stop")
    parser.add_argument(
        "--step-cost",
        type=int,
        metavar="UPDATES",
        default=None,
        help="instead of the study: measure every type's seconds per update side by side (UPDATES "
        "updates per run, --step-cost-rounds rounds) into OUT's _step_cost.json, which the report then "
        "uses for Figure 4's time axis",
    )
    parser.add_argument("--step-cost-rounds", type=int, default=2)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the finished runs' records (--records); train nothing, and need no data "
        "(the data's fingerprint is checked when --data exists)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="retrain every run (default: reuse finished runs, resume interrupted ones)"
    )
    opts = parser.parse_args(argv)
    ints = lambda spec: [int(x) for x in str(spec).split(",") if x.strip()]  # noqa: E731
    opts.types = [t.strip() for t in opts.types.split(",") if t.strip()]
    opts.long_types = [t.strip() for t in opts.long_types.split(",") if t.strip()]
    opts.study = [t.strip() for t in opts.study.split(",") if t.strip()]
    opts.seeds, opts.ablation_seeds = ints(opts.seeds), ints(opts.ablation_seeds)
    opts.lengths, opts.length_seeds = ints(opts.lengths), ints(opts.length_seeds)
    opts.long_seeds = ints(opts.long_seeds)
    unknown = [t for t in opts.types + opts.long_types if t not in TYPES] + [s for s in opts.study if s not in STUDIES]
    if unknown:
        parser.error(f"unknown --types/--study {unknown}: choose from {TYPES} / {STUDIES}")
    training = not (opts.report_only or opts.dry_run)
    if training and not (opts.data / "dict.txt").exists():
        parser.error(
            f"{opts.data} has no dict.txt: build the data with examples/shakespeare/prepare.py (or pass --data)"
        )
    if training:
        opts.work.mkdir(parents=True, exist_ok=True)
    return opts


def main(argv: Sequence[str] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_options(argv)
    runs = plan(opts)
    if opts.dry_run:
        for r in runs:
            state = (
                "finished"
                if (opts.records / f"{r.name}.json").exists() or (opts.work / r.name / "result.json").exists()
                else ("started" if (opts.work / r.name / "checkpoint_last.pt").exists() else "to run")
            )
            print(f"{r.name:45s} {r.study:10s} {' '.join(r.flags):60s} {state}")
        print(f"{len(runs)} runs, {sum(r.max_update for r in runs)} updates in all")
        return
    if opts.step_cost:
        measured = measure_step_cost(opts, opts.step_cost, opts.step_cost_rounds)
        measured["command"] = "python examples/compare_moe_types.py " + " ".join(argv)
        measured["date"] = time.strftime("%Y-%m-%d")
        path = Path(f"{opts.out.with_suffix('')}_step_cost.json")
        path.write_text(json.dumps(measured, indent=1))
        print(f"[step-cost] {measured['seconds_per_update']} -> {path}")
        return
    if opts.report_only:
        kept = {r.name: opts.records / f"{r.name}.json" for r in runs}
        done = [
            rec
            for rec, r in ((json.loads(kept[r.name].read_text()), r) for r in runs if kept[r.name].exists())
            if same_config(rec.get("config"), run_config(opts, r))
        ]
        write_report(opts, done, argv)
        print(f"[study] report of {len(done)} of {len(runs)} runs: {opts.out}")
        return
    start, results = time.time(), []
    for i, run in enumerate(runs):
        if opts.stop_after is not None and time.time() - start > opts.stop_after * 3600:
            print(
                f"[study] --stop-after {opts.stop_after}h reached: {len(runs) - i} runs left: run the same "
                "command again to go on"
            )
            break
        print(f"[study] run {i + 1}/{len(runs)}", flush=True)
        results.append(run_one(opts, run))
    write_report(opts, results, argv)
    print(opts.out.read_text())


if __name__ == "__main__":
    main()
