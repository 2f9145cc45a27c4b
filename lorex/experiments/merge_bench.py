"""Merge the demo's per-domain experts with every method and score each merged model per task.

Used by ``lorex bench merge`` (and ``benchmarks/merge.py``) and by ``lorex demo``'s merge table.
Normalised accuracy is the mean over tasks of merged accuracy / the task's own expert accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lorex.data import load_dataset
from lorex.experiments.stages import short
from lorex.io import read_json, write_json
from lorex.merging import merge_models, method_from_name
from lorex.metrics.agreement import binomial_se, chance_check, ordering_agreement
from lorex.models import load_model
from lorex.report import grouped_bars_png, markdown_table
from lorex.training.evaluation import evaluate_classifier

# (label, method, options): every method at its defaults, and DOGE and WUDI also at the papers'
# absolute settings (their defaults follow the task vectors' scale: docs/merging.md).
METHOD_ORDER: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("average", "average", {}),
    ("task-arithmetic", "task-arithmetic", {}),
    ("ties", "ties", {}),
    ("dare", "dare", {}),
    ("dare-ties", "dare-ties", {}),
    ("doge", "doge", {}),
    ("doge (paper: eta 0.07, lr 1e-4)", "doge", {"eta": 0.07, "lr": 1e-4}),
    ("iso-c", "iso-c", {}),
    ("iso-cts", "iso-cts", {}),
    ("tsv-m", "tsv-m", {}),
    ("wudi", "wudi", {}),
    ("wudi (paper: lr 1e-5)", "wudi", {"lr": 1e-5}),
)

#: The step of the bench's "frozen-head-small-lr" experts: a tenth of the full fine-tuning step
#: (1e-3). Experts that stay closer to the base merge better (docs/merging.md).
SMALL_LR = 1e-4


def score_merges(
    demo_dir: Path,
    out: Path,
    domains: list[str],
    expert_kind: str = "full",
    methods: tuple[tuple[str, str, dict[str, Any]], ...] = METHOD_ORDER,
    device: torch.device | str = "cpu",
    test_samples: int | None = None,
    seed: int = 0,
    eval_sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"experts": {task: acc}, <method>: {"per_task", "average", "normalized", "seconds",
    "peak_mb"}}`` for the ``expert_kind`` ("full" or "lora") experts under ``demo_dir``.

    ``eval_sets`` (domain -> dataset) scores on other data than the test split, a validation set
    for choosing settings: the experts' own accuracy is then measured on it too, and only its
    domains are scored (the merge still takes every domain's expert).
    """

    base = demo_dir / "base"
    experts = {d: demo_dir / "experts" / short(d) / expert_kind for d in domains}
    if eval_sets is None:
        tests = {d: load_dataset(d, "test", test_samples, seed) for d in domains}
        own = {
            short(d): float(read_json(e / "metrics.json")["accuracy"]) for d, e in experts.items()
        }
    else:
        tests = eval_sets
        own = {}
        for d, data in tests.items():
            expert = load_model(experts[d], device)
            expert.set_head(d)
            own[short(d)] = evaluate_classifier(expert, data, device)
    results: dict[str, Any] = {"experts": {k: round(100 * v, 2) for k, v in own.items()}}
    for label, name, options in methods:
        target = out / expert_kind / re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")
        method = method_from_name(name, **options)
        record = merge_models(method, base, list(experts.values()), target, device=device)
        model = load_model(target, device)
        per_task = {}
        for d in tests:
            model.set_head(d)
            per_task[short(d)] = evaluate_classifier(model, tests[d], device)
        results[label] = {
            "per_task": {k: round(100 * v, 2) for k, v in per_task.items()},
            "average": round(100 * sum(per_task.values()) / len(per_task), 2),
            "normalized": round(100 * sum(per_task[k] / own[k] for k in own) / len(own), 2),
            "seconds": record["seconds"],
            "peak_mb": record["peak_added_mb"],
        }
    return results


def merge_table(results: dict[str, Any]) -> str:
    tasks = list(results["experts"])
    rows = [["experts (each on its own task)", *[f"{results['experts'][t]:.1f}" for t in tasks]]]
    rows[0] += [f"{sum(results['experts'].values()) / len(tasks):.1f}", "100", "", ""]
    for name, r in results.items():
        if name == "experts":
            continue
        rows.append(
            [
                f"`{name}`",
                *[f"{r['per_task'][t]:.1f}" for t in tasks],
                f"**{r['average']:.1f}**",
                f"{r['normalized']:.1f}",
                f"{r['seconds']:.1f}",
                f"{r['peak_mb']:.0f}",
            ]
        )
    header = ["method", *[f"{t} %" for t in tasks], "average %", "normalised %", "s", "peak MB"]
    return markdown_table(header, rows)


def _kind(payload: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """One expert kind's scores from a ``results.json`` payload (see ``write_merge_report``)."""
    if kind == "full":
        return {k: v for k, v in payload.items() if isinstance(v, dict) and "per_task" in v}
    return payload.get(kind)


def merge_quick_checks(
    results: dict[str, dict[str, Any]],
    full: dict[str, Any] | None,
    test_images: dict[str, int],
    source: str,
) -> dict[str, Any]:
    """Per expert kind: every merge's average accuracy against chance (ten digit classes), and
    the methods' order against the full bench's (their average accuracy over the domains)."""
    checks: dict[str, Any] = {"kinds": {}, "lines": []}
    for kind, res in results.items():
        if kind == "run":
            continue
        scores = {m: r["average"] / 100 for m, r in res.items() if m != "experts"}
        se = {}
        for m, r in res.items():
            if m == "experts":
                continue
            variance = sum(
                binomial_se(acc / 100, test_images[t]) ** 2 for t, acc in r["per_task"].items()
            )
            se[m] = variance**0.5 / len(r["per_task"])
        there = _kind(full, kind) if full else None
        full_scores = (
            {m: r["average"] for m, r in there.items() if m != "experts"} if there else None
        )
        check = chance_check(
            scores,
            0.1,
            what="merged model's average accuracy",
            full={m: v / 100 for m, v in full_scores.items()} if full_scores else None,
        )
        order = ordering_agreement(scores, se, full_scores, source)
        checks["kinds"][kind] = {"chance": check, "order": order}
        checks["lines"].append(f"- {kind} experts: {check['line']} {order['line']}")
    return checks


def write_merge_report(
    results: dict[str, dict[str, Any]], out: Path, title: str, checks: dict | None = None
) -> Path:
    """``results.json``, ``results.md`` and one bar chart per expert kind, in ``out``.

    ``results`` maps an expert kind ("full", "lora") to ``score_merges``' output. In
    ``results.json`` the full experts' methods sit at the top level (method name -> scores, the
    experts under "experts"); other kinds sit under their own key ("lora": {...}).
    """
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(results.get("full", {}))
    payload.update({k: v for k, v in results.items() if k != "full"})
    write_json(out / "results.json", payload)
    parts = [f"# {title}\n"]
    for kind, res in results.items():
        if kind == "run":
            continue
        chart = f"merge_{kind}.png"
        bars = {"experts": res["experts"]}
        bars.update({k: v["per_task"] for k, v in res.items() if k != "experts"})
        grouped_bars_png(bars, out / chart, f"Merging the {kind} experts: accuracy per task")
        parts.append(f"## {kind} experts\n\n{merge_table(res)}\n\n![{kind}]({chart})\n")
    if checks:
        write_json(out / "quick_checks.json", checks)
        lines = "\n".join(checks["lines"])
        parts.insert(1, f"## What this quick run can show\n\n{lines}\n")
    (out / "results.md").write_text("\n".join(parts), encoding="utf-8")
    return out / "results.md"
