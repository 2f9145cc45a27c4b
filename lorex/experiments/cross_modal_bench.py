"""``lorex bench cross-modal``: every method and ablation on the built-in RGB -> depth and
RGB -> NIR tasks, same- and cross-sensor.

Each RGB source is the demo's chars base fine-tuned on one sensor's task-relevant RGB images
(with its feature statistics recorded, as a ResNet would keep them in BatchNorm). Each task then
adapts it with ``adapt_cross_modal`` to another (or the same) sensor's depth or NIR images, with
the modality's TI pairs. Finished sources and tasks are reused on a rerun with the same settings,
so a stopped bench resumes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.methods import ABLATIONS, CROSS_MODAL_METHODS, MAIN_METHODS
from lorex.adaptation.cross_modal.pipeline import adapt_cross_modal
from lorex.adaptation.cross_modal.report import METHOD_COLUMNS, method_rows
from lorex.experiments import settings as demo_settings
from lorex.experiments.stages import augmented_config, ensure_base, run_stage, teller
from lorex.io import read_json, write_json
from lorex.metrics.agreement import binomial_se, chance_check, ordering_agreement
from lorex.models.stamps import stamp
from lorex.models.store import file_sha256
from lorex.report import markdown_table
from lorex.training.expert_jobs import train_expert
from lorex.training.methods import TRAINING_METHODS
from lorex.training.records import run_record
from lorex.version import __version__

say = teller("cross-modal")


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # the RGB view the source model trains on
    target: str  # the paired set whose depth / NIR images are the target
    ti: str


TASKS = (
    Task("rgbd k1->k1", "rgbd/k1/rgb", "rgbd/k1", "rgbd/ti"),
    Task("rgbd k1->k2", "rgbd/k1/rgb", "rgbd/k2", "rgbd/ti"),
    Task("rgbd k2->k1", "rgbd/k2/rgb", "rgbd/k1", "rgbd/ti"),
    Task("rgbnir a->a", "rgbnir/a/rgb", "rgbnir/a", "rgbnir/ti"),
    Task("rgbnir a->b", "rgbnir/a/rgb", "rgbnir/b", "rgbnir/ti"),
    Task("rgbnir b->a", "rgbnir/b/rgb", "rgbnir/a", "rgbnir/ti"),
)


@dataclass(frozen=True)
class CrossModalBenchSettings:
    tasks: tuple[Task, ...]
    methods: tuple[str, ...]
    config: CrossModalConfig
    source_epochs: int = 15
    source_lr: float = 1e-3
    source_samples: int | None = None
    ablation_tasks: tuple[str, ...] | None = None  # None: every task runs the ablations
    extra: dict[str, Any] = field(default_factory=dict)


FULL = CrossModalBenchSettings(
    tasks=TASKS,
    methods=(*MAIN_METHODS, *ABLATIONS),
    config=CrossModalConfig(),
    ablation_tasks=("rgbd k1->k2", "rgbnir a->b"),
)
QUICK = CrossModalBenchSettings(
    tasks=(TASKS[1], TASKS[4]),
    methods=MAIN_METHODS,
    config=CrossModalConfig(epochs=5, translator_steps=150, max_target_samples=900),
    source_epochs=10,  # on all 2,400 images: fewer left the sources near chance (27-49%)
)
# `lorex demo`'s cross-modal part: one RGB -> depth task, cross-sensor, a source of 6 epochs,
# 450 target images and 100 translator steps rather than 10, 900 and 150 (a cut made for time,
# not chosen on any score).
DEMO = replace(
    QUICK,
    tasks=(TASKS[1],),
    config=replace(QUICK.config, max_target_samples=450, translator_steps=100),
    source_epochs=6,
)


def _slug(task: str) -> str:
    return task.replace(" ", "_").replace("->", "-to-")


def train_source(out: Path, base: Path, data: str, s: CrossModalBenchSettings, seed: int, device):
    """One RGB source per sensor (full fine-tuning, feature statistics recorded), reused when
    its settings match."""
    path = out / "sources" / data.replace("/", "_")
    cfg = augmented_config(s.source_epochs, s.source_lr, seed, s.source_samples)
    value = stamp(
        data=data, cfg=cfg.to_dict(), base=file_sha256(base / "model.safetensors"), v=__version__
    )
    run_stage(
        path,
        {"stamp": value},
        lambda: train_expert(
            base, data, TRAINING_METHODS["full"](), path, cfg, device, feature_stats=True
        ),
        f"RGB source on {data}",
        say,
    )
    return path


def run_task(
    out: Path,
    task: Task,
    s: CrossModalBenchSettings,
    source: Path,
    device,
    progress: bool | None,
) -> dict[str, Any]:
    """One task's methods (``adapt_cross_modal``), reused when its settings and source match;
    returns the task's metrics."""
    folder = out / "tasks" / _slug(task.name)
    methods = [
        m
        for m in s.methods
        if m in MAIN_METHODS or s.ablation_tasks is None or task.name in s.ablation_tasks
    ]
    value = stamp(
        task=asdict(task),
        methods=methods,
        cfg=s.config.to_dict(),
        source=read_json(source / "stage.json")["stamp"],
        v=__version__,
    )
    keep = "tgmb-tgkt" if "tgmb-tgkt" in methods else None
    make = partial(
        adapt_cross_modal,
        source,
        task.target,
        task.ti,
        folder,
        methods,
        s.config,
        device,
        progress,
        keep,
    )
    made = run_stage(folder, {"stamp": value}, make, task.name, say)
    return made if made is not None else read_json(folder / "metrics.json")


def run_cross_modal_bench(
    out: str | Path,
    quick: bool = False,
    seed: int = 0,
    device="cpu",
    progress: bool | None = None,
    settings: CrossModalBenchSettings | None = None,
    base: str | Path | None = None,
    full_results: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``: results.json (task -> method -> accuracy and
    time), summary.json (goals, settings, stage times, provenance), results.md and
    translations.png. Returns the summary with the results under ``"tasks"``. A ``quick`` run
    also checks its accuracies against chance and its order against ``full_results``."""
    out = Path(out)
    s = settings or (QUICK if quick else FULL)
    s = replace(s, config=replace(s.config, seed=seed))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base = (
        Path(base)
        if base is not None
        else ensure_base(demo_settings.QUICK, seed, out, device, timings)
    )
    sources = {t.source: train_source(out, base, t.source, s, seed, device) for t in s.tasks}
    timings["sources"] = time.perf_counter() - start - sum(timings.values())
    results: dict[str, Any] = {}
    scored: dict[str, dict[str, int]] = {}
    for task in s.tasks:
        tick = time.perf_counter()
        metrics = run_task(out, task, s, sources[task.source], device, progress)
        results[task.name] = {
            name: {
                "accuracy": r["accuracy"],
                "test_accuracy": r.get("test_accuracy"),
                "seconds": r["seconds"],
                "description": r["description"],
                **{k: r[k] for k in ("translated_accuracy", "teacher_accuracy") if k in r},
            }
            for name, r in metrics["methods"].items()
        }
        scored[task.name] = {
            "images": metrics["target_samples"],
            "classes": _classes(sources[task.source]),
        }
        timings[task.name] = time.perf_counter() - tick
    first = out / "tasks" / _slug(s.tasks[0].name) / "translations.png"
    if first.is_file():
        shutil.copyfile(first, out / "translations.png")
    summary = {
        "tasks": results,
        "goals": goals(results),
        "settings": {**asdict(s), "config": s.config.to_dict()},
        "stage_seconds": timings,
        "run": run_record("bench cross-modal", None, quick=quick, seed=seed),
        "scored": scored,
    }
    if quick:
        full = read_json(full_results) if full_results and Path(full_results).is_file() else None
        summary["quick_checks"] = quick_checks(results, scored, full, str(full_results))
    write_json(out / "results.json", results)  # task -> method -> accuracy, ...
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "tasks"})
    (out / "results.md").write_text(bench_report(summary, quick))
    return summary


def _classes(source: Path) -> int:
    """How many classes the source model's one head has: chance is one over it."""
    heads = read_json(source / "config.json")["heads"]
    return len(next(iter(heads.values()))["classes"])


def quick_checks(
    results: dict[str, Any], scored: dict[str, dict[str, int]], full: dict | None, source: str
) -> dict[str, Any]:
    """Per task: every method's accuracy against chance (one over the classes), and the
    methods' order against the full bench's on the same task."""
    checks: dict[str, Any] = {"tasks": {}, "lines": []}
    for task, methods in results.items():
        n, classes = scored[task]["images"], scored[task]["classes"]
        acc = {m: r["accuracy"] for m, r in methods.items()}
        full_acc = None
        if full and task in full:
            full_acc = {m: r["accuracy"] for m, r in full[task].items()}
        check = chance_check(acc, 1.0 / classes, full=full_acc)
        order = ordering_agreement(
            acc, {m: binomial_se(a, n) for m, a in acc.items()}, full_acc, source
        )
        checks["tasks"][task] = {"chance": check, "order": order}
        checks["lines"].append(f"- {task} ({n} target images): {check['line']} {order['line']}")
    return checks


def _mean(results: dict[str, Any], method: str) -> float | None:
    values = [r[method]["accuracy"] for r in results.values() if method in r]
    return sum(values) / len(values) if len(values) == len(results) and values else None


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals on the measured numbers: TGMB + TGKT >= source-only + 10 points and
    >= SOCKET + 2 points on average over the tasks; one task's adaptation under 5 minutes."""
    ours, src, socket = (_mean(results, m) for m in ("tgmb-tgkt", "source-only", "socket"))
    seconds = {
        task: sum(r[m]["seconds"] for m in MAIN_METHODS if m in r) for task, r in results.items()
    }
    tgkt_seconds = {t: r["tgmb-tgkt"]["seconds"] for t, r in results.items() if "tgmb-tgkt" in r}
    return {
        "mean_accuracy": {
            m: _mean(results, m) for m in CROSS_MODAL_METHODS if _mean(results, m) is not None
        },
        "gain_over_source_only": None if ours is None or src is None else ours - src,
        "gain_over_socket": None if ours is None or socket is None else ours - socket,
        "source_only_goal_met": None if ours is None or src is None else ours >= src + 0.10,
        "socket_goal_met": None if ours is None or socket is None else ours >= socket + 0.02,
        "tgmb_tgkt_seconds": tgkt_seconds,
        "main_methods_seconds": seconds,
        "under_5_minutes": all(v < 300 for v in tgkt_seconds.values()),
    }


def bench_report(summary: dict[str, Any], quick: bool) -> str:
    results = summary["tasks"]
    tasks = list(results)
    methods = [m for m in CROSS_MODAL_METHODS if any(m in results[t] for t in tasks)]
    rows = [
        [m, *(_cell(results[t].get(m)) for t in tasks), _cell_mean(summary["goals"], m)]
        for m in methods
    ]
    g = summary["goals"]
    lines = [
        f"# Cross-modal transfer benchmark{' (quick)' if quick else ''}",
        "",
        "Transductive top-1 accuracy (%) on the unlabelled task-relevant target images of each "
        "task (source RGB sensor -> target sensor); `lorex bench cross-modal`, seed "
        f"{summary['run']['seed']}, lorex {summary['run']['lorex_version']}.",
        "",
        markdown_table(["method", *tasks, "mean"], rows),
        "",
        "## Goals",
        "",
        f"- TGMB + TGKT over source-only: {_pts(g['gain_over_source_only'])} points "
        f"(goal +10: {_met(g['source_only_goal_met'])}).",
        f"- TGMB + TGKT over SOCKET: {_pts(g['gain_over_socket'])} points "
        f"(goal +2: {_met(g['socket_goal_met'])}).",
        "- Time of one task's TGMB + TGKT adaptation: "
        + ", ".join(f"{t} {s:.0f} s" for t, s in g["tgmb_tgkt_seconds"].items())
        + f" (goal under 300 s: {_met(g['under_5_minutes'])}).",
        "",
    ]
    if "quick_checks" in summary:
        lines += ["## What this quick run can show", "", *summary["quick_checks"]["lines"], ""]
    lines += [
        "## Per task",
        "",
    ]
    for t in tasks:
        rows = method_rows(results[t])
        lines += [
            f"### {t}",
            "",
            markdown_table(
                METHOD_COLUMNS,
                rows,
            ),
            "",
        ]
    lines += ["![translations](translations.png)", ""]
    return "\n".join(lines)


def _cell(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{100 * r['accuracy']:.1f}"


def _cell_mean(goals: dict[str, Any], method: str) -> str:
    value = goals["mean_accuracy"].get(method)
    return "-" if value is None else f"{100 * value:.1f}"


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _met(value: bool | None) -> str:
    return "n/a" if value is None else ("met" if value else "**missed**")
