"""``lorex bench losa``'s report: results.md and the costs figure, and a quick run's checks
against chance and against the full bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorex.experiments.losa_bench import METHODS
from lorex.io import write_json
from lorex.metrics.agreement import binomial_se, chance_check, ordering_agreement
from lorex.report import markdown_table


def projected_cached_ratio(
    losa: dict[str, Any], lora: dict[str, Any], epochs: int, target_epochs: int
) -> dict[str, float] | None:
    """Cached LoSA against LoRA per epoch, and projected to ``target_epochs`` epochs: the cache
    is filled once, so its share shrinks as training gets longer."""
    if not losa.get("train_seconds_cached") or not lora.get("train_seconds"):
        return None
    losa_epoch = (losa["train_seconds_cached"] - losa["cache_seconds"]) / epochs
    lora_epoch = lora["train_seconds"] / epochs
    total = losa["cache_seconds"] + target_epochs * losa_epoch
    return {
        "losa_epoch": losa_epoch,
        "lora_epoch": lora_epoch,
        "per_epoch": losa_epoch / lora_epoch,
        "ratio": total / (target_epochs * lora_epoch),
    }


def _losa_lora_ratios(block: dict[str, Any]) -> dict[str, float]:
    """LoSA / LoRA per epoch (time, peak memory, time with the cache) at one size."""
    lora, losa = block["lora"], block["losa"]
    ratios = {
        "time per epoch": ratio(losa["train_seconds"], lora["train_seconds"]),
        "peak training memory": ratio(losa["peak_train_mb"], lora["peak_train_mb"]),
    }
    projected = projected_cached_ratio(losa, lora, block["settings"]["epochs"], 100)
    if projected is not None:
        ratios["time per epoch with the cache"] = projected["per_epoch"]
    return ratios


def quick_checks(results: dict[str, Any], full: dict[str, Any] | None, source: str) -> dict:
    """Chance, and the full bench's order and ratios, checked on a quick run's pretrained size
    (per task: both benches score the same tasks' test images)."""
    name = results["settings"]["sizes"][0]
    block = results[name]
    n = block["settings"]["test_samples"]
    lines, checks = [], {"size": name, "tasks": {}}
    full_block = None
    if full is not None:
        full_block = next((full[k] for k in full.get("settings", {}).get("sizes", ["tiny"])), None)
    for task, scores in block["tasks"].items():
        acc = {m: scores[m]["accuracy"] for m in METHODS}
        chance = 1.0 / 10  # ten digit classes
        full_acc = None
        if full_block is not None and task in full_block.get("tasks", {}):
            full_acc = {m: full_block["tasks"][task][m]["accuracy"] for m in METHODS}
        order = ordering_agreement(
            acc, {m: binomial_se(a, n) for m, a in acc.items()}, full_acc, source
        )
        check = chance_check(acc, chance, full=full_acc)
        checks["tasks"][task] = {"chance": check, "order": order}
        lines += [f"- {task}: {check['line']} {order['line']}"]
    quick_ratios = _losa_lora_ratios(block)
    full_ratios = _losa_lora_ratios(full_block) if full_block is not None else {}
    parts = []
    for key, value in quick_ratios.items():
        there = full_ratios.get(key)
        verdict = (
            "no full figure"
            if there is None
            else ("same side of 1 as" if (value < 1) == (there < 1) else "contradicts")
        )
        parts.append(
            f"{key} {value:.2f}x ({verdict}"
            + (f" the full bench's {there:.2f}x)" if there is not None else ")")
        )
    lines.append(
        "- LoSA / LoRA, per epoch (both runs train every method for the same number of epochs, "
        "so these are the per-epoch ratios the full bench reports): " + "; ".join(parts) + "."
    )
    checks.update(quick_ratios=quick_ratios, full_ratios=full_ratios, lines=lines)
    return checks


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _base_words(size: dict[str, Any]) -> str:
    if not size["pretrained"]:
        return "random weights"
    if size.get("base_from") == "demo":
        return "the quick demo's base, shipped with lorex"
    return "pretrained here"


def write_report(results: dict[str, Any], out: Path) -> Path:
    """``results.md`` (tables, goals, ratios) and ``losa_costs.png`` beside ``results.json``."""
    write_json(out / "results.json", results)
    lines = ["# LoSA against LoRA and full fine-tuning", ""]
    for size_name in results.get("settings", {}).get("sizes", ["tiny", "base"]):
        block = results[size_name]
        size = block["settings"]
        lines += [
            f"## {size_name}: `{size['preset']}`, {size['image']} px, batch {size['batch']}, "
            f"{size['epochs']} epochs on {size['train_samples']} images per task "
            f"({_base_words(size)})",
            "",
        ]
        rows = []
        for method in METHODS:
            m = block[method]
            cached = m.get("train_seconds_cached")
            rows.append(
                [
                    method,
                    f"{100 * m['accuracy']:.1f}" if size["pretrained"] else "n/a",
                    f"{int(m['trainable_params']):,}",
                    f"{m['peak_train_mb']:.0f}",
                    f"{m['train_seconds']:.1f}",
                    f"{cached:.1f}" if cached is not None else "",
                    f"{m['infer_ms_per_image']:.2f}",
                ]
            )
        header = ["method", "accuracy %", "trainable", "peak train MB", "train s"]
        header += ["train s (cache)", "infer ms/img"]
        lines += [markdown_table(header, rows), ""]
        lora, losa = block["lora"], block["losa"]
        lines += [
            f"- LoSA / LoRA peak training memory: "
            f"**{ratio(losa['peak_train_mb'], lora['peak_train_mb']):.2f}** (goal <= 0.5)",
            f"- LoSA / LoRA training time: "
            f"**{ratio(losa['train_seconds'], lora['train_seconds']):.2f}** without the cache "
            f"(goal <= 0.5), **{ratio(losa['train_seconds_cached'], lora['train_seconds']):.2f}** "
            "with it (goal <= 0.1)",
            f"- LoSA - LoRA accuracy: **{100 * (losa['accuracy'] - lora['accuracy']):+.1f}** "
            "points (goal >= -2)"
            if size["pretrained"]
            else "- Accuracy: not reported at this size (random weights: it measures costs only).",
        ]
        projected = projected_cached_ratio(losa, lora, size["epochs"], 100)
        if projected is not None:
            lines.append(
                f"- With the cache, filling it took {losa['cache_seconds']:.1f} s and each epoch "
                f"{projected['losa_epoch']:.2f} s against LoRA's {projected['lora_epoch']:.2f} s "
                f"({projected['per_epoch']:.3f}x); at the VTAB-1k protocol's 100 epochs that "
                f"projects to **{projected['ratio']:.3f}x** LoRA's training time"
            )
        lines.append("")
        if len(block["tasks"]) > 1:
            per = [
                [task] + [f"{100 * block['tasks'][task][m]['accuracy']:.1f}" for m in METHODS]
                for task in block["tasks"]
            ]
            lines += [
                "Accuracy per task (%):",
                "",
                markdown_table(["task", *METHODS], per),
                "",
            ]
    if "quick_checks" in results:
        lines += ["## What this quick run can show", "", *results["quick_checks"]["lines"], ""]
    sweep = results["memory_cap"]
    lines += [
        f"## Deepest backbone under a {sweep['cap_gb']:g} GiB cap",
        "",
        f"Width 768 (vit-base), {sweep['image']} px, batch {sweep['batch']}: peak resident "
        "memory of a fresh process that builds the backbone and takes two training steps.",
        "",
    ]
    rows = []
    for method in METHODS:
        for run in sweep["runs"][method]:
            peak = "failed: " + run["error"] if "error" in run else f"{run['peak_mb']:.0f}"
            params = f"{run['params'] / 1e6:.0f}M" if "params" in run else ""
            rows.append([method, str(run["depth"]), params, peak])
    lines += [markdown_table(["method", "depth", "parameters", "peak MB"], rows), ""]
    lines += [
        "Largest depth that fits: "
        + ", ".join(f"{m} {sweep['largest_depth'][m]}" for m in METHODS),
        "",
        "![accuracy against each cost](losa_costs.png)",
        "",
    ]
    reused = results.get("settings", {}).get("reused_jobs", 0)
    if reused:
        lines += [
            f"Reused from an earlier, stopped run (OUT/jobs/): {reused} of the job answers; their "
            "times were measured then, not side by side with the rest. --fresh reruns everything.",
            "",
        ]
    (out / "results.md").write_text("\n".join(lines))
    (out / "losa_costs.png").write_bytes(_costs_png(results))
    return out / "results.md"


def _costs_png(results: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = results[results.get("settings", {}).get("sizes", ["tiny"])[0]]
    axes_keys = [
        ("trainable_params", "trainable parameters"),
        ("peak_train_mb", "peak training memory (MB)"),
        ("train_seconds", "training time (s)"),
        ("infer_ms_per_image", "inference (ms/image)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, label) in zip(axes, axes_keys, strict=True):
        for method, colour in zip(METHODS, ("tab:red", "tab:blue", "tab:green"), strict=True):
            m = block[method]
            ax.scatter(m[key], 100 * m["accuracy"], s=60, color=colour, label=method)
            if method == "losa" and key == "train_seconds":
                ax.scatter(
                    m["train_seconds_cached"],
                    100 * m["accuracy_cached"],
                    s=60,
                    marker="x",
                    color=colour,
                    label="losa (cache)",
                )
        ax.set_xlabel(label)
        ax.set_xscale("log" if key == "trainable_params" else "linear")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{block['settings']['preset']}: accuracy against each cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
