"""The study's report (``examples/compare_moe_types.py --report-only``) against direct computations.

Synthetic run records (random perplexities and fluctuation figures, each with the configuration
the script itself gives the run) are written where the script keeps them; the report's tables
must hold the mean and sample standard deviation of exactly the records whose configuration
matches (a record of another configuration is left out), the ablations' differences to the
StableMoE reference, and the length sweep's per-length values and gaps for the sweep's seed.
"""

import json
import random
import re
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compare_moe_types as study  # noqa: E402


def _valid_at(run, u):
    """Validation ppl after ``u`` updates: the same in every run of a baseline type and seed (its schedule
    does not depend on the run's length), particular to the run for StableMoE (its boundary does)."""
    key = (run.moe_type, run.seed, u) if run.moe_type != "stablemoe" else (run.name, u)
    return random.Random(str(key)).uniform(60, 200)


def _record(opts, run, rng):
    record = {
        "moe_type": run.moe_type,
        "label": run.label,
        "study": run.study,
        "seed": run.seed,
        "valid_ppl": rng.uniform(60, 70),
        "test_ppl": rng.uniform(60, 70),
        "params": {"total": 3_000_000, "active": 2_000_000},
        "train_seconds": rng.uniform(400, 500),
        "valid_curve": [[u, _valid_at(run, u), u * 0.2] for u in range(50, run.max_update + 1, 50)],
        "config": study.run_config(opts, run),
    }
    if run.moe_type != "dense":
        record.update(
            fluctuation=[[u, rng.random()] for u in range(50, run.max_update + 1, 50)],
            final_fluctuation=rng.random(),
            late_share=rng.random(),
            last_fluctuation={"update_pct": [0, 50, 100], "cumulative_share": [0.1, 0.5, 1.0]},
        )
    if study.keeps_boundary(run):
        record.update(
            handover={
                "agree_majority": rng.random(),
                "agree_backbone": rng.random(),
                "ceiling": rng.random(),
                "tokens": 1000.0,
                "refit_updates": 15.0,
            },
            boundary_change=rng.random(),
            stage2_max_load=rng.uniform(1, 2),
        )
    return record


def _rows(text: str, heading: str):
    """The table under the section whose heading starts with ``heading``: ``{first cell: cells}``."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def _spread(values, unit=""):
    values = [float(v) for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{unit} (n={len(values)})"


def test_report_tables_match_the_records(tmp_path):
    data = tmp_path / "data-bin"
    data.mkdir()
    (data / "dict.txt").write_text("a 1\nb 1\n")
    argv = [
        "--data",
        str(data),
        "--work",
        str(tmp_path / "work"),
        "--records",
        str(tmp_path / "records"),
        "--out",
        str(tmp_path / "out" / "report.md"),
        "--study",
        "main,ablations,length,long",
        "--seeds",
        "1,2,3",
        "--max-update",
        "300",
        "--ablation-update",
        "150",
        "--lengths",
        "100,200,300",
        "--long-update",
        "600",
        "--long-seeds",
        "1,2",
    ]
    opts = study.parse_options(argv)
    rng = random.Random(0)
    records = {}
    (tmp_path / "records").mkdir()
    for run in study.plan(opts):
        records[run.name] = _record(opts, run, rng)
        (tmp_path / "records" / f"{run.name}.json").write_text(json.dumps(records[run.name]))
    # a record of another configuration under a run's name is not this study's
    stale = dict(records["hash-u300-seed2"], config=dict(records["hash-u300-seed2"]["config"], lr=1.0))
    (tmp_path / "records" / "hash-u300-seed2.json").write_text(json.dumps(stale))
    del records["hash-u300-seed2"]

    # side-by-side costs: dense the fastest; hash twice as slow, so it gets 150 updates in dense's 300-update time
    cost = {"stablemoe": 0.3, "switch": 0.3, "base": 0.3, "hash": 0.2, "dense": 0.1}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report_step_cost.json").write_text(json.dumps({"seconds_per_update": cost}))

    study.main(argv + ["--report-only"])
    text = (tmp_path / "out" / "report.md").read_text()
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(r["label"] + str(r["seed"]) + str(r["config"]["max_update"]) for r in written) == sorted(
        r["label"] + str(r["seed"]) + str(r["config"]["max_update"]) for r in records.values()
    )

    main = _rows(text, "Main comparison")
    for t in study.TYPES:
        runs = [r for r in records.values() if r["study"] == "main" and r["label"] == t]
        assert main[t][1] == ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        assert main[t][2] == _spread(r["valid_ppl"] for r in runs)
        assert main[t][3] == _spread(r["test_ppl"] for r in runs)
        if t != "dense":
            assert main[t][8] == _spread((100 * r["final_fluctuation"] for r in runs), "%")
            assert main[t][9] == _spread((100 * r["late_share"] for r in runs), "%")
    assert main["hash"][1] == "1,3"
    equal_time = re.search(r"^At equal training time \(dense's 300 updates, 30 s.*$", text, re.M).group(0)
    for t, u in (("dense", 300), ("hash", 150), ("switch", 100)):
        seeds = [1, 3] if t == "hash" else [1, 2, 3]
        want = statistics.mean(_valid_at(study.Run(t, t, s, 300, 0.1), u) for s in seeds)
        assert f"{t} {want:.2f} ({u} updates)" in equal_time

    ablations = _rows(text, "Ablations")
    ablation = {r["label"]: r for r in records.values() if r["study"] == "ablations"}
    assert set(ablations) == set(ablation)
    for label, r in ablation.items():
        assert ablations[label][4] == f"{r['valid_ppl']:.2f}"
        assert ablations[label][6] == f"{r['valid_ppl'] - ablation['stablemoe']['valid_ppl']:+.2f}"
    # stage 1 only: the last pair of checkpoints both before the boundary (the one at it routes as stage 2)
    s1 = ablation["stage1-only"]
    boundary = s1["config"]["two_stage_updates"]
    assert boundary == 150 and [u for u, _ in s1["fluctuation"]] == [50, 100, 150]
    assert ablations["stage1-only"][9] == f"{100 * s1['fluctuation'][1][1]:.2f}%"
    assert ablations["stablemoe"][9] == "n/a"

    sweep = _rows(text, "Training-length sweep")
    assert sorted(int(u) for u in sweep) == [100, 200, 300]
    assert not [r for r in records.values() if r["study"] == "length" and r["moe_type"] != "stablemoe"]
    for u in (100, 200, 300):
        # StableMoE: its own u-update run (recorded), the others: their validation after u updates
        own = [
            r
            for r in records.values()
            if r["label"] == "stablemoe"
            and r["seed"] == 1
            and r["config"]["max_update"] == u
            and r["config"]["stage1_fraction"] == 0.1
        ]
        assert len(own) == 1
        swept = [t for t in study.TYPES if t not in study.TYPE_FLAGS]  # the sweep runs the --moe-type values
        value = {t: _valid_at(study.Run(t, t, 1, 300, 0.1), u) for t in swept if t != "stablemoe"}
        value["stablemoe"] = dict((v[0], v[1]) for v in own[0]["valid_curve"])[u]
        assert sweep[str(u)][1:6] == [f"{value[t]:.2f}" for t in swept]
        others = [t for t in swept if t != "stablemoe"]
        assert sweep[str(u)][6:] == [f"{value['stablemoe'] - value[t]:+.2f}" for t in others]
        for t in others:
            ahead = re.search(rf"^\* {t}: (.*)$", text, re.M).group(1)
            assert (str(u) in ahead.split(", ")) == (value["stablemoe"] < value[t])

    # the hand-over of every StableMoE type of the main and long studies, and the long study's gaps
    def select(label, U, study_name):
        return sorted(
            (
                r
                for r in records.values()
                if r["label"] == label and r["config"]["max_update"] == U and r["study"] == study_name
            ),
            key=lambda r: r["seed"],
        )

    def gap(a, b):
        x, y = [r["valid_ppl"] for r in a], [r["valid_ppl"] for r in b]
        se = (statistics.variance(x) / len(x) + statistics.variance(y) / len(y)) ** 0.5
        return f"{statistics.mean(x) - statistics.mean(y):+.2f} ± {se:.2f}"

    section = text.split("## Stage hand-over", 1)[1].split("\n## ", 1)[0]
    rows = {
        (c[0], c[1]): c
        for c in (
            [x.strip() for x in line.strip("|").split("|")]
            for line in section.splitlines()
            if line.startswith("| stablemoe")
        )
    }
    assert set(rows) == {(t, u) for t in ("stablemoe", "stablemoe-refit") for u in ("300", "600")}
    for (label, U), cells in rows.items():
        study_name = "main" if U == "300" else "long"
        runs = select(label, int(U), study_name)
        assert cells[2] == ",".join(str(r["seed"]) for r in runs)
        assert cells[3] == _spread((100 * r["handover"]["agree_majority"] for r in runs), "%")
        assert cells[5] == _spread((100 * r["handover"]["ceiling"] for r in runs), "%")
        assert cells[6] == _spread((100 * r["boundary_change"] for r in runs), "%")
        assert cells[7] == _spread((100 * (1 - r["handover"]["ceiling"]) for r in runs), "%")
        assert cells[8] == _spread(r["stage2_max_load"] for r in runs)
        assert cells[9] == _spread(r["valid_ppl"] for r in runs)
        assert cells[11] == gap(runs, select("hash", int(U), study_name))
        assert cells[12] == gap(runs, select("base", int(U), study_name))
    long_rows = _rows(text, "Twice the training")
    assert set(long_rows) == set(opts.long_types)
    for label, cells in long_rows.items():
        runs = select(label, 600, "long")
        assert cells[2] == _spread(r["valid_ppl"] for r in select(label, 300, "main"))
        assert cells[3] == _spread(r["valid_ppl"] for r in runs)
        assert cells[5] == ("" if label == "hash" else gap(runs, select("hash", 600, "long")))
    for plot in ("report_main.png", "report_ablations.png", "report_length.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 0
