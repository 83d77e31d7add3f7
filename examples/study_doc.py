"""Fill the study's figures in ``docs/study.md`` and the README from the run records.

A figure taken from the runs is written in the Markdown as

    <!--= EXPR -->VALUE<!--/-->

EXPR is a Python expression over the helpers below, evaluated on the run records of
``docs/study_runs/`` (the files ``examples/compare_moe_types.py`` writes) and the routing summaries of
``docs/study_routing/`` (``stablemoe-routing-summary --json``); the comments do not show in the
rendered page. ``<!--: NAME = EXPR-->`` names a value for the file's markers.

    python examples/study_doc.py docs/study.md README.md#results-at-cpu-scale

rewrites every VALUE from the records. ``--check`` changes nothing and fails when a VALUE differs from
what its expression gives, or when a figure with a decimal point stands outside a marker (in the
``#section`` only, where a file names one). A figure of the paper or of the set-up is marked too, as
``paper("...")`` or ``given("...")``, which render their text.

Helpers. A PATTERN is a record's path in the records folder without ``.json``, with ``fnmatch``'s
wildcards (``stablemoe-u3000-s110-seed*``, ``experts16/hash-u3000-seed*``; a wildcard does not cross
a ``/``); it must match a record. Values come back by seed, as lists; every formatter takes a number
or a list (its mean).

    val(PATTERN, key="valid_ppl", seeds=None)
                                   the records' values of ``key`` (dotted: "handover.ceiling"), of
                                   the given seeds only where given
    V(PATTERN, seeds), T(...)      valid / test perplexity (fairseq-eval-lm, last checkpoint)
    common(PATTERN, ...)           the seeds every pattern has records of
    at(PATTERN, update, seeds)     fairseq-train's validation perplexity at an update
    best(PATTERN, seeds), best_at(...)  fairseq-train's best validation perplexity / the update it was at
    fluct(PATTERN, update)         the routing fluctuation of the checkpoint pair that ends at ``update``
    after(PATTERN, pct)            the share of tokens whose last change of expert comes after pct%
                                   of training
    cost(TYPE)                     seconds per update (the step-cost file beside the records)
    at_time(PATTERN, seconds, TYPE)  the seed-mean validation perplexity after that much training at
                                   TYPE's cost
    routing(NAME)                  ``docs/study_routing/NAME.json``
    top(NAME, expert, layer=0)     an expert's most frequent tokens with their counts (a routing summary)
    study                          examples/compare_moe_types.py, for what the report computes

    f(x, d=2), sf(x, d=2)          the number, unsigned / signed
    pct(x, d=1)                    a share as a percentage
    M(x, d=2)                      a count in millions ("2.17M")
    msd(xs, d=2, scale=1, unit="") mean ± sample standard deviation (one value: the value)
    seeds(xs, d=2, scale=1, unit="", sign=False)  the values by seed, "a / b / c"
    span(xs, d=2, scale=1, unit="")  their range, "lo-hi"
    sd(xs)                         their sample standard deviation (a number)
    diff(a, b)                     mean(a) - mean(b) ± the standard error of the difference, as the report
    minus(a, b, d=2)               mean(a) - mean(b), signed
    gap(a, b, d=2)                 |mean(a) - mean(b)|
    se(a, b, d=2)                  the standard error of mean(a) - mean(b)
    lead(a, b)                     "ahead of" where mean(a) < mean(b) (lower perplexity), else "behind"
    paired(a, b), mse(xs)          seed-by-seed differences; their mean ± its standard error
"""

import argparse
import fnmatch
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_moe_types as study  # noqa: E402
from compare_moe_types import _fmt_difference, load_records, mean_difference  # noqa: E402

#: a marked figure: the expression and the value it rendered
MARKER = re.compile(r"<!--=(?P<expr>.*?)-->(?P<value>.*?)<!--/-->")
#: a figure that must be marked: a number with a decimal point (whole numbers and whole percentages are
#: mostly settings: layer counts, updates, a stage-1 share of 10%)
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)+%?")
#: a name the file's markers share: ``<!--: NAME = EXPR-->`` (evaluated in the file's order)
LET = re.compile(r"<!--:\s*(?P<name>[A-Za-z_]\w*)\s*=(?P<expr>.*?)-->")
COMMENT = re.compile(r"<!--.*?-->", re.S)
#: what the figure check skips: fenced code blocks, inline code, links' targets
CODE = re.compile(r"```.*?```|`[^`\n]*`|\]\([^)]*\)", re.S)

Number = Union[float, Sequence[float]]


class DocError(Exception):
    """A marker that cannot be filled: no record matches, a key is missing, an expression fails."""


def _mean(x: Number) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    if not x:
        raise DocError("no values")
    return statistics.mean(float(v) for v in x)


def _values(x: Number) -> List[float]:
    return [float(x)] if isinstance(x, (int, float)) else [float(v) for v in x]


def namespace(records_dir: Path, routing_dir: Path) -> Dict[str, Callable]:
    """The helpers of the module doc, over the records in ``records_dir``; the step-cost file beside it."""
    records = load_records(records_dir)
    by_name = {r["record"][: -len(".json")]: r for r in records}

    def runs(pattern: str, seeds: Optional[Sequence[int]] = None) -> List[Dict[str, object]]:
        found = [
            by_name[n]
            for n in sorted(by_name, key=lambda n: (by_name[n]["seed"], n))
            if n.count("/") == pattern.count("/")
            and fnmatch.fnmatchcase(n, pattern)
            and (seeds is None or by_name[n]["seed"] in seeds)
        ]
        if not found:
            raise DocError(f"no record matches {pattern!r}" + (f" with seeds {list(seeds)}" if seeds else ""))
        return found

    def common(*patterns: str) -> List[int]:
        shared = set.intersection(*({r["seed"] for r in runs(p)} for p in patterns))
        if not shared:
            raise DocError(f"no seed common to {', '.join(patterns)}")
        return sorted(shared)

    def val(pattern: str, key: str = "valid_ppl", seeds: Optional[Sequence[int]] = None) -> List[float]:
        out = []
        for r in runs(pattern, seeds):
            v = r
            for part in key.split("."):
                if not isinstance(v, dict) or part not in v:
                    raise DocError(f"{r['record']} has no {key!r}")
                v = v[part]
            out.append(float(v))
        return out

    def at(pattern: str, update: int, seeds: Optional[Sequence[int]] = None) -> List[float]:
        out = []
        for r in runs(pattern, seeds):
            point = study._curve_at(r, update)
            if point is None:
                raise DocError(f"{r['record']} has no validation at update {update}")
            out.append(point)
        return out

    def _best(pattern: str, column: int, seeds: Optional[Sequence[int]]) -> List[float]:
        return [float(min(r["valid_curve"], key=lambda p: (p[1], p[0]))[column]) for r in runs(pattern, seeds)]

    def routing(name: str) -> Dict[str, object]:
        path = routing_dir / f"{name}.json"
        if not path.is_file():
            raise DocError(f"no routing summary {path.name} in {routing_dir.name}/")
        return json.loads(path.read_text())

    def f(x: Number, d: int = 2) -> str:
        return f"{_mean(x):.{d}f}"

    def sf(x: Number, d: int = 2) -> str:
        return f"{_mean(x):+.{d}f}"

    def pct(x: Number, d: int = 1) -> str:
        return f"{100 * _mean(x):.{d}f}%"

    def msd(xs: Number, d: int = 2, scale: float = 1.0, unit: str = "") -> str:
        xs = [scale * v for v in _values(xs)]
        if len(xs) == 1:
            return f"{xs[0]:.{d}f}{unit}"
        return f"{statistics.mean(xs):.{d}f} ± {statistics.stdev(xs):.{d}f}{unit}"

    def seeds(xs: Number, d: int = 2, scale: float = 1.0, unit: str = "", sign: bool = False) -> str:
        return " / ".join(f"{scale * v:{'+' if sign else ''}.{d}f}" for v in _values(xs)) + unit

    def minus(a: Number, b: Number, d: int = 2) -> str:
        return f"{_mean(a) - _mean(b):+.{d}f}"

    def paired(a: Sequence[float], b: Sequence[float]) -> List[float]:
        if len(a) != len(b):
            raise DocError(f"paired differences of {len(a)} and {len(b)} values")
        return [x - y for x, y in zip(a, b)]

    def mse(xs: Number, d: int = 2) -> str:
        xs = _values(xs)
        if len(xs) < 2:
            return f"{xs[0]:+.{d}f} (n=1: no s.e.)"
        return f"{statistics.mean(xs):+.{d}f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.{d}f}"

    def M(x: Number, d: int = 2) -> str:
        return f"{_mean(x) / 1e6:.{d}f}M"

    def fluct(pattern: str, update: int) -> List[float]:
        out = []
        for r in runs(pattern):
            share = next((s for u, s in r.get("fluctuation") or () if u == update), None)
            if share is None:
                raise DocError(f"{r['record']} has no fluctuation at update {update}")
            out.append(float(share))
        return out

    def after(pattern: str, pct: float) -> List[float]:
        out = []
        for r in runs(pattern):
            lf = r.get("last_fluctuation") or {"update_pct": [], "cumulative_share": []}
            share = next((c for u, c in zip(lf["update_pct"], lf["cumulative_share"]) if abs(u - pct) < 0.5), None)
            if share is None:
                raise DocError(f"{r['record']} has no checkpoint at {pct}% of training")
            out.append(1.0 - float(share))
        return out

    def cost(moe_type: str) -> float:
        path = records_dir.parent / "study_results_step_cost.json"
        costs = json.loads(path.read_text())["seconds_per_update"]
        if moe_type not in costs:
            raise DocError(f"{path.name} has no cost for {moe_type}")
        return float(costs[moe_type])

    def at_time(pattern: str, seconds: float, moe_type: str) -> float:
        value = study.at_time(runs(pattern), seconds, cost(moe_type))
        if value is None:
            raise DocError(f"{pattern} has no validation curve at {seconds:.0f} s")
        return value

    def span(xs: Number, d: int = 2, scale: float = 1.0, unit: str = "") -> str:
        xs = [scale * v for v in _values(xs)]
        return f"{min(xs):.{d}f}-{max(xs):.{d}f}{unit}"

    def diff(a: Number, b: Number) -> str:
        return _fmt_difference(mean_difference(_values(a), _values(b)))

    def sd(xs: Number) -> float:
        return statistics.stdev(_values(xs))

    def se(a: Number, b: Number, d: int = 2) -> str:
        diff_se = mean_difference(_values(a), _values(b))[1]
        if diff_se is None:
            raise DocError("a standard error needs two values on each side")
        return f"{diff_se:.{d}f}"

    def top(name: str, expert: int, layer: int = 0) -> str:
        cells = []
        for token, count in routing(name)["layers"][layer]["top_tokens"][expert]:
            cells.append((f"`{token}`" if any(c in token for c in "<>|`*_") else token) + f" ({count})")
        return ", ".join(cells)

    def gap(a: Number, b: Number, d: int = 2) -> str:
        return f"{abs(_mean(a) - _mean(b)):.{d}f}"

    def lead(a: Number, b: Number) -> str:
        return "ahead of" if _mean(a) < _mean(b) else "behind"

    return {
        "runs": runs,
        "val": val,
        "common": common,
        "V": lambda p, seeds=None: val(p, "valid_ppl", seeds),
        "T": lambda p, seeds=None: val(p, "test_ppl", seeds),
        "at": at,
        "best": lambda p, seeds=None: _best(p, 1, seeds),
        "best_at": lambda p, seeds=None: [int(u) for u in _best(p, 0, seeds)],
        "routing": routing,
        "f": f,
        "sf": sf,
        "pct": pct,
        "msd": msd,
        "seeds": seeds,
        "span": span,
        "diff": diff,
        "minus": minus,
        "paired": paired,
        "mse": mse,
        "M": M,
        "fluct": fluct,
        "after": after,
        "cost": cost,
        "at_time": at_time,
        "study": study,
        "gap": gap,
        "sd": sd,
        "se": se,
        "top": top,
        "lead": lead,
        "mean": _mean,
        "paper": str,
        "given": str,
        "abs": abs,
        "float": float,
        "int": int,
        "str": str,
        "min": min,
        "max": max,
        "len": len,
        "round": round,
        "sum": sum,
        "sorted": sorted,
        "zip": zip,
        "all": all,
        "any": any,
        "math": math,
    }


def _eval(expr: str, scope: Dict[str, object], where: str):
    try:
        return eval(expr, scope)  # noqa: S307 (the project's own docs)
    except DocError as e:
        raise DocError(f"{where}: {e}") from None
    except Exception as e:  # a typo in a doc: name the marker
        raise DocError(f"{where}: {type(e).__name__}: {e}") from None


def render(text: str, env: Dict[str, Callable]) -> str:
    """``text`` with every marker's VALUE replaced by its expression's value (a string as it is, a
    number with two decimals), after the file's ``<!--: NAME = EXPR-->`` names."""
    scope = {"__builtins__": {}, **env}
    for m in LET.finditer(text):
        scope[m.group("name")] = _eval(m.group("expr").strip(), scope, f"<!--: {m.group('name')} = ...-->")

    def one(m: "re.Match") -> str:
        expr = m.group("expr").strip()
        value = _eval(expr, scope, f"<!--= {expr} -->")
        if isinstance(value, float):
            value = f"{value:.2f}"
        return f"<!--= {expr} -->{value}<!--/-->"

    return MARKER.sub(one, text)


def unmarked(text: str, part: str = "") -> List[str]:
    """``line: figure`` for every figure with a decimal point outside a marker, a comment and code (in
    the section ``part`` only, a heading's anchor, where given)."""
    text = section(text, part) if part else text
    text = CODE.sub(_blank, COMMENT.sub(_blank, MARKER.sub(_blank, text)))
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        out.extend(f"{number}: {fig}" for fig in FIGURE.findall(line))
    return out


def _blank(m: "re.Match") -> str:
    return re.sub(r"[^\n]", " ", m.group(0))


def check(path: Path, text: str, env: Dict[str, Callable], part: str = "") -> List[str]:
    """What is wrong with ``text`` (the file at ``path``): values that differ from their expressions,
    figures outside markers."""
    problems = []
    new = render(text, env)
    for old_line, new_line, number in zip(text.splitlines(), new.splitlines(), range(1, 10**9)):
        if old_line != new_line:
            olds = [m.group("value") for m in MARKER.finditer(old_line)]
            news = [m.group("value") for m in MARKER.finditer(new_line)]
            changed = [f"{o!r} -> {n!r}" for o, n in zip(olds, news) if o != n]
            problems.append(f"{path.name}:{number}: " + ", ".join(changed))
    problems.extend(f"{path.name}:{u} is not from a marker" for u in unmarked(text, part))
    return problems


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section(text: str, name: str) -> str:
    """The part of ``text`` under the heading whose anchor is ``name`` (to the next heading of its level
    or higher), other lines blanked, so that line numbers stay the file's."""
    lines, out, level = text.splitlines(), [], None
    for line in lines:
        m = re.match(r"(#+)\s+(.*)", line)
        if m and level is not None and len(m.group(1)) <= level:
            level = -1
        if m and level is None and anchor(m.group(2)) == name:
            level = len(m.group(1))
        out.append(line if level not in (None, -1) else "")
    if level is None:
        raise DocError(f"no heading #{name}")
    return "\n".join(out)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files",
        nargs="+",
        help="Markdown files to fill, e.g. docs/study.md README.md#results-at-cpu-scale; a #section (a "
        "heading's anchor) limits the check for figures outside markers to that section",
    )
    parser.add_argument("--records", type=Path, default=REPO / "docs" / "study_runs", help="the run records folder")
    parser.add_argument(
        "--routing", type=Path, default=REPO / "docs" / "study_routing", help="the routing summaries folder"
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a file is not filled")
    args = parser.parse_args(argv)
    env = namespace(args.records, args.routing)
    problems = []
    try:
        for name in args.files:
            path, _, part = name.partition("#")
            path = Path(path)
            text = path.read_text()
            if args.check:
                problems.extend(check(path, text, env, part))
            else:
                new = render(text, env)
                if new != text:
                    path.write_text(new)
                    print(f"study_doc: {path}: updated")
                problems.extend(f"{path.name}:{u} is not from a marker" for u in unmarked(new, part))
    except DocError as e:
        print(f"study_doc: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"study_doc: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
