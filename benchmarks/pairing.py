"""Paired timing rounds, shared by the layer benchmarks.

Every round runs each case once, right before or after a run of its reference
(alternating which goes first, and rotating the order of the cases from round
to round), so each case's time has a reference time next to it; the ratio of a
case is then the median of these paired ratios, which a slow spell of the
machine hits on both sides.
"""

from typing import Callable, Dict, List, Sequence


def paired_rounds(
    names: Sequence[str],
    reference: Callable[[str], str],
    run: Callable[[str], float],
    repeats: int,
    times: Dict[str, List[float]],
    ratios: Dict[str, List[float]],
) -> None:
    """Run ``repeats`` rounds of ``names``; append seconds to ``times[name]`` and
    ``times[reference(name)]`` and the paired ratios to ``ratios[name]``."""
    names = list(names)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            ref = reference(name)
            pair = [ref, name] if r % 2 == 0 else [name, ref]
            took = {k: run(k) for k in pair}
            times.setdefault(ref, []).append(took[ref])
            times.setdefault(name, []).append(took[name])
            ratios.setdefault(name, []).append(took[name] / took[ref])
