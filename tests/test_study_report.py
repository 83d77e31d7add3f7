"""The study's report (``examples/compare_moe_types.py --report-only``) against direct computations.

Synthetic run records (random perplexities and fluctuation figures, each with the configuration the
script itself gives the run) are written where the script keeps them: the main folder, an expert-count
subfolder, a second corpus's subfolder, and runs with a shorter stage 1. The report's tables must hold
the mean and sample standard deviation of exactly the records whose configuration matches, each gap
with its standard error (computed in the test from the sums), the runs each study still lacks, one appendix row per
record file with the sections that read it, and a numbered caption under every figure. The thread
count: the training subprocesses get ``--threads``, and the record reads it back from the log.
"""

import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import compare_moe_types as study  # noqa: E402


def _valid_at(run, u, corpus=""):
    """Validation ppl after ``u`` updates: the same in every run of a baseline type and seed (its schedule
    does not depend on the run's length), particular to the run for StableMoE (its boundary does)."""
    key = (corpus, run.moe_type, run.seed, u) if run.moe_type != "stablemoe" else (corpus, run.name, u)
    return random.Random(str(key)).uniform(60, 200)


def _record(config, run, rng, corpus=""):
    record = {
        "moe_type": run.moe_type,
        "label": run.label,
        "study": run.study,
        "seed": run.seed,
        "valid_ppl": rng.uniform(60, 70),
        "test_ppl": rng.uniform(60, 70),
        "params": {"total": 3_000_000, "active": 2_000_000},
        "train_seconds": rng.uniform(400, 500),
        "threads": 1,
        "valid_curve": [[u, _valid_at(run, u, corpus), u * 0.2] for u in range(50, run.max_update + 1, 50)],
        "config": config,
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


def _section(text, heading):
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def _tables(text, heading=None):
    """The tables under the section whose heading starts with ``heading`` (of the whole text without):
    a list of ``[{header: cell}]``."""
    tables, current = [], None
    for line in (text if heading is None else _section(text, heading)).splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = {"header": cells, "rows": []}
            tables.append(current)
        elif set(line.replace("|", "")) != {"-"}:
            current["rows"].append(dict(zip(current["header"], cells)))
    return [t["rows"] for t in tables]


def _spread(values, unit=""):
    values = [float(v) for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{unit} (n={len(values)})"


def _difference(a, b):
    """Mean of a minus mean of b, ± the standard error of the difference, computed from the sums."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return f"{ma - mb:+.2f} (n=1: no s.e.)"
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    return f"{ma - mb:+.2f} ± {math.sqrt(va / len(a) + vb / len(b)):.2f}"


PLANNED = {
    "long": {1200: (("stablemoe", "hash", "base"), (1, 2))},
    "experts": {n: (("stablemoe", "hash", "base"), (1, 2)) for n in (16, 32)},
    "corpus": {"sotu": (("stablemoe", "stablemoe-refit", "hash", "base"), (1, 2, 3)), "news": (("hash",), (1,))},
    "stage1": {f: (("stablemoe", "stablemoe-refit"), (1, 2)) for f in (0.025, 0.05)},
}


@pytest.fixture
def report(tmp_path, monkeypatch):
    """Synthetic records of every study, the report made from them, and the records by path."""
    monkeypatch.setattr(study, "PLANNED", PLANNED)
    data, sotu = tmp_path / "shakespeare" / "data-bin", tmp_path / "sotu" / "data-bin"
    for d, words in ((data, "a 1\nb 1\n"), (sotu, "c 1\nd 1\n")):
        d.mkdir(parents=True)
        (d / "dict.txt").write_text(words)
    records = tmp_path / "records"
    argv = [
        "--data",
        str(data),
        "--work",
        str(tmp_path / "work"),
        "--records",
        str(records),
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
    written = {}

    def keep(path, config, run, corpus="", **fixed):
        record = dict(_record(config, run, rng, corpus), **fixed)
        (records / path).parent.mkdir(parents=True, exist_ok=True)
        (records / path).write_text(json.dumps(record))
        written[path] = record

    for run in study.plan(opts):
        keep(f"{run.name}.json", study.run_config(opts, run), run)
    # fixed values for one gap worked by hand below
    for seed, (s, h) in enumerate(((66.0, 65.0), (67.0, 65.5), (68.0, 66.0)), start=1):
        written[f"stablemoe-u300-s110-seed{seed}.json"]["valid_ppl"] = s
        written[f"hash-u300-seed{seed}.json"]["valid_ppl"] = h
    for path, record in written.items():
        (records / path).write_text(json.dumps(record))
    # twice the long study's length, base seed 2 missing
    for t, s in (("stablemoe", 1), ("stablemoe", 2), ("hash", 1), ("hash", 2), ("base", 1)):
        run = study.Run(t, t, s, 1200, 0.1, (), "long")
        keep(f"{run.name}.json", study.run_config(opts, run), run)
    # a shorter stage 1 (2.5%), without the 5% runs
    for t in ("stablemoe", "stablemoe-refit"):
        for s in (1, 2):
            run = study.Run(t, "stablemoe", s, 300, 0.025, study.TYPE_FLAGS.get(t, ()), "main")
            keep(f"{run.name}.json", study.run_config(opts, run), run)
    # 16 experts (32 missing), and the second corpus (base seed 3 missing)
    opts16 = study.parse_options(argv + ["--experts", "16"])
    opts_sotu = study.parse_options(argv + ["--data", str(sotu)])
    for folder, o, types, seeds in (
        ("experts16", opts16, ("stablemoe", "hash", "base"), (1, 2)),
        ("sotu", opts_sotu, ("stablemoe", "stablemoe-refit", "hash", "base"), (1, 2, 3)),
    ):
        for t in types:
            for s in seeds:
                if (folder, t, s) == ("sotu", "base", 3):
                    continue
                run = study.Run(t, study.moe_type_of(t), s, 300, 0.1, study.TYPE_FLAGS.get(t, ()), "main")
                keep(f"{folder}/{run.name}.json", study.run_config(o, run), run, corpus=folder)
    # a base run of its own length (the length check), a record of another configuration under a run's
    # name (not this study's), and a subfolder's copy of a main-folder record (no study set)
    run = study.Run("base", "base", 1, 200, 0.1, (), "length")
    keep(f"{run.name}.json", study.run_config(opts, run), run)
    stale = dict(written["hash-u300-seed2.json"])
    stale["config"] = dict(stale["config"], lr=1.0)
    (records / "hash-u300-seed2.json").write_text(json.dumps(stale))
    written["hash-u300-seed2.json"] = stale
    keep(
        "copies/hash-u300-seed1.json", written["hash-u300-seed1.json"]["config"], study.Run("hash", "hash", 1, 300, 0.1)
    )

    # side-by-side costs: dense the fastest; hash twice as slow, so it gets 150 updates in dense's 300-update time
    cost = {"stablemoe": 0.3, "switch": 0.3, "base": 0.3, "hash": 0.2, "dense": 0.1}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report_step_cost.json").write_text(json.dumps({"seconds_per_update": cost}))
    study.main(argv + ["--report-only"])
    text = (tmp_path / "out" / "report.md").read_text()
    valid = {p: r for p, r in written.items() if p not in ("hash-u300-seed2.json", "copies/hash-u300-seed1.json")}
    return text, valid, written, tmp_path / "out"


def _select(records, label, U, study_name=None, folder="", fraction=0.1):
    return sorted(
        (
            r
            for p, r in records.items()
            if r["label"] == label
            and r["config"]["max_update"] == U
            and (study_name is None or r["study"] == study_name)
            and p.rpartition("/")[0] == folder
            and (r["moe_type"] != "stablemoe" or r["config"]["stage1_fraction"] == fraction)
            and r["config"]["flags"] == list(study.TYPE_FLAGS.get(label, ()))
        ),
        key=lambda r: r["seed"],
    )


def test_main_comparison_and_hand_over(report):
    text, valid, written, out = report
    (main,) = _tables(text, "Main comparison")
    main = {row["type"]: row for row in main}
    for t in study.TYPES:
        runs = _select(valid, t, 300)
        assert main[t]["seeds"] == ",".join(str(r["seed"]) for r in runs)
        assert main[t]["valid ppl (mean ± s.d.)"] == _spread(r["valid_ppl"] for r in runs)
        assert main[t]["valid ppl by seed"] == " / ".join(f"{r['valid_ppl']:.2f}" for r in runs)
        assert main[t]["test ppl (mean ± s.d.)"] == _spread(r["test_ppl"] for r in runs)
        if t != "dense":
            assert main[t]["final fluctuation (mean ± s.d.)"] == _spread(
                (100 * r["final_fluctuation"] for r in runs), "%"
            )
        if t != "stablemoe":
            ref = [r["valid_ppl"] for r in _select(valid, "stablemoe", 300)]
            assert main[t]["stablemoe minus it, valid ppl (± s.e.)"] == _difference(ref, [r["valid_ppl"] for r in runs])
    # the stale record is left out (hash: seeds 1 and 3), and by hand: StableMoE 66/67/68 (mean 67, variance 1)
    # against hash 65/66 (mean 65.5, variance 0.5): +1.50 ± sqrt(1/3 + 0.5/2) = 0.76
    assert main["hash"]["seeds"] == "1,3"
    assert main["hash"]["stablemoe minus it, valid ppl (± s.e.)"] == "+1.50 ± 0.76"
    equal_time = re.search(r"^At equal training time \(dense's 300 updates, 30 s.*$", text, re.M).group(0)
    for t, u in (("dense", 300), ("hash", 150), ("switch", 100)):
        seeds = [1, 3] if t == "hash" else [1, 2, 3]
        want = statistics.mean(_valid_at(study.Run(t, t, s, 300, 0.1), u) for s in seeds)
        assert f"{t} {want:.2f} ({u} updates)" in equal_time

    (handover,) = _tables(text, "Stage hand-over")
    rows = {(row["type"], row["updates"]): row for row in handover}
    assert set(rows) == {(t, u) for t in ("stablemoe", "stablemoe-refit") for u in ("300", "600")} | {
        ("stablemoe", "1200")
    }
    for (label, U), row in rows.items():
        runs = _select(valid, label, int(U), None if U == "300" else "long")
        assert row["seeds"] == ",".join(str(r["seed"]) for r in runs)
        assert row["agrees w/ majority (mean ± s.d.)"] == _spread(
            (100 * r["handover"]["agree_majority"] for r in runs), "%"
        )
        assert row["ceiling (mean ± s.d.)"] == _spread((100 * r["handover"]["ceiling"] for r in runs), "%")
        assert row["changed at boundary (mean ± s.d.)"] == _spread((100 * r["boundary_change"] for r in runs), "%")
        assert row["1 - ceiling (mean ± s.d.)"] == _spread((100 * (1 - r["handover"]["ceiling"]) for r in runs), "%")
        assert row["stage-2 load (mean ± s.d.)"] == _spread(r["stage2_max_load"] for r in runs)
        for other in ("hash", "base"):
            others = _select(valid, other, int(U), None if U == "300" else "long")
            want = [r["valid_ppl"] for r in runs], [r["valid_ppl"] for r in others]
            assert row[f"minus {other}, valid (± s.e.)"] == _difference(*want)


def test_longer_training_and_the_length_comparison(report):
    text, valid, written, out = report
    (long_rows,) = _tables(text, "Longer training")
    rows = {(row["type"], row["updates"]): row for row in long_rows}
    assert set(rows) == {(t, u) for t in ("stablemoe", "stablemoe-refit", "hash", "base") for u in ("300", "600")} | {
        ("stablemoe", "1200"),
        ("hash", "1200"),
        ("base", "1200"),
    }
    for (label, U), row in rows.items():
        runs = _select(valid, label, int(U), None if U == "300" else "long")
        assert row["valid ppl (mean ± s.d.)"] == _spread(r["valid_ppl"] for r in runs)
        if label != "hash":
            hash_runs = _select(valid, "hash", int(U), None if U == "300" else "long")
            want = _difference([r["valid_ppl"] for r in runs], [r["valid_ppl"] for r in hash_runs])
            assert row["it minus hash, valid (± s.e.)"] == want
    assert rows[("stablemoe", "1200")]["it minus base, valid (± s.e.)"].endswith("(n=1: no s.e.)")
    section = _section(text, "Longer training")
    assert "Without a record yet: base-u1200-seed2." in section

    # StableMoE's own run at each length against the others after as many updates, over the seeds both have
    length, check = _tables(text, "Training length")
    rows = {row["updates"]: row for row in length}
    assert sorted(int(u) for u in rows) == [100, 150, 200, 300, 600, 1200]
    for u in (100, 150, 200, 300, 600, 1200):
        root = [r for p, r in valid.items() if "/" not in p]
        own = {
            r["seed"]: r
            for r in root
            if r["label"] == "stablemoe" and r["config"]["max_update"] == u and r["config"]["stage1_fraction"] == 0.1
        }
        assert rows[str(u)]["StableMoE seeds"] == ",".join(map(str, sorted(own)))
        a = {s: dict((p[0], p[1]) for p in r["valid_curve"])[u] for s, r in own.items()}
        for t in ("hash", "base", "switch", "dense"):
            # the baseline's shortest run of at least u updates, read at u
            b = {}
            for r in sorted(root, key=lambda r: r["config"]["max_update"]):
                if r["label"] == t and r["config"]["max_update"] >= u and r["seed"] in a and r["seed"] not in b:
                    b[r["seed"]] = dict((p[0], p[1]) for p in r["valid_curve"])[u]
            cell = rows[str(u)][f"stablemoe minus {t} (± s.e.)"]
            if not b:
                assert cell == "n/a"
                continue
            seeds = sorted(b)
            want = _difference([a[s] for s in seeds], [b[s] for s in seeds])
            assert cell == want + ("" if seeds == sorted(a) else f" (seeds {','.join(map(str, seeds))})")
            ahead = re.search(rf"^\* {t}: (.*)$", _section(text, "Training length"), re.M).group(1)
            diff = statistics.mean(a[s] for s in seeds) - statistics.mean(b[s] for s in seeds)
            assert (str(u) in ahead.split(", ")) == (diff < 0)
    # at 1200 base has seed 1 only: one seed, no standard error
    assert rows["1200"]["stablemoe minus base (± s.e.)"] == "{} (seeds 1)".format(
        _difference(
            [dict((p[0], p[1]) for p in written["stablemoe-u1200-s110-seed1.json"]["valid_curve"])[1200]],
            [dict((p[0], p[1]) for p in written["base-u1200-seed1.json"]["valid_curve"])[1200]],
        )
    )
    # the own-length base run against the longer one: the same curve, so no difference
    checked = {row["run"]: row for row in check}
    assert checked["base-u200-seed1"]["difference"] == "+0.00"
    assert checked["base-u200-seed1"]["longer run"] == "base-u300-seed1"


def test_shorter_stage1_experts_and_second_corpus(report):
    text, valid, written, out = report
    (stage1,) = _tables(text, "Shorter stage 1")
    rows = {(row["type"], row["stage 1"]): row for row in stage1}
    assert set(rows) == {(t, f) for t in ("stablemoe", "stablemoe-refit") for f in ("2.5%", "10%")}
    for t in ("stablemoe", "stablemoe-refit"):
        short, ten = _select(valid, t, 300, "main", fraction=0.025), _select(valid, t, 300)
        row = rows[(t, "2.5%")]
        assert row["boundary (update)"] == "8"  # round(300 x 0.025)
        assert row["valid ppl (mean ± s.d.)"] == _spread(r["valid_ppl"] for r in short)
        assert row["minus the 10% runs, valid (± s.e.)"] == _difference(
            [r["valid_ppl"] for r in short], [r["valid_ppl"] for r in ten]
        )
        hash_runs = [r["valid_ppl"] for r in _select(valid, "hash", 300)]
        assert row["minus hash, valid (± s.e.)"] == _difference([r["valid_ppl"] for r in short], hash_runs)
        assert row["ceiling (mean ± s.d.)"] == _spread((100 * r["handover"]["ceiling"] for r in short), "%")
    assert "stablemoe-u300-s15-seed1" in _section(text, "Shorter stage 1")  # the 5% runs: missing

    experts, fig5, handover = _tables(text, "Expert count")
    rows = {(row["experts"], row["type"]): row for row in experts}
    assert set(rows) == {(n, t) for n in ("8", "16") for t in ("stablemoe", "hash", "base")}
    for (n, t), row in rows.items():
        runs = _select(valid, t, 300, folder="" if n == "8" else "experts16")
        assert row["valid ppl (mean ± s.d.)"] == _spread(r["valid_ppl"] for r in runs)
        if t != "stablemoe":
            ref = _select(valid, "stablemoe", 300, folder="" if n == "8" else "experts16")
            want = _difference([r["valid_ppl"] for r in ref], [r["valid_ppl"] for r in runs])
            assert row["stablemoe minus it, valid (± s.e.)"] == want
    (pair,) = fig5
    assert (pair["StableMoE experts"], pair["BASE experts"]) == ("8", "16")
    assert pair["stablemoe minus base, valid (± s.e.)"] == _difference(
        [r["valid_ppl"] for r in _select(valid, "stablemoe", 300)],
        [r["valid_ppl"] for r in _select(valid, "base", 300, folder="experts16")],
    )
    assert [row["experts"] for row in handover] == ["8", "16"]
    assert handover[1]["agrees w/ backbone (mean ± s.d.)"] == _spread(
        (100 * r["handover"]["agree_backbone"] for r in _select(valid, "stablemoe", 300, folder="experts16")), "%"
    )
    assert "experts32/stablemoe-u300-s110-seed1" in _section(text, "Expert count")

    corpus, handover = _tables(text, "Second corpus: sotu")
    rows = {row["type"]: row for row in corpus}
    assert set(rows) == {"stablemoe", "stablemoe-refit", "hash", "base"}
    for t, row in rows.items():
        there = _select(valid, t, 300, folder="sotu")
        assert row["sotu seeds"] == ",".join(str(r["seed"]) for r in there)
        assert row["sotu valid ppl (mean ± s.d.)"] == _spread(r["valid_ppl"] for r in there)
        assert row["shakespeare valid ppl (mean ± s.d.)"] == _spread(r["valid_ppl"] for r in _select(valid, t, 300))
        if t != "stablemoe":
            ref = _select(valid, "stablemoe", 300, folder="sotu")
            want = _difference([r["valid_ppl"] for r in ref], [r["valid_ppl"] for r in there])
            assert row["sotu: stablemoe minus it (± s.e.)"] == want
    assert {(row["corpus"], row["type"]) for row in handover} == {
        (c, t) for c in ("shakespeare", "sotu") for t in ("stablemoe", "stablemoe-refit")
    }
    assert "Without a record yet: sotu/base-u300-seed3." in _section(text, "Second corpus: sotu")
    # a planned corpus without a folder
    assert re.search(r"^\* the second corpus \(news\): news/hash-u300-seed1$", text, re.M)


def test_ablations_against_the_paper(report):
    text, valid, written, out = report
    (ablations,) = _tables(text, "Ablations")
    ablation = {r["label"]: r for r in valid.values() if r["study"] == "ablations"}
    rows = {row["run"]: row for row in ablations}
    assert list(rows) == [r.label for r in study.ablation_runs(study.parse_options(["--dry-run"]), 1)]
    for label, r in ablation.items():
        row = rows[label]
        assert row["valid ppl"] == f"{r['valid_ppl']:.2f}"
        assert row["minus stablemoe"] == f"{r['valid_ppl'] - ablation['stablemoe']['valid_ppl']:+.2f}"
    # the paper's pairs: placements against the middle one, BASE + fixed routing against BASE
    for label, ref, paper in (
        ("placement-bottom", "placement-middle", 22.82 - 19.28),
        ("base-fixed-routing", "base", 19.41 - 20.04),
        ("stage1-only", "stablemoe", 19.48 - 19.28),
        ("router-cnn", "stablemoe", 19.39 - 19.34),
    ):
        assert rows[label]["reference"] == ref
        assert rows[label]["minus the reference"] == f"{ablation[label]['valid_ppl'] - ablation[ref]['valid_ppl']:+.2f}"
        assert rows[label]["paper's difference"].startswith(f"{paper:+.2f} (")
    # stage 1 only: the last pair of checkpoints both before the boundary (the one at it routes as stage 2)
    s1 = ablation["stage1-only"]
    assert s1["config"]["two_stage_updates"] == 150 and [u for u, _ in s1["fluctuation"]] == [50, 100, 150]
    assert rows["stage1-only"]["stage-1 last pair"] == f"{100 * s1['fluctuation'][1][1]:.2f}%"
    assert rows["stablemoe"]["stage-1 last pair"] == "n/a"


def test_every_record_is_accounted_for_and_every_figure_captioned(report):
    text, valid, written, out = report
    # the JSON holds every record file, the appendix one row each with what reads it
    assert sorted(r["record"] for r in json.loads((out / "report.json").read_text())) == sorted(written)
    (appendix,) = _tables(text, "Appendix")
    rows = {row["record"].strip("`"): row for row in appendix}
    assert sorted(rows) == sorted(written)
    for path in valid:
        assert not rows[path]["read by"].startswith("none"), path
    assert rows["hash-u300-seed2.json"]["read by"].startswith("none: another configuration: lr 1.0")
    assert rows["copies/hash-u300-seed1.json"]["read by"].startswith("none: a subfolder's record")
    assert rows["base-u200-seed1.json"]["read by"] == "training length, length check"
    assert rows["stablemoe-u300-s12.5-seed1.json"]["read by"] == "stage-1 share"
    assert rows["stablemoe-u300-s110-seed1.json"]["threads"] == "1"
    # every '±' is named in its column header (or the conventions), and every figure has its caption
    for table in _tables(text):
        for row in table:
            for header, cell in row.items():
                assert "±" not in cell or "s.d." in header or "s.e." in header, (header, cell)
    figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)\n\n\*Figure (\d+)\. .+\*$", text, re.M)
    assert [int(n) for _, n in figures] == list(range(1, len(figures) + 1))
    assert {f for f, _ in figures} == {
        f"report_{k}.png" for k in ("main", "fluctuation", "length", "ablations", "experts")
    }
    for f, _ in figures:
        assert (out / f).stat().st_size > 0
    assert text.count("![") == len(figures)


def test_one_style_per_type():
    styles = [study.TYPE_STYLE[t] for t in study.TYPES]
    assert len({c for c, _, _ in styles}) == len({m for _, m, _ in styles}) == len(study.TYPES)
    for t in study.TYPES:
        assert study.type_style(t)["color"] == study.TYPE_STYLE[t][0]


def test_gap_standard_error_by_hand():
    # 1, 2, 3 (mean 2, variance 1) against 0, 0, 3 (mean 1, variance 3): +1 ± sqrt(1/3 + 3/3) = 1.1547
    diff, se = study.mean_difference([1.0, 2.0, 3.0], [0.0, 0.0, 3.0])
    assert diff == pytest.approx(1.0) and se == pytest.approx(1.1547005)
    assert study.mean_difference([1.0], [0.0, 2.0]) == (0.0, None)


def test_threads_reach_the_subprocess_and_the_record(tmp_path, monkeypatch):
    data = tmp_path / "data-bin"
    data.mkdir()
    (data / "dict.txt").write_text("a 1\n")
    opts = study.parse_options(["--data", str(data), "--work", str(tmp_path / "w"), "--threads", "3"])
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(kwargs["env"])
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    run = study.Run("hash", "hash", 1, 100, 0.1)
    save = tmp_path / "run"
    save.mkdir()
    study._train_to(opts, run, save, 100)
    assert (seen[0]["OMP_NUM_THREADS"], seen[0]["MKL_NUM_THREADS"]) == ("3", "3")
    assert study.recorded_threads(save) == 3
    opts.threads = 1
    study._train_to(opts, run, save, 100)
    assert study.recorded_threads(save) == [3, 1]  # a run resumed with another count
    # a log from before the count was written: the count this process passes on
    (save / "train.log").write_text("# session 2026-01-01 10:00:00: python -m fairseq_cli.train\n")
    assert study.recorded_threads(save) == 7
    assert study.parse_options(["--dry-run"]).threads == 1


def test_committed_records_keep_their_names_and_configs():
    """Each committed record's file name and configuration are the ones the script gives its run today, so
    that the study command reuses it rather than training it again."""
    opts = study.parse_options(["--report-only"])
    paths = sorted(study.DEFAULT_RECORDS.glob("*.json")) + sorted(study.DEFAULT_RECORDS.glob("*/*.json"))
    assert paths
    for path in paths:
        r = json.loads(path.read_text())
        c = r["config"]
        run = study.Run(
            r["label"], r["moe_type"], r["seed"], c["max_update"], c["stage1_fraction"], tuple(c["flags"]), r["study"]
        )
        assert path.stem == run.name
        for k in study.SHARED:
            if k != "data":
                setattr(opts, k, c[k])
        want = {k: v for k, v in study.run_config(opts, run).items() if k != "data"}
        if "boundary_checkpoint" not in c:
            want.pop("boundary_checkpoint", None)
        assert {k: v for k, v in c.items() if k != "data"} == want, path.name


def test_names_and_folders_of_the_other_studies(tmp_path):
    assert study.Run("stablemoe", "stablemoe", 1, 3000, 0.025).name == "stablemoe-u3000-s12.5-seed1"
    assert study.Run("stablemoe", "stablemoe", 1, 3000, 0.05).name == "stablemoe-u3000-s15-seed1"
    assert study.Run("stablemoe", "stablemoe", 1, 3000, 0.1).name == "stablemoe-u3000-s110-seed1"
    # another expert count's records and checkpoints stay apart from the main study's
    opts = study.parse_options(["--dry-run", "--experts", "16", "--records", str(study.DEFAULT_RECORDS / "experts16")])
    assert opts.work == REPO / "runs/study/experts16"
    assert opts.out == opts.work / "report.md"
    assert study.parse_options(["--report-only"]).out == REPO / "docs/study_results.md"
    assert study.parse_options(["--dry-run"]).out == REPO / "runs/study/report.md"
    # ... and the study refuses to overwrite a record of another expert count, corpus or (for a type without
    # stages) stage-1 share
    data = tmp_path / "data-bin"
    data.mkdir()
    (data / "dict.txt").write_text("a 1\n")
    base = ["--data", str(data), "--records", str(tmp_path / "records"), "--work", str(tmp_path / "w")]
    opts = study.parse_options(base + ["--types", "stablemoe,hash", "--seeds", "1"])
    (tmp_path / "records").mkdir()
    for run in study.plan(opts):
        (tmp_path / "records" / f"{run.name}.json").write_text(json.dumps({"config": study.run_config(opts, run)}))
    assert study.conflicts(opts, study.plan(opts)) == []
    other = study.parse_options(base + ["--types", "stablemoe,hash", "--seeds", "1", "--experts", "16"])
    assert len(study.conflicts(other, study.plan(other))) == 2
    shorter = study.parse_options(base + ["--types", "stablemoe,hash", "--seeds", "1", "--stage1-fraction", "0.025"])
    (problem,) = study.conflicts(shorter, study.plan(shorter))
    assert "hash-u3000-seed1.json" in problem and "stage1_fraction" in problem


def test_a_run_another_study_command_holds_is_skipped(tmp_path, monkeypatch):
    """Two study commands side by side: the run one of them trains (its lock held) is left to it."""
    import fcntl

    data = tmp_path / "data-bin"
    data.mkdir()
    (data / "dict.txt").write_text("a 1\n")
    work, records = tmp_path / "w", tmp_path / "records"
    argv = ["--data", str(data), "--work", str(work), "--records", str(records), "--out", str(tmp_path / "r.md")]
    argv += ["--study", "main", "--types", "hash,base", "--seeds", "1"]
    trained = []
    monkeypatch.setattr(study, "run_one", lambda opts, run: trained.append(run.name))
    monkeypatch.setattr(study, "write_report", lambda *a: None)
    names = [r.name for r in study.plan(study.parse_options(argv))]
    assert len(names) == 2
    work.mkdir(exist_ok=True)
    with open(work / f"{names[0]}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        study.main(argv)
    assert trained == names[1:]
    study.main(argv)  # the lock released: the run is trained
    assert trained == names[1:] + names
