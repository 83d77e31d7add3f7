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

``--threads N`` (default 1) sets ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of every training and
evaluation subprocess; each record keeps the count its training got (``threads``). Records live in
``--records`` (default ``docs/study_runs``); runs of another expert count or corpus go in a subfolder
of their own, e.g. ``--experts 16 --records docs/study_runs/experts16`` or ``--data runs/sotu/data-bin
--records docs/study_runs/sotu`` (their work directory follows: ``runs/study/experts16``), and the
command refuses to overwrite a record of another corpus or expert count. A shorter stage 1
(``--stage1-fraction 0.025``) names its StableMoE runs ``stablemoe-u3000-s12.5-seed1``.

The report reads every record of ``--records`` and of its subfolders, whichever command made them:
the main comparison, the hand-over, longer training, StableMoE minus its baselines against the length
of training, the shorter stage 1, the expert count, each second corpus and the ablations, each section
when it has records and with the runs it still lacks (:data:`PLANNED`), and an appendix with one row
per record. ``--report-only`` writes it to ``docs/study_results.md``; a training command writes it to
``WORK/report.md`` unless ``--out`` says otherwise.
"""

import argparse
import fcntl
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
#: the records of the main corpus at the default expert count; other studies' in its subfolders
DEFAULT_RECORDS = REPO / "docs/study_runs"
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
        """e.g. ``stablemoe-u3000-s110-seed1`` (``-s1`` and stage 1's percentage: 10, 2.5), ``hash-u3000-seed1``."""
        frac = f"-s1{_percent(self.stage1_fraction)}" if self.moe_type == "stablemoe" else ""
        return f"{self.label}-u{self.max_update}{frac}-seed{self.seed}"


def _percent(fraction: float) -> str:
    """A share as a percentage without trailing zeros: 0.1 -> "10", 0.025 -> "2.5"."""
    return f"{round(100 * fraction, 3):g}"


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


def subprocess_env(opts) -> Dict[str, str]:
    """The environment of every subprocess of the study: this one's, with ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS`` set to ``--threads`` (the intra-op threads of torch in the subprocess)."""
    return dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))


def _train_to(opts, run: Run, save_dir: Path, max_update: int) -> None:
    cmd = train_command(opts, run, save_dir)
    cmd[cmd.index("--max-update") + 1] = str(max_update)
    env = subprocess_env(opts)
    with open(save_dir / "train.log", "a") as log:
        log.write(
            f"# session {time.strftime('%Y-%m-%d %H:%M:%S')} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
            f"MKL_NUM_THREADS={env['MKL_NUM_THREADS']}): {' '.join(cmd)}\n"
        )
        log.flush()
        out = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    if out.returncode != 0:
        tail = (save_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {run.name} failed (log: {save_dir / 'train.log'}):\n{tail}")


def recorded_threads(save_dir: Path) -> Optional[object]:
    """The intra-op thread count the run's training subprocesses got, read from the ``OMP_NUM_THREADS``
    that each session of ``train.log`` states: one int, or the list of every session's count where they
    differ. Sessions that state none (written before the count was logged) are left out; with none
    stating it, the count this process passes on (``OMP_NUM_THREADS`` of its environment), else None."""
    log = save_dir / "train.log"
    text = log.read_text() if log.exists() else ""
    counts = [int(n) for n in re.findall(r"^# session [^\n]*?\(OMP_NUM_THREADS=(\d+)", text, re.M)]
    if not counts:
        inherited = os.environ.get("OMP_NUM_THREADS")
        return int(inherited) if inherited and inherited.isdigit() else None
    return counts[0] if len(set(counts)) == 1 else counts


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
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(opts))
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
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(opts))
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


#: what makes a record another study's (another corpus, expert count) rather than a stale one of this study
OTHER_STUDY_KEYS = ("data", "experts")


def conflicts(opts, runs: Sequence[Run]) -> List[str]:
    """The runs whose record in ``--records``, or work directory in ``--work``, belongs to another corpus
    or expert count (or, for a type without stages, another ``--stage1-fraction`` only: the same training
    under the same name). Training such a run would overwrite that record or delete those checkpoints."""
    out = []
    for run in runs:
        config = run_config(opts, run)
        for path in (opts.records / f"{run.name}.json", opts.work / run.name / "config.json"):
            if not path.exists():
                continue
            recorded = json.loads(path.read_text())
            recorded = recorded.get("config", {}) if path.name != "config.json" else recorded
            keys = [k for k in OTHER_STUDY_KEYS if config[k] is not None and recorded.get(k, config[k]) != config[k]]
            staged = ("stage1_fraction", "two_stage_updates")
            if (
                run.moe_type != "stablemoe"
                and recorded.get("stage1_fraction", config["stage1_fraction"]) != config["stage1_fraction"]
                and all(recorded.get(k) == v for k, v in config.items() if k not in staged + ("data",))
            ):
                keys.append("stage1_fraction")
            if keys:
                out.append(f"{path} was made with another {', '.join(keys)}")
    return out


def run_one(opts, run: Run) -> Optional[Dict[str, object]]:
    """Train (or resume, or reuse) one run, evaluate it, measure its routing fluctuation."""
    save_dir = opts.work / run.name
    config = run_config(opts, run)
    done, started = save_dir / "result.json", save_dir / "config.json"
    kept = opts.records / f"{run.name}.json"  # kept in the repository: outlives the work directory
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
        # intra-op threads of the training processes (--threads, as train.log states it): the thread count
        # changes fp32 reduction orders, so a run is reproduced bit for bit only with the same count
        "threads": recorded_threads(save_dir),
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
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(opts))
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


def measure_step_cost(opts, updates: int, rounds: int) -> Dict[str, object]:
    """Seconds per training update of every type, measured side by side on one machine.

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
                    if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(opts)).returncode:
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


def _mean_spread(values: Sequence[Optional[float]], scale: float = 1.0, unit: str = "") -> str:
    """Mean ± sample standard deviation (n), or the one value; "n/a" without values."""
    values = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{unit} (n={len(values)})"


def _by_seed(values: Sequence[Optional[float]], scale: float = 1.0, unit: str = "") -> str:
    return " / ".join("n/a" if v is None else f"{scale * v:.2f}{unit}" for v in values)


def mean_difference(a: Sequence[float], b: Sequence[float]) -> Optional[tuple]:
    """``(mean(a) - mean(b), standard error)``: the standard error of the difference of two independent
    means, ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (sample variances), None unless each side has two values;
    None without values."""
    if not a or not b:
        return None
    diff = statistics.mean(a) - statistics.mean(b)
    se = (
        math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        if min(len(a), len(b)) > 1
        else None
    )
    return diff, se


def _fmt_difference(d: Optional[tuple]) -> str:
    if d is None:
        return "n/a"
    return f"{d[0]:+.2f}" + (f" ± {d[1]:.2f}" if d[1] is not None else " (n=1: no s.e.)")


def _gap(runs: Sequence[Dict[str, object]], others: Sequence[Dict[str, object]]) -> str:
    """Mean valid ppl of ``runs`` minus that of ``others`` ± the standard error of the difference."""
    return _fmt_difference(mean_difference([r["valid_ppl"] for r in runs], [r["valid_ppl"] for r in others]))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("compare_moe_types.py: the plots need matplotlib (a dependency of fairseq-stablemoe: pip install .)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: the type the perplexity gaps are taken from (StableMoE minus each other type)
PLOT_REFERENCE = "stablemoe"

#: each type's colour, marker and line style, the same in every figure
TYPE_STYLE = {
    "stablemoe": ("C0", "o", "-"),
    "stablemoe-refit": ("C1", "s", "--"),
    "switch": ("C2", "^", "-."),
    "base": ("C3", "D", ":"),
    "hash": ("C4", "v", "-"),
    "dense": ("C5", "P", "--"),
}


def type_style(t: str, **extra) -> Dict[str, object]:
    """Type ``t``'s line style (:data:`TYPE_STYLE`). Markers are hollow and shrink along :data:`TYPES`,
    so that lines which coincide (two types that never change expert) stay visible one inside the other."""
    color, marker, dashes = TYPE_STYLE[t]
    style = {
        "color": color,
        "marker": marker,
        "linestyle": dashes,
        "markersize": max(8.0 - 0.8 * TYPES.index(t), 4.0),
        "markerfacecolor": "none",
        "markeredgewidth": 1.3,
        "linewidth": 1.4,
    }
    style.update(extra)
    return style


#: the runs the report expects beyond the command's own studies, at ``--max-update`` updates unless
#: said: StableMoE minus its baselines over longer training (updates: types, seeds), the expert
#: count (N: types, seeds; records in ``--records``/experts{N}/), a second corpus (a subfolder of
#: ``--records``: types, seeds) and a shorter stage 1 (``--stage1-fraction``: types, seeds). A section
#: names the ones it lacks; a study with none is listed under "Runs without records".
PLANNED = {
    "long": {12000: (("stablemoe", "hash", "base"), (1, 2))},
    "experts": {n: (("stablemoe", "hash", "base"), (1, 2)) for n in (16, 32)},
    "corpus": {"sotu": (("stablemoe", "stablemoe-refit", "hash", "base"), (1, 2, 3))},
    "stage1": {f: (("stablemoe", "stablemoe-refit"), (1, 2)) for f in (0.025, 0.05)},
}

#: the paper's ablations (base setting, valid ppl; docs/method.md): an ablation run's reference run and the
#: paper's difference between the two (None: the paper has no such pair)
PAPER_DELTA = {
    "base": ("stablemoe", 20.04 - 19.28, "Tables 2 and 5: BASE layer 20.04, StableMoE 19.28"),
    "placement-middle": ("stablemoe", None, "not in the paper: 3 sublayers against 1"),
    "placement-top": ("placement-middle", 19.55 - 19.28, "Table 4: after the last block 19.55, middle 19.28"),
    "placement-bottom": ("placement-middle", 22.82 - 19.28, "Table 4: before the first block 22.82, middle 19.28"),
    "placement-scattered": ("placement-middle", 20.56 - 19.28, "Table 4: scattered 20.56, middle 19.28"),
    "base-fixed-routing": ("base", 19.41 - 20.04, "Table 5: BASE + fixed routing 19.41, BASE 20.04"),
    "stage1-only": ("stablemoe", 19.48 - 19.28, "Table 5: stage 1 only 19.48, both stages 19.28"),
    "stage1-25pct": ("stablemoe", 19.34 - 19.28, "Table 6: stage 1 at 25% 19.34, at 10% 19.28"),
    "stage1-50pct": ("stablemoe", 19.41 - 19.28, "Table 6: stage 1 at 50% 19.41, at 10% 19.28"),
    "router-cnn": ("stablemoe", 19.39 - 19.34, "Table 6 (stage 1 at 25%): CNN 19.39, word embedding 19.34"),
    "router-transformer1": (
        "stablemoe",
        19.42 - 19.34,
        "Table 6 (stage 1 at 25%): 1-layer transformer 19.42, word embedding 19.34",
    ),
    "router-transformer2": (
        "stablemoe",
        19.38 - 19.34,
        "Table 6 (stage 1 at 25%): 2-layer transformer 19.38, word embedding 19.34",
    ),
}


def load_records(root: Path) -> List[Dict[str, object]]:
    """Every record in ``root`` and in its subfolders (one level down): the folder's own by name, then each
    subfolder's; each with its path relative to ``root`` under ``"record"``."""
    out = []
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*/*.json")):
        record = json.loads(path.read_text())
        record["record"] = path.relative_to(root).as_posix()
        out.append(record)
    return out


class RecordSets(NamedTuple):
    """The records by study set: ``root`` (``--records`` itself: the main corpus at ``--experts``),
    ``experts`` (subfolder records at another expert count, by count), ``corpora`` (subfolder records of
    another corpus, by folder); ``unused``: record -> why no section reads it."""

    root: List[Dict[str, object]]
    experts: Dict[int, List[Dict[str, object]]]
    corpora: Dict[str, List[Dict[str, object]]]
    unused: Dict[str, str]


def _differing(opts, config: Dict[str, object], data: Optional[str], skip: Sequence[str] = ()) -> List[str]:
    """The shared options (:data:`SHARED`) in which ``config`` differs from ``opts``; the data is compared
    by fingerprint, only when ``data`` is known."""
    keys = []
    for k in SHARED:
        if k in skip:
            continue
        if k == "data":
            if data is not None and config.get("data") != data:
                keys.append(k)
        elif config.get(k) != getattr(opts, k):
            keys.append(k)
    return keys


def classify(opts, records: Sequence[Dict[str, object]]) -> RecordSets:
    """Sort the records of :func:`load_records` into study sets. A record whose shared options differ from
    the report's (other than the expert count or corpus its folder stands for) is in no set."""
    data = data_fingerprint(opts.data) if opts.data is not None else None
    root_data = data
    if root_data is None:  # without the data: the corpus of the folder's own records
        own = [r["config"].get("data") for r in records if "/" not in r["record"]]
        root_data = max(set(own), key=own.count) if own else None
    sets = RecordSets([], {}, {}, {})
    for r in records:
        c, folder = r["config"], r["record"].rpartition("/")[0]
        if not folder:
            where, skip = sets.root, ()
        elif c.get("experts") != opts.experts:
            where, skip = sets.experts.setdefault(c["experts"], []), ("experts",)
        elif root_data is not None and c.get("data") != root_data:
            where, skip = sets.corpora.setdefault(folder, []), ("data",)
        else:
            sets.unused[r["record"]] = "a subfolder's record of the main folder's corpus and expert count"
            continue
        # the data: the report's corpus for the folder's own records (when --data is there) and for another
        # expert count's; another corpus's is its own
        compared = None if "data" in skip else (data if not folder else root_data)
        bad = _differing(opts, c, compared, skip)
        if bad:
            sets.unused[r["record"]] = "another configuration: " + ", ".join(
                f"{k} {c.get(k)} (report: {'the data' if k == 'data' else getattr(opts, k)})" for k in bad
            )
        else:
            where.append(r)
    for group in (sets.experts, sets.corpora):
        for key in [k for k, v in group.items() if not v]:
            del group[key]
    return sets


def pick(records, label: str, max_update: int, fraction: float, study: Optional[str] = None) -> List[dict]:
    """The records of one type (label, with its own flags only) at one length and StableMoE stage-1 share
    (and study), by seed."""
    return sorted(
        (
            r
            for r in records
            if r["label"] == label
            and r["config"]["max_update"] == max_update
            and r["config"]["flags"] == list(TYPE_FLAGS.get(label, ()))
            and (r["moe_type"] != "stablemoe" or r["config"]["stage1_fraction"] == fraction)
            and (study is None or r["study"] == study)
        ),
        key=lambda r: r["seed"],
    )


def _curve_at(record: Dict[str, object], update: int) -> Optional[float]:
    return next((float(p[1]) for p in record["valid_curve"] if p[0] == update), None)


def _interpolate(record: Dict[str, object], update: float) -> Optional[float]:
    """The record's validation perplexity at ``update``, linear between its validation points (None outside)."""
    curve = sorted((p[0], p[1]) for p in record["valid_curve"])
    for (u0, p0), (u1, p1) in zip(curve, curve[1:]):
        if u0 <= update <= u1:
            return p0 + (p1 - p0) * (update - u0) / (u1 - u0)
    return None


def gap_curve(ref_runs, runs, ref_cost: Optional[float] = None, cost: Optional[float] = None) -> List[tuple]:
    """``(x, difference, standard error)`` of the reference's seed-mean validation perplexity minus
    ``runs``' at each validation update u that every run of ``runs`` has: x = u, both read at u; or, with
    the costs (seconds per update), x = u x cost, the reference read at the same time (x / ref_cost
    updates, linear between its points)."""
    common = set.intersection(*(set(p[0] for p in r["valid_curve"]) for r in runs)) if runs else set()
    out = []
    for u in sorted(common):
        b = [_curve_at(r, u) for r in runs]
        if cost is None:
            x, a = u, [_curve_at(r, u) for r in ref_runs]
        else:
            x = u * cost
            a = [_interpolate(r, x / ref_cost) for r in ref_runs]
        if None in a:
            continue
        d = mean_difference(a, b)
        out.append((x, d[0], d[1]))
    return out


def measure_step_cost_file(stem: Path) -> Path:
    return Path(f"{stem}_step_cost.json")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _seeds(runs) -> str:
    return ",".join(str(r["seed"]) for r in runs)


def _threads(r) -> str:
    t = r.get("threads")
    if t is None:
        return "not recorded"
    return "/".join(map(str, t)) if isinstance(t, list) else str(t)


def _corpus_name(opts) -> str:
    data = Path(opts.data) if opts.data is not None else None
    if data is None:
        return "main corpus"
    return data.parent.name if data.name == "data-bin" else data.name


class Report:
    """The report's markdown, figures and record bookkeeping; :meth:`write` builds it all."""

    def __init__(self, opts, records: List[Dict[str, object]], argv: Sequence[str]):
        self.opts, self.records, self.argv = opts, records, argv
        self.plt = _pyplot()
        self.stem = opts.out.with_suffix("")
        self.sets = classify(opts, records)
        self.used: Dict[str, List[str]] = {}
        self.absent: List[tuple] = []  # (study, runs it lacks) of the studies without a record
        self.text: List[str] = []
        self.figures = 0
        cost_file = measure_step_cost_file(self.stem)
        self.cost_file = cost_file
        self.cost = json.loads(cost_file.read_text())["seconds_per_update"] if cost_file.exists() else {}
        o = opts
        self.frac = o.stage1_fraction
        self.main = {t: pick(self.sets.root, t, o.max_update, self.frac) for t in TYPES}
        self.main = {t: runs for t, runs in self.main.items() if runs}

    # bookkeeping

    def use(self, runs, section: str) -> None:
        for r in runs:
            sections = self.used.setdefault(r["record"], [])
            if section not in sections:
                sections.append(section)

    def figure(self, fig, suffix: str, alt: str, caption: str) -> None:
        path = Path(f"{self.stem}_{suffix}.png")
        fig.savefig(path, dpi=110)
        self.plt.close(fig)
        self.figures += 1
        self.text += [f"![{alt}]({path.name})", "", f"*Figure {self.figures}. {caption}*", ""]

    def missing(self, names: Sequence[str]) -> List[str]:
        return [f"Without a record yet: {', '.join(names)}.", ""] if names else []

    def name(self, label: str, seed: int, updates: int, fraction: Optional[float] = None) -> str:
        return Run(label, moe_type_of(label), seed, updates, self.frac if fraction is None else fraction).name

    # the report

    def write(self) -> None:
        o = self.opts
        rel = os.path.relpath(o.records, REPO) if str(o.records).startswith(str(REPO)) else str(o.records)
        folders = sorted({r["record"].rpartition("/")[0] for r in self.records} - {""})
        self.text = [
            "# StableMoE against its baselines: study results (generated)",
            "",
            f"Generated by `python examples/compare_moe_types.py {' '.join(self.argv)}` on "
            f"{time.strftime('%Y-%m-%d')} from the {len(self.records)} run records in `{rel}/`"
            + (f" and its subfolders {', '.join(f'`{f}/`' for f in folders)}" if folders else "")
            + "; the appendix lists every record and the sections that read it.",
            "",
            "Conventions: '±' after a value is the sample standard deviation over seeds (s.d., with n the "
            "number of seeds); '±' after a difference of two seed means is its standard error (s.e., "
            "sqrt(s_a^2/n_a + s_b^2/n_b): the two sets of runs taken as independent samples). Each column "
            "header says which. A difference 'A minus B' is negative where A has the lower perplexity. "
            "Perplexities are per sentencepiece token of the corpus.",
            "",
            f"Model: {o.layers} dense decoder layers, d={o.dim}, FFN {o.ffn}, {o.heads} heads, one MoE layer "
            f"of {o.experts} experts x {o.sublayers} sublayer(s) after the middle block (unless a run says "
            f"otherwise); {o.max_tokens} tokens per update ({o.tokens_per_sample}-token samples), Adam, "
            f"inverse-sqrt schedule (lr {o.lr}, warmup {o.warmup}), clip {o.clip_norm}, dropout {o.dropout}. "
            "Perplexities from `fairseq-eval-lm` on the last checkpoint (inference routing: StableMoE's "
            "distilled router) unless a section says otherwise. Fluctuation: share of validation tokens whose "
            "expert (with the routing training used at that update) changed between consecutive checkpoints; "
            "'late' is the share whose last change is past 20% of training (paper, Figure 2). Threads: the "
            "intra-op threads (`OMP_NUM_THREADS`) of a run's training processes, set by `--threads`; a run is "
            "reproduced bit for bit only with the same count ('not recorded': records made before the count "
            "was kept).",
            "",
        ]
        self.main_section()
        self.handover_section()
        self.long_section()
        self.length_section()
        self.stage1_section()
        self.experts_section()
        self.corpus_section()
        self.ablation_section()
        self.absent_section()
        self.appendix()
        o.out.parent.mkdir(parents=True, exist_ok=True)
        o.out.write_text("\n".join(self.text))
        o.out.with_suffix(".json").write_text(json.dumps(self.records, indent=1))

    def main_section(self) -> None:
        o, main = self.opts, self.main
        names = [self.name(t, s, o.max_update) for t in o.types for s in o.seeds if s not in _seed_set(main.get(t))]
        if not main:
            if "main" in o.study:
                self.absent.append(("the main comparison", names))
            return
        self.use([r for runs in main.values() for r in runs], "main")
        ref = PLOT_REFERENCE if PLOT_REFERENCE in main else next(iter(main))
        stage1_col = any(stage1_last_fluctuation(r) is not None for runs in main.values() for r in runs)
        header = [
            "type",
            "seeds",
            "valid ppl (mean ± s.d.)",
            "valid ppl by seed",
            "test ppl (mean ± s.d.)",
            f"{ref} minus it, valid ppl (± s.e.)",
            "params",
            "active",
            "threads by seed",
            "train s (mean ± s.d.)",
            "s/update side by side",
            "final fluctuation (mean ± s.d.)",
            "late >20% (mean ± s.d.)",
        ] + (["StableMoE stage-1 last pair (mean ± s.d.)"] if stage1_col else [])
        rows = []
        for t, runs in main.items():
            p = runs[0]["params"]
            rows.append(
                [
                    t,
                    _seeds(runs),
                    _mean_spread([r["valid_ppl"] for r in runs]),
                    _by_seed([r["valid_ppl"] for r in runs]),
                    _mean_spread([r["test_ppl"] for r in runs]),
                    "" if t == ref else _gap(main[ref], runs),
                    f"{p['total'] / 1e6:.2f}M",
                    f"{p['active'] / 1e6:.2f}M",
                    ", ".join(_threads(r) for r in runs),
                    _mean_spread([r.get("train_seconds") for r in runs]),
                    f"{self.cost[t]:.4f}" if t in self.cost else "n/a",
                    _mean_spread([r.get("final_fluctuation") for r in runs], 100, "%"),
                    _mean_spread([r.get("late_share") for r in runs], 100, "%"),
                ]
                + ([_mean_spread([stage1_last_fluctuation(r) for r in runs], 100, "%")] if stage1_col else [])
            )
        boundary = main[ref][0]["config"]["two_stage_updates"] if main[ref][0]["moe_type"] == "stablemoe" else None
        self.text += [
            f"## Main comparison: {o.max_update} updates, StableMoE stage 1 {_percent(self.frac)}%",
            "",
            *_table(header, rows),
            "",
            "'active': every parameter but the experts a token does not use; StableMoE's count includes its "
            "distilled router (a token-to-expert table that routes, with no FFN compute).",
            "",
            *self.missing(names),
        ]
        if self.cost:
            self.text += [
                "Training time: 'train s' is each run's own (fairseq's `train_wall`), which depends on what else "
                "ran on the machine then; 's/update side by side' is the cost per update of each type measured "
                f"side by side in one run (`--step-cost`, {self.cost_file.name}); the time axis of Figure "
                f"{self.figures + 1} is updates x that cost.",
                "",
            ]
        self.main_figure(ref, boundary)
        self.fluctuation_figure(boundary)
        self.equal_time()

    def main_figure(self, ref: str, boundary: Optional[int]) -> None:
        main, cost = self.main, self.cost
        others = [t for t in main if t != ref]
        if not others:
            return
        timed = bool(cost) and ref in cost and any(t in cost for t in others)
        rows = 2 if timed else 1
        fig, axes = self.plt.subplots(
            rows, len(others), figsize=(3.1 * len(others) + 0.6, 3.2 * rows + 0.4), sharey="row", squeeze=False
        )
        for j, t in enumerate(others):
            for i in range(rows):
                ax = axes[i][j]
                if i == 0:
                    pts = gap_curve(main[ref], main[t])
                    mark = boundary
                elif t in cost:
                    pts = gap_curve(main[ref], main[t], cost[ref], cost[t])
                    mark = None if boundary is None else boundary * cost[ref]
                else:
                    ax.text(0.5, 0.5, f"{t}: no side-by-side cost", ha="center", transform=ax.transAxes, fontsize=8)
                    ax.set_axis_off()
                    continue
                self._gap_panel(ax, pts, t, mark)
                ax.set_title(f"{ref} minus {t}" if i == 0 else f"{ref} minus {t}, equal time", fontsize=9)
                ax.set_xlabel("update" if i == 0 else "training time (s)", fontsize=8)
        for i, row in enumerate(axes):
            shown = [ax for ax in row if ax.axison]
            for ax in shown:
                ax.tick_params(labelleft=True)
            if shown:
                shown[0].set_ylabel("valid ppl difference" + ("\nat equal training time" if i else ""), fontsize=8)
        fig.suptitle(f"{ref} minus each type: validation perplexity during training", fontsize=10)
        fig.tight_layout()
        n = {len(runs) for runs in main.values()}
        caption = (
            f"Validation perplexity, {ref} minus each other type, during the main comparison "
            f"(fairseq-train's validation every {self.opts.max_update // self.opts.checkpoints} updates; seed "
            f"means over {'/'.join(map(str, sorted(n)))} seeds); band: ±1 standard error of the difference; "
            f"below 0: {ref} ahead. Dotted line: {ref}'s stage boundary (update {boundary})."
            if boundary is not None
            else f"{ref}'s validation perplexity minus each other type's; band: ±1 standard error."
        )
        if timed:
            caption += (
                f" Second row: at equal training time (paper's Figure 4), x = updates x the type's seconds per "
                f"update measured side by side, {ref} read at the same time (linear between its points)."
            )
        self.figure(fig, "main", "main comparison: perplexity differences", caption)

    def _gap_panel(self, ax, pts, t: str, boundary: Optional[float]) -> None:
        """One type's difference curve with its ±1 s.e. band, the zero line and the stage boundary."""
        ax.axhline(0, color="0.5", linewidth=0.8)
        if boundary is not None:
            ax.axvline(boundary, color="0.3", linestyle=":", linewidth=1.2)
            ax.annotate(
                "stage boundary",
                (boundary, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                fontsize=6.5,
                color="0.3",
            )
        if not pts:
            return
        xs, ds, ses = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ds, **type_style(t, markersize=4))
        if None not in ses:
            ax.fill_between(
                xs,
                [d - s for d, s in zip(ds, ses)],
                [d + s for d, s in zip(ds, ses)],
                color=TYPE_STYLE[t][0],
                alpha=0.2,
            )
        ax.tick_params(labelsize=7)

    def fluctuation_figure(self, boundary: Optional[int]) -> None:
        main = {t: runs for t, runs in self.main.items() if all(r.get("fluctuation") for r in runs)}
        if not main:
            return
        fig, (ax_pair, ax_last) = self.plt.subplots(1, 2, figsize=(12, 4.4))
        for t, runs in main.items():
            label = f"{t} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            for ax, points, scale in (
                (ax_pair, lambda r: r["fluctuation"], 100),
                (
                    ax_last,
                    lambda r: (
                        list(zip(r["last_fluctuation"]["update_pct"], r["last_fluctuation"]["cumulative_share"]))
                        if r.get("last_fluctuation")
                        else []
                    ),
                    100,
                ),
            ):
                pts = _per_update(runs, points)
                if not pts:
                    continue
                means = [scale * statistics.mean(v) for _, v in pts]
                sd = [scale * statistics.stdev(v) for _, v in pts] if len(runs) > 1 else None
                ax.errorbar([x for x, _ in pts], means, yerr=sd, capsize=2, label=label, **type_style(t))
        if boundary is not None:
            ax_pair.axvline(boundary, color="0.3", linestyle=":", linewidth=1.2, label=f"stage boundary ({boundary})")
            pct = 100 * self.frac
            ax_last.axvline(
                pct, color="0.3", linestyle=":", linewidth=1.2, label=f"stage boundary ({_percent(self.frac)}%)"
            )
        ax_pair.set(xlabel="update (checkpoint)", ylabel="tokens whose expert changed (%)")
        ax_pair.set_title("fluctuation since the previous checkpoint", fontsize=10)
        ax_last.set(xlabel="training progress (%)", ylabel="tokens that no longer change (%)")
        ax_last.set_title("last fluctuation step (paper's Figures 2 and 7)", fontsize=10)
        ax_pair.legend(fontsize=7, loc="upper right")
        ax_last.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        self.figure(
            fig,
            "fluctuation",
            "main comparison: routing fluctuation",
            "Routing fluctuation on the validation tokens in the main comparison, seed means (error bars: ±1 "
            "s.d. over seeds). Left: share of tokens whose expert changed since the previous checkpoint (a "
            "StableMoE point past the dotted line compares the backbone's routing before the boundary with the "
            "frozen router's after it). Right: share of tokens whose expert no longer changes after that point "
            "of training. Markers shrink along the types so that coinciding lines stay visible.",
        )

    def equal_time(self) -> None:
        o, main, cost = self.opts, self.main, self.cost
        fastest = min((t for t in main if t in cost), key=lambda t: cost[t], default=None)
        if fastest is None:
            return
        budget = o.max_update * cost[fastest]
        self.text += [
            f"At equal training time ({fastest}'s {o.max_update} updates, {budget:.0f} s at the side-by-side "
            "cost; fairseq-train's validation perplexity, seed mean, interpolated between validation "
            "points): "
            + ", ".join(
                f"{t} {v:.2f} ({budget / cost[t]:.0f} updates)"
                for t, v in ((t, at_time(main[t], budget, cost[t])) for t in main if t in cost)
                if v is not None
            ),
            "",
        ]

    def handover_rows(self, runs_by_key, key_cells) -> List[List[str]]:
        rows = []
        for key, runs in runs_by_key:
            runs = [r for r in runs if r.get("handover")]
            if not runs:
                continue
            h = lambda k: [r["handover"][k] for r in runs]  # noqa: E731
            rows.append(
                [
                    *key_cells(key),
                    _seeds(runs),
                    _mean_spread(h("agree_majority"), 100, "%"),
                    _mean_spread(h("agree_backbone"), 100, "%"),
                    _mean_spread(h("ceiling"), 100, "%"),
                    _mean_spread([r["boundary_change"] for r in runs], 100, "%"),
                    _mean_spread([1 - r["handover"]["ceiling"] for r in runs], 100, "%"),
                    _mean_spread([r["stage2_max_load"] for r in runs]),
                ]
            )
        return rows

    HANDOVER_HEADER = [
        "seeds",
        "agrees w/ majority (mean ± s.d.)",
        "agrees w/ backbone (mean ± s.d.)",
        "ceiling (mean ± s.d.)",
        "changed at boundary (mean ± s.d.)",
        "1 - ceiling (mean ± s.d.)",
        "stage-2 load (mean ± s.d.)",
    ]

    HANDOVER_TERMS = (
        "Hand-over, read from each StableMoE run's boundary checkpoint and its last one. Over the refit window "
        "(the last half of stage 1): 'agrees w/ majority', the share of tokens whose frozen expert is their "
        "id's most frequent backbone expert; 'agrees w/ backbone', the share the frozen table routes as the "
        "backbone routed them; 'ceiling', the share whose backbone expert is their id's most frequent one "
        "(the best a token-id router can reach). 'changed at boundary': validation tokens whose expert "
        "changes across the boundary (the backbone at the boundary against the frozen routing), beside "
        "1 - ceiling. 'stage-2 load': max over mean load of the frozen routing on the validation split at "
        "the end."
    )

    def handover_section(self) -> None:
        o, root = self.opts, self.sets.root
        keys = [("main", o.max_update)] + [
            ("long", u) for u in sorted({r["config"]["max_update"] for r in root if r["study"] == "long"})
        ]
        groups = [
            ((label, u), pick(root, label, u, self.frac, None if study == "main" else "long"))
            for study, u in keys
            for label in ("stablemoe", "stablemoe-refit")
        ]
        rows = []
        for (label, u), runs in groups:
            runs = [r for r in runs if r.get("handover")]
            if not runs:
                continue
            self.use(runs, "hand-over")
            study = "main" if u == o.max_update else "long"
            row = self.handover_rows([((label, u), runs)], lambda k: [k[0], str(k[1])])[0]
            gaps = [
                _gap(runs, pick(root, other, u, self.frac, None if study == "main" else "long"))
                for other in ("hash", "base")
            ]
            rows.append(
                row + [_mean_spread([r["valid_ppl"] for r in runs]), _mean_spread([r["test_ppl"] for r in runs]), *gaps]
            )
        if not rows:
            return
        self.text += [
            "## Stage hand-over: StableMoE and exact distillation (`stablemoe-refit`, `--distill-refit`)",
            "",
            self.HANDOVER_TERMS + " Gaps: valid ppl minus the type's at the same length.",
            "",
            *_table(
                [
                    "type",
                    "updates",
                    *self.HANDOVER_HEADER,
                    "valid ppl (mean ± s.d.)",
                    "test ppl (mean ± s.d.)",
                    "minus hash, valid (± s.e.)",
                    "minus base, valid (± s.e.)",
                ],
                rows,
            ),
            "",
        ]

    def long_section(self) -> None:
        o, root = self.opts, self.sets.root
        lengths = sorted({r["config"]["max_update"] for r in root if r["study"] == "long"})
        expected = {}
        if "long" in o.study:
            expected[o.long_update] = (o.long_types, o.long_seeds)
        for u, (types, seeds) in PLANNED["long"].items():
            expected.setdefault(u, (types, seeds))
        present = lambda t, u: pick(root, t, u, self.frac, "long")  # noqa: E731
        names = [
            self.name(t, s, u)
            for u, (types, seeds) in sorted(expected.items())
            for t in types
            for s in seeds
            if s not in _seed_set(present(t, u))
        ]
        if not lengths:
            if expected:
                self.absent.append(("longer training", names))
            return
        types = [t for t in TYPES if any(present(t, u) for u in lengths)]
        rows = []
        for t in types:
            for u in [o.max_update] + lengths:
                runs = pick(root, t, u, self.frac, None if u == o.max_update else "long")
                if not runs:
                    continue
                self.use(runs, "longer training")
                same = lambda other: pick(root, other, u, self.frac, None if u == o.max_update else "long")  # noqa: E731
                rows.append(
                    [
                        t,
                        str(u),
                        _seeds(runs),
                        _mean_spread([r["valid_ppl"] for r in runs]),
                        _by_seed([r["valid_ppl"] for r in runs]),
                        _mean_spread([r["test_ppl"] for r in runs]),
                        "" if t == "hash" else _gap(runs, same("hash")),
                        "" if t == "base" else _gap(runs, same("base")),
                    ]
                )
        self.text += [
            f"## Longer training: {', '.join(map(str, [o.max_update] + lengths))} updates "
            f"(StableMoE stage 1 at {_percent(self.frac)}%)",
            "",
            f"Each type's runs at {' and '.join(map(str, lengths))} updates beside the main comparison's "
            f"{o.max_update}; differences: the row's valid ppl minus the column type's at the same length.",
            "",
            *_table(
                [
                    "type",
                    "updates",
                    "seeds",
                    "valid ppl (mean ± s.d.)",
                    "valid ppl by seed",
                    "test ppl (mean ± s.d.)",
                    "it minus hash, valid (± s.e.)",
                    "it minus base, valid (± s.e.)",
                ],
                rows,
            ),
            "",
            *self.missing(names),
        ]

    def _length_values(self, t: str, u: int) -> Dict[int, tuple]:
        """seed -> (fairseq-train's validation ppl after u updates, record): StableMoE's own u-update run
        (its boundary is a share of the run); another type's shortest run of at least u updates (its schedule
        does not depend on the run's length, so its first u updates are its u-update run)."""
        runs = [
            r
            for r in self.sets.root
            if r["label"] == t
            and not r["config"]["flags"]
            and (r["config"]["max_update"] == u if t == "stablemoe" else r["config"]["max_update"] >= u)
            and (t != "stablemoe" or r["config"]["stage1_fraction"] == self.frac)
        ]
        out: Dict[int, tuple] = {}
        for r in sorted(runs, key=lambda r: r["config"]["max_update"]):
            v = _curve_at(r, u)
            if v is not None and r["seed"] not in out:
                out[r["seed"]] = (v, r)
        return out

    def length_table(self) -> Dict[str, object]:
        """The training-length comparison: StableMoE's own run at each length against each baseline after as
        many updates, over the seeds both have: ``{"lengths": [...], "stablemoe": {u: {seed: ppl}},
        "gaps": {t: {u: (difference, s.e. or None, seeds)}}, "values": {t: {u: mean}}}``."""
        own = [
            r
            for r in self.sets.root
            if r["label"] == "stablemoe" and not r["config"]["flags"] and r["config"]["stage1_fraction"] == self.frac
        ]
        lengths = sorted({r["config"]["max_update"] for r in own})
        table = {"lengths": lengths, "stablemoe": {}, "gaps": {}, "values": {}}
        for u in lengths:
            a = self._length_values("stablemoe", u)
            table["stablemoe"][u] = {s: v for s, (v, _) in a.items()}
            self.use([r for _, r in a.values()], "training length")
            for t in ("hash", "base", "switch", "dense"):
                b = self._length_values(t, u)
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    continue
                self.use([b[s][1] for s in seeds], "training length")
                d = mean_difference([a[s][0] for s in seeds], [b[s][0] for s in seeds])
                table["gaps"].setdefault(t, {})[u] = (d[0], d[1], seeds)
                table["values"].setdefault(t, {})[u] = statistics.mean(b[s][0] for s in seeds)
        return table

    def length_section(self) -> None:
        o = self.opts
        table = self.length_table()
        lengths = table["lengths"]
        names = [
            self.name("stablemoe", s, u)
            for u in o.lengths
            for s in o.length_seeds
            if s not in table["stablemoe"].get(u, {})
        ]
        if len(lengths) < 2 or not table["gaps"]:
            if "length" in o.study:
                self.absent.append(("the training-length comparison", names))
            return
        baselines = [t for t in ("hash", "base", "switch", "dense") if t in table["gaps"]]
        header = ["updates", "StableMoE seeds", "stablemoe (mean)"]
        for t in baselines:
            header += [f"{t} (mean)", f"stablemoe minus {t} (± s.e.)"]
        rows = []
        for u in lengths:
            a = table["stablemoe"][u]
            row = [str(u), ",".join(map(str, sorted(a))), f"{statistics.mean(a.values()):.2f}"]
            for t in baselines:
                g = table["gaps"][t].get(u)
                if g is None:
                    row += ["n/a", "n/a"]
                    continue
                cell = _fmt_difference(g[:2])
                if g[2] != sorted(a):
                    cell += f" (seeds {','.join(map(str, g[2]))})"
                row += [f"{table['values'][t][u]:.2f}", cell]
            rows.append(row)
        used = [self.records_by_name[name] for name in self.used if "training length" in self.used[name]]
        offsets = [
            _curve_at(r, r["config"]["max_update"]) - r["valid_ppl"]
            for r in used
            if _curve_at(r, r["config"]["max_update"]) is not None
        ]
        self.text += [
            f"## Training length: StableMoE against its baselines from {lengths[0]} to {lengths[-1]} updates",
            "",
            f"fairseq-train's validation perplexity at the end of a u-update run, the one measure every length "
            f"has (fairseq-eval-lm's, in the other tables, reads {min(offsets):.2f} to {max(offsets):.2f} lower "
            f"on these runs). StableMoE: its own u-update run, stage 1 at {_percent(self.frac)}% of it. The other "
            "types: their shortest run of at least u updates read at update u, which is their u-update run "
            "(their schedule does not depend on the run's length; the check table below compares the two where "
            "both exist). Each difference is over the seeds both sides have.",
            "",
            *_table(header, rows),
            "",
            "StableMoE ahead of (lower valid ppl than) each baseline, seed means, at:",
            "",
        ]
        for t in baselines:
            ahead = [u for u in lengths if u in table["gaps"][t] and table["gaps"][t][u][0] < 0]
            self.text.append(f"* {t}: {', '.join(map(str, ahead)) if ahead else 'none of the lengths run'}")
        self.text.append("")
        self.text += self.missing(names)
        self.length_check()
        self.length_figure(table, baselines)

    def length_check(self) -> None:
        """Every run of a type without stages that has a longer run of the same seed, read against it."""
        root = self.sets.root
        rows = []
        for r in root:
            if r["moe_type"] == "stablemoe" or r["config"]["flags"] or r["label"] not in TYPES:
                continue
            u = r["config"]["max_update"]
            longer = sorted(
                (
                    x
                    for x in root
                    if x["label"] == r["label"]
                    and x["seed"] == r["seed"]
                    and not x["config"]["flags"]
                    and x["config"]["max_update"] > u
                    and _curve_at(x, u) is not None
                ),
                key=lambda x: x["config"]["max_update"],
            )
            if not longer or _curve_at(r, u) is None:
                continue
            x = longer[0]
            self.use([r, x], "length check")
            rows.append(
                [
                    r["record"].removesuffix(".json"),
                    f"{_curve_at(r, u):.2f}",
                    x["record"].removesuffix(".json"),
                    f"{_curve_at(x, u):.2f}",
                    f"{_curve_at(r, u) - _curve_at(x, u):+.2f}",
                    f"{_threads(r)} / {_threads(x)}",
                ]
            )
        if rows:
            self.text += [
                "Check: a run against the next longer run of its type and seed, both read at the shorter run's "
                "last update (fairseq-train's validation ppl); the same training up to there, apart from the "
                "order of fp32 sums where the thread counts differ.",
                "",
                *_table(
                    [
                        "run",
                        "its valid ppl at its end",
                        "longer run",
                        "longer run at that update",
                        "difference",
                        "threads (run / longer)",
                    ],
                    rows,
                ),
                "",
            ]

    def length_figure(self, table, baselines) -> None:
        lengths = table["lengths"]
        ncols = 2 if len(baselines) > 1 else 1
        nrows = (len(baselines) + ncols - 1) // ncols
        fig, axes = self.plt.subplots(
            nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), sharex=True, sharey=True, squeeze=False
        )
        for k, t in enumerate(baselines):
            ax = axes[k // ncols][k % ncols]
            ax.axhline(0, color="0.5", linewidth=0.8)
            g = table["gaps"][t]
            us = [u for u in lengths if u in g]
            ax.plot(us, [g[u][0] for u in us], **type_style(t, marker="none"))
            for u in us:
                d, se, seeds = g[u]
                style = type_style(t, linestyle="none", markersize=7)
                if se is not None:
                    style["markerfacecolor"] = TYPE_STYLE[t][0]
                ax.errorbar([u], [d], yerr=None if se is None else [se], capsize=3, **style)
                ax.annotate(f"n={len(seeds)}", (u, d), textcoords="offset points", xytext=(5, 5), fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths)
            ax.set_xlim(lengths[0] / 1.3, lengths[-1] * 1.3)
            ax.tick_params(labelbottom=True, labelleft=True)
            ax.set_xticklabels([str(u) for u in lengths], fontsize=7, rotation=30)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"stablemoe minus {t}", fontsize=9)
            ax.set_ylabel("valid ppl difference", fontsize=8)
            ax.set_xlabel("training length (updates)", fontsize=8)
            ax.margins(x=0.08, y=0.15)
        for k in range(len(baselines), nrows * ncols):
            axes[k // ncols][k % ncols].axis("off")
        fig.suptitle("StableMoE minus each baseline against the length of training", fontsize=10)
        fig.tight_layout()
        self.figure(
            fig,
            "length",
            "training length: StableMoE minus its baselines",
            "StableMoE's validation perplexity minus each baseline's after u updates, u on a log scale (the "
            "training-length table's values: fairseq-train's validation at the end of a u-update run; seed means "
            "over the seeds both have, n beside each point). Filled points: ±1 standard error of the difference; "
            "hollow: one seed, no error bar. Below 0: StableMoE ahead.",
        )

    def stage1_section(self) -> None:
        o, root = self.opts, self.sets.root
        labels = ("stablemoe", "stablemoe-refit")
        candidates = [
            r
            for r in root
            if r["label"] in labels
            and r["config"]["max_update"] == o.max_update
            and r["config"]["flags"] == list(TYPE_FLAGS.get(r["label"], ()))
            and r["study"] == "main"
        ]
        fracs = sorted({r["config"]["stage1_fraction"] for r in candidates} - {self.frac})
        planned = PLANNED["stage1"]
        names = [
            self.name(t, s, o.max_update, f)
            for f, (types, seeds) in sorted(planned.items())
            for t in types
            for s in seeds
            if s not in _seed_set(pick(root, t, o.max_update, f, "main"))
        ]
        if not fracs:
            self.absent.append(("the shorter stage 1", names))
            return
        rows = []
        for t in labels:
            at_ref = pick(root, t, o.max_update, self.frac)
            for f in sorted(set(fracs) | {self.frac}):
                runs = pick(root, t, o.max_update, f) if f == self.frac else pick(root, t, o.max_update, f, "main")
                if not runs:
                    continue
                self.use(runs, "stage-1 share")
                h = [r for r in runs if r.get("handover")]
                rows.append(
                    [
                        t,
                        f"{_percent(f)}%",
                        str(runs[0]["config"]["two_stage_updates"]),
                        _seeds(runs),
                        _mean_spread([r["valid_ppl"] for r in runs]),
                        _by_seed([r["valid_ppl"] for r in runs]),
                        _mean_spread([r["test_ppl"] for r in runs]),
                        "" if f == self.frac else _gap(runs, at_ref),
                        _gap(runs, self.main.get("hash", [])),
                        _mean_spread([r["handover"]["agree_backbone"] for r in h], 100, "%"),
                        _mean_spread([r["handover"]["ceiling"] for r in h], 100, "%"),
                        _mean_spread([r["boundary_change"] for r in h], 100, "%"),
                        _mean_spread([1 - r["handover"]["ceiling"] for r in h], 100, "%"),
                    ]
                )
        self.text += [
            f"## Shorter stage 1: {', '.join(_percent(f) + '%' for f in fracs)} beside {_percent(self.frac)}% "
            f"({o.max_update} updates)",
            "",
            "StableMoE and `stablemoe-refit` with stage 1 over the first share of training given; differences: "
            f"valid ppl minus the same type's at {_percent(self.frac)}%, and minus hash layers' ({o.max_update} "
            "updates, main comparison). Hand-over columns as in the hand-over table.",
            "",
            *_table(
                [
                    "type",
                    "stage 1",
                    "boundary (update)",
                    "seeds",
                    "valid ppl (mean ± s.d.)",
                    "valid ppl by seed",
                    "test ppl (mean ± s.d.)",
                    f"minus the {_percent(self.frac)}% runs, valid (± s.e.)",
                    "minus hash, valid (± s.e.)",
                    "agrees w/ backbone (mean ± s.d.)",
                    "ceiling (mean ± s.d.)",
                    "changed at boundary (mean ± s.d.)",
                    "1 - ceiling (mean ± s.d.)",
                ],
                rows,
            ),
            "",
            *self.missing(names),
        ]

    def experts_section(self) -> None:
        o = self.opts
        planned = PLANNED["experts"]
        groups = {o.experts: self.sets.root, **self.sets.experts}
        present = lambda n, t: pick(groups.get(n, []), t, o.max_update, self.frac, "main")  # noqa: E731
        names = [
            f"experts{n}/{self.name(t, s, o.max_update)}"
            for n, (types, seeds) in sorted(planned.items())
            for t in types
            for s in seeds
            if s not in _seed_set(present(n, t))
        ]
        if not self.sets.experts:
            self.absent.append(("the expert count", names))
            return
        counts = sorted(groups)
        types = [t for t in TYPES if any(present(n, t) for n in self.sets.experts)]
        rows, fig5, handover = [], [], []
        for n in counts:
            ref = present(n, "stablemoe") if n != o.experts else self.main.get("stablemoe", [])
            for t in types:
                runs = present(n, t) if n != o.experts else self.main.get(t, [])
                if not runs:
                    continue
                self.use(runs, "expert count")
                p = runs[0]["params"]
                rows.append(
                    [
                        str(n),
                        t,
                        _seeds(runs),
                        _mean_spread([r["valid_ppl"] for r in runs]),
                        _by_seed([r["valid_ppl"] for r in runs]),
                        _mean_spread([r["test_ppl"] for r in runs]),
                        f"{p['total'] / 1e6:.2f}M",
                        f"{p['active'] / 1e6:.2f}M",
                        "" if t == "stablemoe" else _gap(ref, runs),
                    ]
                )
            base2n = present(2 * n, "base") if 2 * n != o.experts else self.main.get("base", [])
            if ref and base2n:
                fig5.append([str(n), str(2 * n), _seeds(ref), _seeds(base2n), _gap(ref, base2n)])
            handover += self.handover_rows([(n, ref)], lambda k: [str(k)])
        self.text += [
            f"## Expert count: {', '.join(map(str, counts))} experts ({o.max_update} updates)",
            "",
            f"The main comparison's model and schedule with N experts of the same size (the active parameters per "
            f"token stay the same); N={o.experts} is the main comparison, the others are in "
            f"{', '.join(f'`experts{n}/`' for n in sorted(self.sets.experts))}.",
            "",
            *_table(
                [
                    "experts",
                    "type",
                    "seeds",
                    "valid ppl (mean ± s.d.)",
                    "valid ppl by seed",
                    "test ppl (mean ± s.d.)",
                    "params",
                    "active",
                    "stablemoe minus it, valid (± s.e.)",
                ],
                rows,
            ),
            "",
        ]
        if fig5:
            self.text += [
                "The paper's Figure 5 comparison, StableMoE with N experts against BASE layers with 2N (the paper: "
                "StableMoE with 16 beats BASE with 32; with 32 it matches BASE with 64):",
                "",
                *_table(
                    [
                        "StableMoE experts",
                        "BASE experts",
                        "StableMoE seeds",
                        "BASE seeds",
                        "stablemoe minus base, valid (± s.e.)",
                    ],
                    fig5,
                ),
                "",
            ]
        if handover:
            self.text += [
                "StableMoE's hand-over at each N (terms as in the hand-over table):",
                "",
                *_table(["experts", *self.HANDOVER_HEADER], handover),
                "",
            ]
        self.text += self.missing(names)
        self.experts_figure(groups, counts, types)

    def experts_figure(self, groups, counts, types) -> None:
        o = self.opts
        runs_of = lambda n, t: (  # noqa: E731
            self.main.get(t, []) if n == o.experts else pick(groups.get(n, []), t, o.max_update, self.frac, "main")
        )
        fig, (ax_ppl, ax_gap) = self.plt.subplots(1, 2, figsize=(11, 4.8))
        for k, t in enumerate(types):
            pts = [(n, [r["valid_ppl"] for r in runs_of(n, t)]) for n in counts if runs_of(n, t)]
            shift = 2 ** (0.04 * (k - (len(types) - 1) / 2))  # side by side, not on top of each other
            ax_ppl.errorbar(
                [n * shift for n, _ in pts],
                [statistics.mean(v) for _, v in pts],
                yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                capsize=3,
                label=t,
                **type_style(t),
            )
        comparisons = [(t, lambda n, t=t: n, f"stablemoe minus {t}") for t in types if t != "stablemoe"]
        if "base" in types:
            comparisons.append(("base", lambda n: 2 * n, "stablemoe (N) minus base (2N)"))
        for k, (t, other_n, label) in enumerate(comparisons):
            pts = []
            for n in counts:
                a, b = runs_of(n, "stablemoe"), runs_of(other_n(n), t)
                d = mean_difference([r["valid_ppl"] for r in a], [r["valid_ppl"] for r in b])
                if d is not None:
                    pts.append((n, d))
            if not pts:
                continue
            shift = 2 ** (0.04 * (k - (len(comparisons) - 1) / 2))
            style = type_style(t, **({"linestyle": "--"} if "2N" in label else {}))
            if "2N" in label:
                style["markerfacecolor"] = TYPE_STYLE[t][0]
            ax_gap.errorbar(
                [n * shift for n, _ in pts],
                [d[0] for _, d in pts],
                yerr=[d[1] or 0 for _, d in pts],
                capsize=3,
                label=label,
                **style,
            )
        for ax in (ax_ppl, ax_gap):
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts)
            ax.set_xticklabels([str(n) for n in counts])
            ax.set_xlabel("experts N")
        ax_gap.axhline(0, color="0.5", linewidth=0.8)
        ax_ppl.set_ylabel("valid ppl")
        ax_ppl.set_title("validation perplexity against the expert count", fontsize=10)
        ax_gap.set_ylabel("valid ppl difference")
        ax_gap.set_title("StableMoE minus each baseline", fontsize=10)
        for ax in (ax_ppl, ax_gap):
            ax.margins(x=0.12)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
        fig.tight_layout()
        self.figure(
            fig,
            "experts",
            "expert count",
            f"Left: validation perplexity (fairseq-eval-lm) against the number of experts, {o.max_update} updates, "
            "seed means with ±1 s.d. over seeds. Right: StableMoE minus each baseline at the same N, and minus BASE "
            "layers with twice the experts (the paper's Figure 5), ±1 standard error of the difference; below 0: "
            "StableMoE ahead. Points are shifted sideways a little so that their bars do not overlap.",
        )

    def corpus_section(self) -> None:
        o = self.opts
        corpora = self.sets.corpora
        for name, (types, seeds) in PLANNED["corpus"].items():
            if name not in corpora:
                self.absent.append(
                    (
                        f"the second corpus ({name})",
                        [f"{name}/{self.name(t, s, o.max_update)}" for t in types for s in seeds],
                    )
                )
        main_name = _corpus_name(o)
        for name, records in corpora.items():
            runs = {t: pick(records, t, o.max_update, self.frac, "main") for t in TYPES}
            runs = {t: v for t, v in runs.items() if v}
            types, seeds = PLANNED["corpus"].get(name, (tuple(runs), ()))
            names = [
                f"{name}/{self.name(t, s, o.max_update)}"
                for t in types
                for s in seeds
                if s not in _seed_set(runs.get(t))
            ]
            if not runs:
                self.absent.append((f"the second corpus ({name})", names))
                continue
            rows = []
            for t in [t for t in TYPES if t in runs or (t in self.main and t in types)]:
                here, there = self.main.get(t, []), runs.get(t, [])
                self.use(there, f"second corpus ({name})")
                rows.append(
                    [
                        t,
                        _seeds(here),
                        _mean_spread([r["valid_ppl"] for r in here]),
                        "" if t == "stablemoe" else _gap(self.main.get("stablemoe", []), here),
                        _seeds(there) or "-",
                        _mean_spread([r["valid_ppl"] for r in there]),
                        _mean_spread([r["test_ppl"] for r in there]),
                        "" if t == "stablemoe" else _gap(runs.get("stablemoe", []), there),
                    ]
                )
            handover = self.handover_rows(
                [((main_name, t), self.main.get(t, [])) for t in ("stablemoe", "stablemoe-refit")]
                + [((name, t), runs.get(t, [])) for t in ("stablemoe", "stablemoe-refit")],
                lambda k: list(k),
            )
            self.text += [
                f"## Second corpus: {name} beside {main_name} ({o.max_update} updates)",
                "",
                f"The main comparison's model, schedule and types on the corpus of `{name}/` (its own sentencepiece "
                "model of the same size). Perplexities are per piece of each corpus's own vocabulary: compare "
                "differences across corpora, not values.",
                "",
                *_table(
                    [
                        "type",
                        f"{main_name} seeds",
                        f"{main_name} valid ppl (mean ± s.d.)",
                        f"{main_name}: stablemoe minus it (± s.e.)",
                        f"{name} seeds",
                        f"{name} valid ppl (mean ± s.d.)",
                        f"{name} test ppl (mean ± s.d.)",
                        f"{name}: stablemoe minus it (± s.e.)",
                    ],
                    rows,
                ),
                "",
            ]
            if handover:
                self.text += [
                    "Hand-over on each corpus (terms as in the hand-over table):",
                    "",
                    *_table(["corpus", "type", *self.HANDOVER_HEADER], handover),
                    "",
                ]
            self.text += self.missing(names)

    def ablation_section(self) -> None:
        o, root = self.opts, self.sets.root
        ablations = [r for r in root if r["study"] == "ablations" and r["config"]["max_update"] == o.ablation_update]
        names = [
            r.name
            for s in o.ablation_seeds
            for r in ablation_runs(o, s)
            if not any(x["record"] == f"{r.name}.json" for x in ablations)
        ]
        if not ablations:
            if "ablations" in o.study:
                self.absent.append(("the ablations", names))
            return
        self.use(ablations, "ablations")
        order = [r.label for r in ablation_runs(o, 1)]
        labels = sorted(
            dict.fromkeys(r["label"] for r in ablations),
            key=lambda x: (x not in order, order.index(x) if x in order else x),
        )
        by_label = {
            label: sorted((r for r in ablations if r["label"] == label), key=lambda r: r["seed"]) for label in labels
        }
        mean = lambda label: statistics.mean(r["valid_ppl"] for r in by_label[label])  # noqa: E731
        rows, bars = [], []
        for label, runs in by_label.items():
            c = runs[0]["config"]
            ref, paper, source = PAPER_DELTA.get(label, (None, None, ""))
            delta = mean(label) - mean(ref) if ref in by_label else None
            rows.append(
                [
                    label,
                    f"`{' '.join(c['flags']) or '-'}`",
                    f"{_percent(c['stage1_fraction'])}%",
                    _seeds(runs),
                    _mean_spread([r["valid_ppl"] for r in runs]),
                    _mean_spread([r["test_ppl"] for r in runs]),
                    f"{mean(label) - mean('stablemoe'):+.2f}" if "stablemoe" in by_label else "n/a",
                    ref or "-",
                    "-" if delta is None else f"{delta:+.2f}",
                    "-" if paper is None else f"{paper:+.2f} ({source})",
                    _mean_spread([r.get("final_fluctuation") for r in runs], 100, "%"),
                    _mean_spread([r.get("late_share") for r in runs], 100, "%"),
                    _mean_spread([stage1_last_fluctuation(r) for r in runs], 100, "%"),
                ]
            )
            if delta is not None:
                bars.append((label, ref, delta, paper, runs[0]["moe_type"], source.split(":")[0]))
        seeds = sorted({r["seed"] for r in ablations})
        self.text += [
            f"## Ablations: {o.ablation_update} updates (paper: Tables 4, 5, 6)",
            "",
            "Each run against its reference run as in the paper's tables (the placements against 3 sublayers "
            "after the middle block, BASE + fixed routing against BASE layers, the others against StableMoE); "
            "'paper's difference': the same pair in the paper (base setting, 60K updates, valid ppl). Fluctuation "
            "columns as in the main table; 'stage-1 last pair': StableMoE's routing between the last two "
            "checkpoints before the boundary. `stage1-only` keeps stage 1 to its last update: its boundary is the "
            "end of training, its last checkpoint routes with the frozen router, and its final fluctuation is the "
            "hand-over, not stage-1 routing.",
            "",
            *_table(
                [
                    "run",
                    "flags",
                    "stage 1",
                    "seeds",
                    "valid ppl",
                    "test ppl",
                    "minus stablemoe",
                    "reference",
                    "minus the reference",
                    "paper's difference",
                    "final fluctuation",
                    "late >20%",
                    "stage-1 last pair",
                ],
                rows,
            ),
            "",
            *self.missing(names),
        ]
        if bars:
            self.ablation_figure(bars, seeds)

    def ablation_figure(self, bars, seeds) -> None:
        o = self.opts
        fig, ax = self.plt.subplots(figsize=(9, 0.55 * len(bars) + 1.6))
        ys = list(range(len(bars)))[::-1]
        spread = [r["valid_ppl"] for r in self.main.get("stablemoe", [])]
        if len(spread) > 1:
            k = math.sqrt(2) * statistics.stdev(spread)
            ax.axvspan(
                -k,
                k,
                color="0.85",
                label=f"±√2 s.d. of StableMoE's {o.max_update}-update seeds (±{k:.2f}): a one-seed difference's s.d.",
            )
        ax.axvline(0, color="0.4", linewidth=0.8)
        for y, (label, ref, delta, paper, moe_type, _) in zip(ys, bars):
            color = TYPE_STYLE["base" if moe_type == "base" else "stablemoe"][0]
            ax.barh(y + 0.18, delta, height=0.34, color=color, label="_")
            ax.annotate(
                f"{delta:+.2f}",
                (delta, y + 0.18),
                xytext=(3 if delta >= 0 else -3, 0),
                textcoords="offset points",
                ha="left" if delta >= 0 else "right",
                va="center",
                fontsize=7,
            )
            if paper is not None:
                ax.barh(y - 0.18, paper, height=0.34, color="white", edgecolor=color, hatch="///", label="_")
                ax.annotate(
                    f"{paper:+.2f}",
                    (paper, y - 0.18),
                    xytext=(3 if paper >= 0 else -3, 0),
                    textcoords="offset points",
                    ha="left" if paper >= 0 else "right",
                    va="center",
                    fontsize=7,
                )
        from matplotlib.patches import Patch

        handles, _ = ax.get_legend_handles_labels()
        handles += [
            Patch(
                color=TYPE_STYLE["stablemoe"][0],
                label=f"this study: {o.ablation_update} updates, seed {','.join(map(str, seeds))} "
                "(BASE runs in BASE's colour)",
            ),
            Patch(facecolor="white", edgecolor="0.3", hatch="///", label="paper: 60K updates, base setting"),
        ]
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{label} minus {ref}\n({where})" for label, ref, _, _, _, where in bars], fontsize=7.5)
        ax.set_xlabel("valid ppl difference (above 0: worse than the reference)")
        ax.set_title("ablations: difference to the reference run, this study and the paper", fontsize=10)
        ax.margins(x=0.15)
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09 * 12 / (len(bars) + 3)))
        fig.tight_layout()
        self.figure(
            fig,
            "ablations",
            "ablations against the paper",
            "Each ablation's validation perplexity minus its reference run's (solid) beside the paper's difference "
            "for the same pair (hatched; Tables 2, 4, 5 and 6, base setting). The paper's router rows are at stage "
            "1 of 25%, this study's at the reference's share. Grey band: the seed spread a one-seed difference "
            "has at the main comparison's length.",
        )

    def absent_section(self) -> None:
        absent = [(study, names) for study, names in self.absent if names]
        if not absent:
            return
        self.text += ["## Runs without records", "", "Studies with no record yet, and the runs they need:", ""]
        self.text += [f"* {study}: {', '.join(names)}" for study, names in absent]
        self.text.append("")

    def appendix(self) -> None:
        rows = []
        for r in self.records:
            c = r["config"]
            sections = self.used.get(r["record"])
            why = (
                ", ".join(sections)
                if sections
                else "none: " + self.sets.unused.get(r["record"], "no section's study, length or flags")
            )
            rows.append(
                [
                    f"`{r['record']}`",
                    r["label"],
                    r["study"],
                    str(r["seed"]),
                    str(c["max_update"]),
                    f"{_percent(c['stage1_fraction'])}%" if r["moe_type"] == "stablemoe" else "-",
                    str(c.get("experts")),
                    _threads(r),
                    f"{r['valid_ppl']:.2f}",
                    f"{r['test_ppl']:.2f}",
                    why,
                ]
            )
        self.text += [
            "## Appendix: every record",
            "",
            f"All {len(self.records)} records, one row each, with the sections that read them (valid and test ppl: "
            "fairseq-eval-lm).",
            "",
            *_table(
                [
                    "record",
                    "label",
                    "study",
                    "seed",
                    "updates",
                    "stage 1",
                    "experts",
                    "threads",
                    "valid ppl",
                    "test ppl",
                    "read by",
                ],
                rows,
            ),
            "",
        ]

    @property
    def records_by_name(self) -> Dict[str, Dict[str, object]]:
        return {r["record"]: r for r in self.records}


def _seed_set(runs) -> set:
    return {r["seed"] for r in runs or ()}


def _per_update(runs: Sequence[Dict[str, object]], points) -> List[tuple]:
    """``(x, [value of each run])`` at the x every run has; ``points(run)`` gives a run's ``[[x, value], ...]``."""
    series = [{p[0]: p[1] for p in points(r)} for r in runs]
    common = set.intersection(*(set(s) for s in series)) if series else set()
    return [(x, [s[x] for s in series]) for x in sorted(common)]


def write_report(opts, records: List[Dict[str, object]], argv: Sequence[str]) -> None:
    """The report (``--out``), its JSON (every record, with its path under ``"record"``) and its figures."""
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    Report(opts, records, argv).write()


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    """The study's options from ``argv`` (lists parsed, checked; the work directory made)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "runs/shakespeare/data-bin")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="the runs' checkpoints and logs (default: runs/study; with another --records inside "
        "docs/study_runs, runs/study/ and that subfolder's path, e.g. runs/study/experts16)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the report; its .json (every record) and _*.png plots go beside it (default: "
        "docs/study_results.md for --report-only and --step-cost with the default --records; otherwise "
        "WORK/report.md, so that a partial study does not overwrite the full report)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=DEFAULT_RECORDS,
        help="one JSON record per finished run, kept in the repository: a later run of the command reuses "
        "them (the work directory with the checkpoints need not survive). The report reads this folder and "
        "its subfolders: records at another --experts (e.g. docs/study_runs/experts16) or of another --data "
        "(e.g. docs/study_runs/sotu) go in a subfolder of their own",
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
    parser.add_argument("--experts", type=int, default=8, help="experts of the MoE layer (each keeps its size)")
    parser.add_argument("--sublayers", type=int, default=1, help="sublayers per expert")
    parser.add_argument("--tokens-per-sample", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clip-norm", type=float, default=0.1, help="the paper's 0.1")
    parser.add_argument("--dropout", type=float, default=0.0, help="the paper's 0")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS and MKL_NUM_THREADS of the training and evaluation subprocesses (each record "
        "keeps the count its training got: the thread count changes the order of fp32 sums)",
    )
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
        help="write the report from every record in --records and its subfolders; train nothing, and need no "
        "data (the data's fingerprint is checked when --data exists)",
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
    if opts.threads < 1:
        parser.error("--threads must be at least 1")
    if opts.work is None:
        records = opts.records.resolve()
        inside = records != DEFAULT_RECORDS and DEFAULT_RECORDS in records.parents
        opts.work = REPO / "runs/study" / (records.relative_to(DEFAULT_RECORDS) if inside else "")
        if records != DEFAULT_RECORDS and not inside:
            opts.work = REPO / "runs" / f"study-{records.name}"
    if opts.out is None:
        full = (opts.report_only or opts.step_cost) and opts.records.resolve() == DEFAULT_RECORDS
        opts.out = REPO / "docs/study_results.md" if full else opts.work / "report.md"
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
        for problem in conflicts(opts, runs):
            print(f"refused: {problem}")
        return
    if opts.step_cost:
        measured = measure_step_cost(opts, opts.step_cost, opts.step_cost_rounds)
        measured["command"] = "python examples/compare_moe_types.py " + " ".join(argv)
        measured["date"] = time.strftime("%Y-%m-%d")
        measured["threads"] = opts.threads
        path = Path(f"{opts.out.with_suffix('')}_step_cost.json")
        path.write_text(json.dumps(measured, indent=1))
        print(f"[step-cost] {measured['seconds_per_update']} -> {path}")
        return
    if opts.report_only:
        records = load_records(opts.records)
        write_report(opts, records, argv)
        print(f"[study] report of {len(records)} records: {opts.out}")
        return
    problems = conflicts(opts, runs)
    if problems:
        sys.exit(
            "compare_moe_types.py: " + "; ".join(problems) + ". Keep another corpus's or expert count's runs in "
            "their own records folder (--records docs/study_runs/NAME; their work directory follows it), and "
            "leave out of --types the types whose runs exist with another --stage1-fraction."
        )
    start, results = time.time(), []
    for i, run in enumerate(runs):
        if opts.stop_after is not None and time.time() - start > opts.stop_after * 3600:
            print(
                f"[study] --stop-after {opts.stop_after}h reached: {len(runs) - i} runs left: run the same "
                "command again to go on"
            )
            break
        print(f"[study] run {i + 1}/{len(runs)}", flush=True)
        with open(opts.work / f"{run.name}.lock", "w") as lock:
            try:  # held while another study command on this machine trains the run: leave it to that one
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[study] {run.name}: another study command is running it; skipped", flush=True)
                continue
            results.append(run_one(opts, run))
    write_report(opts, load_records(opts.records), argv)
    print(f"[study] {len(results)} runs done; report of every record in {opts.records}: {opts.out}")


if __name__ == "__main__":
    main()
