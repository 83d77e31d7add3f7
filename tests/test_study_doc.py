"""``examples/study_doc.py``: the study's figures in the docs, computed from the run records.

The committed pages must be filled: every marked figure equal to what its expression gives on the
committed records, and no figure with a decimal point outside a marker. The helpers are checked on
synthetic records against statistics computed here, and a figure edited by hand, one typed outside a
marker, a pattern that matches no record and a typo in an expression are each caught.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import study_doc  # noqa: E402

PAGES = ["docs/study.md", "README.md#results-at-cpu-scale"]


def test_the_committed_pages_are_filled_from_the_committed_records(capsys):
    rc = study_doc.main(["--check"] + [str(REPO / p) for p in PAGES])
    assert rc == 0, capsys.readouterr().err


def _record(root, name, seed, valid, test, curve, **extra):
    path = root / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(seed=seed, valid_ppl=valid, test_ppl=test, valid_curve=curve, **extra)))


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "study_runs"
    a, b = [71.25, 69.5, 70.125], [68.0, 68.75]
    for seed, v in enumerate(a, 1):
        curve = [[250, 90.0 + seed, 1.0], [500, 80.0 - seed, 2.0], [750, 85.0, 3.0]]
        _record(
            root,
            f"alpha-u750-seed{seed}",
            seed,
            v,
            v + 1,
            curve,
            handover={"ceiling": 0.5 + 0.1 * seed},
            fluctuation=[[250, 0.25 * seed], [500, 0.0]],
            last_fluctuation={"update_pct": [33.333, 66.667, 100.0], "cumulative_share": [0.2, 0.7 + 0.1 * seed, 1.0]},
        )
    for seed, v in enumerate(b, 1):
        _record(root, f"beta-u750-seed{seed}", seed, v, v - 1, [[250, 95.0, 1.0], [500, 81.0, 2.0], [750, 79.0, 3.0]])
    _record(root, "more/alpha-u750-seed1", 1, 1000.0, 1000.0, [[750, 1000.0, 3.0]])
    (tmp_path / "study_results_step_cost.json").write_text(json.dumps({"seconds_per_update": {"alpha": 0.5}}))
    return study_doc.namespace(root, tmp_path / "study_routing"), a, b


def _fill(env, expr):
    text = study_doc.render(f"x <!--= {expr} -->?<!--/--> y", env)
    return text[len(f"x <!--= {expr} -->") : -len("<!--/--> y")]


def test_helpers_against_direct_statistics(env):
    env, a, b = env
    se = math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 2)
    assert _fill(env, 'V("alpha-u750-seed*")') == str(a)  # by seed; a wildcard does not cross "/"
    assert _fill(env, 'msd(V("alpha-u750-seed*"))') == f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}"
    assert _fill(env, 'diff(V("alpha-u750-seed*"), V("beta-u750-seed*"))') == (
        f"{statistics.mean(a) - statistics.mean(b):+.2f} ± {se:.2f}"
    )
    assert _fill(env, 'se(V("alpha-u750-seed*"), V("beta-u750-seed*"))') == f"{se:.2f}"
    assert _fill(env, 'lead(V("beta-u750-seed*"), V("alpha-u750-seed*"))') == "ahead of"
    assert _fill(env, 'gap(V("alpha-u750-seed*"), V("beta-u750-seed*"), 3)') == (
        f"{statistics.mean(a) - statistics.mean(b):.3f}"
    )
    pairs = [x - y for x, y in zip(a[:2], b)]
    assert _fill(env, 'seeds(paired(V("alpha-u750-seed*")[:2], V("beta-u750-seed*")), sign=True)') == " / ".join(
        f"{d:+.2f}" for d in pairs
    )
    assert _fill(env, 'mse(paired(V("alpha-u750-seed*")[:2], V("beta-u750-seed*")))') == (
        f"{statistics.mean(pairs):+.2f} ± {statistics.stdev(pairs) / math.sqrt(2):.2f}"
    )
    assert _fill(env, 'msd(val("alpha-u750-seed*", "handover.ceiling"), 1, 100, "%")') == "70.0 ± 10.0%"
    assert _fill(env, 'seeds(at("alpha-u750-seed*", 500))') == "79.00 / 78.00 / 77.00"
    assert _fill(env, 'best_at("alpha-u750-seed2")[0]') == "500"
    assert _fill(env, 'pct(fluct("alpha-u750-seed*", 250))') == "50.0%"
    assert _fill(env, 'seeds(after("alpha-u750-seed*", 66.667), 1, 100, "%")') == "20.0 / 10.0 / 0.0%"
    # 187.5 s at 0.5 s per update: update 375, half-way between the seed-mean curve's 250 and 500
    halfway = (statistics.mean([91.0, 92.0, 93.0]) + statistics.mean([79.0, 78.0, 77.0])) / 2
    assert _fill(env, 'f(at_time("alpha-u750-seed*", 187.5, "alpha"))') == f"{halfway:.2f}"
    assert _fill(env, 'f(V("more/alpha-u750-seed1"))') == "1000.00"
    # the seeds both have: alpha's seed 3 has no beta to pair with
    assert _fill(env, 'common("alpha-u750-seed*", "beta-u750-seed*")') == "[1, 2]"
    assert _fill(env, 'V("alpha-u750-seed*", common("alpha-u750-seed*", "beta-u750-seed*"))') == str(a[:2])


def test_a_hand_edited_or_unmarked_figure_and_a_bad_expression_are_caught(env, tmp_path):
    env = env[0]
    page = tmp_path / "page.md"
    page_text = '# A\n\nmean <!--= f(V("beta-u750-seed*")) -->?<!--/-->; `0.5 in code`\n\n# B\n\n1.5\n'
    good = study_doc.render(page_text, env)
    assert study_doc.check(page, good, env, "a") == []
    assert study_doc.check(page, good, env) == ["page.md:7: 1.5 is not from a marker"]
    edited = good.replace("68.38<!--/-->", "68.40<!--/-->")
    assert study_doc.check(page, edited, env, "a") == ["page.md:3: '68.40' -> '68.38'"]
    with pytest.raises(study_doc.DocError, match="no record matches 'gamma-u750-seed\\*'"):
        study_doc.render('<!--= V("gamma-u750-seed*") -->?<!--/-->', env)
    with pytest.raises(study_doc.DocError, match=r"<!--= msdd\(1\) -->: NameError"):
        study_doc.render("<!--= msdd(1) -->?<!--/-->", env)
    with pytest.raises(study_doc.DocError, match="no heading #c"):
        study_doc.check(page, good, env, "c")
