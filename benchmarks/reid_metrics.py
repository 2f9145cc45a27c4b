"""Vectorised re-ID metrics against the usual per-query Python loop, side by side in one run.

A random distance matrix of Market-1501's size (3,368 queries x 15,913 gallery, 751 ids, 6
cameras, id-0 distractors) is evaluated by ``lorex.metrics.reid.reid_scores`` and by two loops:
torchreid's Python path (quicksort argsort, precision built as a Python list) and a leaner loop
that divides in NumPy. Each is timed best-of-N; all must agree.

    python benchmarks/reid_metrics.py --out benchmarks/results/reid_metrics [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

import lorex
from lorex.io import atomic_write_bytes, write_json
from lorex.metrics._reid_reference import reference_evaluate_loop
from lorex.metrics.reid import reid_scores as evaluate

FULL = {"queries": 3368, "gallery": 15913, "ids": 751, "cams": 6, "distractors": 2798}
QUICK = {"queries": 400, "gallery": 2000, "ids": 100, "cams": 6, "distractors": 300}
GOAL = 0.5  # vectorised time / torchreid-style loop time


def make_problem(size: dict, seed: int):
    """Ids, cameras and a ties-free float32 distance matrix where same-id pairs tend to be close."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, size["ids"] + 1)
    q_ids = rng.choice(ids, size["queries"])
    g_ids = np.concatenate(
        [ids, rng.choice(ids, size["gallery"] - size["ids"] - size["distractors"])]
    )
    g_ids = rng.permutation(np.concatenate([g_ids, np.zeros(size["distractors"], dtype=int)]))
    q_cams = rng.integers(0, size["cams"], size["queries"])
    g_cams = rng.integers(0, size["cams"], size["gallery"])
    score = rng.random((size["queries"], size["gallery"]))
    score -= 0.2 * (g_ids[None, :] == q_ids[:, None])
    # Distances are each row's ranks on a grid: float32, and no two equal within a row, so the
    # loop's quicksort and evaluate's stable tie-break give the same ranking.
    grid = np.broadcast_to(
        np.arange(size["gallery"], dtype=np.float32) / size["gallery"], score.shape
    )
    dist = np.empty(score.shape, dtype=np.float32)
    np.put_along_axis(dist, np.argsort(score, axis=1), grid, axis=1)
    return dist, q_ids, g_ids, q_cams, g_cams


def best_of(fn, repeats: int) -> tuple[float, list[float], dict]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, out


def max_difference(a: dict, b: dict) -> float:
    if a["num_valid_queries"] != b["num_valid_queries"]:
        return float("inf")
    return float(
        max(abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"]), np.abs(a["cmc"] - b["cmc"]).max())
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/reid_metrics")
    parser.add_argument("--quick", action="store_true", help="a small matrix, for a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="best-of for evaluate")
    parser.add_argument("--loop-repeats", type=int, default=None, help="best-of for the loops")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    loop_repeats = args.loop_repeats or (3 if args.quick else 1)
    problem = make_problem(size, args.seed)

    runs = {
        "evaluate": (lambda: evaluate(*problem), args.repeats),
        "loop_torchreid": (
            lambda: reference_evaluate_loop(*problem, sort_kind="quicksort"),
            loop_repeats,
        ),
        "loop_numpy_precision": (
            lambda: reference_evaluate_loop(
                *problem, sort_kind="quicksort", python_precision=False
            ),
            loop_repeats,
        ),
    }
    times, all_times, outputs = {}, {}, {}
    for name, (fn, repeats) in runs.items():
        times[name], all_times[name], outputs[name] = best_of(fn, repeats)
        print(f"{name}: best {times[name]:.3f} s of {repeats}", flush=True)
    diff = max(max_difference(outputs["evaluate"], outputs[k]) for k in runs if k != "evaluate")
    ratio = times["evaluate"] / times["loop_torchreid"]
    metrics = outputs["evaluate"]
    result = {
        "benchmark": "reid_metrics",
        "quick": args.quick,
        "seed": args.seed,
        "lorex_version": lorex.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "size": {**size, "dtype": "float32"},
        "repeats": {name: repeats for name, (_, repeats) in runs.items()},
        "times_s": times,
        "all_times_s": all_times,
        "ratio_evaluate_over_loop_torchreid": ratio,
        "ratio_evaluate_over_loop_numpy_precision": times["evaluate"]
        / times["loop_numpy_precision"],
        "goal": f"ratio <= {GOAL}",
        "goal_met": bool(ratio <= GOAL),
        "max_abs_difference": diff,
        "agree": bool(diff <= 1e-12),
        "metrics": {
            "mAP": metrics["mAP"],
            "rank1": float(metrics["cmc"][0]),
            "rank5": float(metrics["cmc"][4]),
            "mINP": metrics["mINP"],
            "num_valid_queries": metrics["num_valid_queries"],
        },
    }
    out = Path(args.out)
    write_json(out / "results.json", result)
    atomic_write_bytes(out / "results.md", report(result).encode("utf-8"))
    print(report(result))
    if not result["agree"]:
        raise SystemExit(f"evaluate and the loop disagree by {diff}")
    return result


def report(r: dict) -> str:
    s, t, machine = r["size"], r["times_s"], r["machine"]
    quick = " (quick)" if r["quick"] else ""
    lines = [
        f"# Re-ID metrics: vectorised `evaluate` vs per-query loop{quick}",
        "",
        f"{s['queries']:,} queries x {s['gallery']:,} gallery ({s['ids']} ids, "
        f"{s['cams']} cameras, {s['distractors']:,} id-0 distractors), float32, seed {r['seed']}, "
        f"lorex {r['lorex_version']}, {machine['cpu_count']} CPU cores ({machine['platform']}). "
        "Best of the given repeats, one process, side by side.",
        "",
        "| implementation | repeats | best time (s) | evaluate / this |",
        "|---|---:|---:|---:|",
    ]
    for name in t:
        lines.append(
            f"| {name} | {r['repeats'][name]} | {t[name]:.3f} | {t['evaluate'] / t[name]:.3f} |"
        )
    m = r["metrics"]
    lines += [
        "",
        f"Goal {r['goal']} against the torchreid-style loop: "
        f"**{r['ratio_evaluate_over_loop_torchreid']:.3f}** "
        f"({'met' if r['goal_met'] else 'NOT met'}). Largest difference from the loops: "
        f"{r['max_abs_difference']:.1e} (agree: {r['agree']}).",
        f"Metrics on this random matrix: mAP {m['mAP']:.4f}, rank-1 {m['rank1']:.4f}, "
        f"rank-5 {m['rank5']:.4f}, mINP {m['mINP']:.4f}, {m['num_valid_queries']} valid queries.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
