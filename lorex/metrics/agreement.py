"""Does a quick run show anything? Plain functions on scores: chance levels, and whether a quick
run orders its methods as the full bench does, pair by pair, counting only the gaps that exceed
the quick run's own noise.

The noise of a score is its standard error: ``binomial_se`` for an accuracy on ``n`` images,
``mean_se`` for a mean over queries (re-ID mAP). Two scores are *separable* when their gap exceeds
``Z`` standard errors of the difference (taken as independent, which overstates the noise of two
models scored on the same images: the test errs towards "cannot tell").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

Z = 2.0


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent images."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1))


def mean_se(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n < 2:
        return float("inf")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def separable(a: float, b: float, se_a: float, se_b: float, z: float = Z) -> bool:
    return abs(a - b) > z * math.hypot(se_a, se_b)


def chance_check(
    scores: Mapping[str, float],
    chance: float,
    factor: float = 2.0,
    what: str = "accuracy",
    full: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Which scores reach ``factor`` x ``chance``, with a one-line verdict. With the full bench's
    scores (``full``), a score below the bar there too is named as such: the method fails on
    the task, not only at quick size."""
    below = [name for name, v in scores.items() if v < factor * chance]
    also = [n for n in below if full is not None and n in full and full[n] < factor * chance]
    if not below:
        line = (
            f"Every {what} is at least {factor:g}x chance (chance {100 * chance:.1f}%): lowest "
            f"{100 * min(scores.values()):.1f}%."
        )
    else:
        line = (
            f"Below {factor:g}x chance ({100 * factor * chance:.1f}%, chance "
            f"{100 * chance:.1f}%): "
            + ", ".join(f"{n} {100 * scores[n]:.1f}%" for n in below)
            + (
                " (below it in the full bench too: "
                + ", ".join(f"{n} {100 * full[n]:.1f}%" for n in also)
                + ")"
                if also
                else ""
            )
            + "."
        )
    return {"chance": chance, "factor": factor, "below": below, "also_in_full": also, "line": line}


def ordering_agreement(
    quick: Mapping[str, float],
    quick_se: Mapping[str, float],
    full: Mapping[str, float] | None,
    source: str = "the full bench",
) -> dict[str, Any]:
    """Compare the quick run's order of the methods with the full bench's, pair by pair.

    Only methods present in both count. A pair whose quick gap is within the quick run's noise
    is *within noise*: the quick run cannot order it, whatever the full bench says. The others
    *agree* or *differ* with the full bench's order (a tie there counts as differing)."""
    if not full:
        return {
            "source": source,
            "agree": [],
            "differ": [],
            "within_noise": [],
            "line": f"No full-bench results ({source}) to compare this quick run's order with.",
        }
    names = [n for n in quick if n in full]
    agree, differ, noise = [], [], []
    for a, b in combinations(names, 2):
        if not separable(quick[a], quick[b], quick_se[a], quick_se[b]):
            noise.append([a, b])
        elif (quick[a] - quick[b]) * (full[a] - full[b]) > 0:
            agree.append([a, b])
        else:
            differ.append([a, b])
    pairs = len(agree) + len(differ) + len(noise)
    if pairs and len(noise) == pairs:
        line = (
            f"This quick run cannot order the methods: all {pairs} gaps are within "
            f"{Z:g} standard errors; run the full bench for an ordering."
        )
    else:
        line = (
            f"Order against {source}: {len(agree)} of the {len(agree) + len(differ)} pairs "
            f"this quick run can separate agree"
            + (" (differ: " + "; ".join(f"{a} vs {b}" for a, b in differ) + ")" if differ else "")
            + f"; {len(noise)} of {pairs} pairs are within its noise."
        )
    return {"source": source, "agree": agree, "differ": differ, "within_noise": noise, "line": line}


def read_full_results(path: str | Path) -> dict[str, Any] | None:
    """A full bench's ``results.json``, or None when there is none to compare with."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())
