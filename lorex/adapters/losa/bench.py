"""``lorex bench losa``: full fine-tuning, LoRA and LoSA on one backbone, data and schedule.

Every measurement runs in its own fresh Python process (``python -m lorex.adapters.losa.bench``
with a JSON job), so one method's allocations never count against another's peak memory.

* ``tiny``: the vit-tiny preset, pretrained here on ``pretrain/chars``, trained on digit tasks;
  its accuracies are the comparison that counts. ``--quick`` uses ``micro`` instead: the quick
  demo's vit-micro base (shipped with lorex), 5 epochs on 2,000 images of one task.
* ``base``: a vit-base-patch16-224-shaped backbone (random weights: nothing can be downloaded)
  on digits resized to 224 px, at a small batch. Its costs are real; its accuracies mean
  nothing, so the report prints none.
* ``memory cap``: the deepest vit-base-width backbone each method trains one step of within a
  memory cap: the CPU stand-in for the paper's "4B parameters on one GPU".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METHODS = ("full", "lora", "losa")


@dataclass(frozen=True)
class Size:
    preset: str
    image: int
    batch: int
    train_samples: int
    test_samples: int
    epochs: int
    pretrained: bool
    #: Tasks at this size; None: the settings' tasks.
    tasks: tuple[str, ...] | None = None
    #: Where a pretrained base comes from: "bench" pretrains ``preset`` with the settings'
    #: pretraining; "demo" takes the quick demo's base (shipped with lorex, ``lorex.pretrained``).
    base_from: str = "bench"


@dataclass(frozen=True)
class BenchSettings:
    sizes: dict[str, Size]
    tasks: tuple[str, ...]
    pretrain_epochs: int
    pretrain_samples: int | None
    memory_cap_gb: float
    memory_depths: tuple[int, ...]
    memory_image: int = 224
    memory_batch: int = 8
    # LoRA at lorex's default 5e-3 diverged on the tiny base over 10 epochs (docs/losa.md).
    lr: dict[str, float] = field(default_factory=lambda: {"full": 1e-3, "lora": 1e-3, "losa": 5e-3})


FULL = BenchSettings(
    sizes={
        # 10 epochs: the cache is filled once, so very short runs would mostly time the fill.
        "tiny": Size("vit-tiny", 32, 64, 2000, 1000, 10, True),
        # Random weights at this size: its accuracy means nothing, so one task measures its costs.
        "base": Size("vit-base-patch16-224", 224, 8, 32, 32, 10, False, ("digits/mnistm",)),
    },
    tasks=("digits/mnistm", "digits/syn"),
    pretrain_epochs=3,
    pretrain_samples=None,
    # 4 GiB rather than 8: the same comparison, and the sweep no longer takes most of the run.
    memory_cap_gb=4.0,
    memory_depths=(12, 24, 48, 96, 192),
)
# The quick bench's small size starts from the quick demo's base (a vit-tiny pretrained for one
# epoch left every method at chance): its accuracies mean something, and its per-epoch time
# ratios are the ones the full bench also reports.
QUICK = BenchSettings(
    sizes={
        "micro": Size("vit-micro", 32, 64, 2000, 1000, 5, True, base_from="demo"),
        "base": Size("vit-base-patch16-224", 224, 4, 8, 8, 2, False),
    },
    tasks=("digits/mnistm",),
    pretrain_epochs=1,
    pretrain_samples=2000,
    memory_cap_gb=2.0,
    memory_depths=(4, 8, 16, 32),
    memory_batch=4,
)


def _job_file(jobs_dir: Path, job: dict[str, Any]) -> Path:
    from lorex import __version__

    key = json.dumps({"job": job, "lorex": __version__}, sort_keys=True)
    return jobs_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _saved_worker(job: dict[str, Any], jobs_dir: Path | None, reused: list[int]) -> dict[str, Any]:
    """``_worker``, with each answer saved under ``jobs_dir`` as it lands: a stopped benchmark
    resumes where it stopped (failed jobs are not saved, so they run again)."""
    from lorex.io import write_json

    if jobs_dir is None:
        return _worker(job)
    path = _job_file(jobs_dir, job)
    if path.is_file():
        reused[0] += 1
        return json.loads(path.read_text())["answer"]
    answer = _worker(job)
    if "error" not in answer:
        write_json(path, {"job": job, "answer": answer})
    return answer


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh process and return its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorex.adapters.losa.bench", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resized(data, size: int):
    """Digits upsampled to ``size`` px (bilinear), for backbones made for 224-px images."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lorex.data import ImageDataset

    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ImageDataset(np.ascontiguousarray(images), data.labels, data.classes, data.name)


def _make_method(name: str):
    from lorex.adapters.lora import LoraConfig
    from lorex.training.methods import TRAINING_METHODS as TRAINERS

    if name == "lora":  # r = 8 on qkv, proj, fc1, fc2 of every block, scaling alpha / r = 2
        return TRAINERS["lora"](LoraConfig(r=8, lora_alpha=16.0))
    return TRAINERS[name]()


def run_train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method on one task and measure it (inside a worker process)."""
    import torch

    from lorex.backbones import build_backbone, preset_config
    from lorex.data import load_dataset
    from lorex.metrics.resources import inference_ms_per_image
    from lorex.models import LorexModel, load_model
    from lorex.training.loop import TrainConfig, as_float, fit, images_to_tensor
    from lorex.training.run import evaluate

    torch.manual_seed(job["seed"])
    train = load_dataset(job["task"], "train", job["train_samples"], job["seed"])
    test = load_dataset(job["task"], "test", job["test_samples"], job["seed"])
    if job["image"] != train.image_size[0]:
        train, test = _resized(train, job["image"]), _resized(test, job["image"])
    if job.get("base"):
        model = load_model(job["base"])
    else:
        cfg = preset_config(job["preset"])
        model = LorexModel(build_backbone(cfg), cfg)
    model.add_head(train.name, train.classes)
    cfg = TrainConfig(
        epochs=job["epochs"],
        batch_size=job["batch"],
        lr=job["lr"],
        seed=job["seed"],
        feature_cache=job.get("cache", False),
    )
    result = fit(model, _make_method(job["method"]), train, cfg, progress=False)
    x, _ = images_to_tensor(test)
    latency = inference_ms_per_image(model, as_float(x[: job["batch"]], torch.device("cpu")))
    return {
        "accuracy": evaluate(model, test),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "peak_train_mb": result.peak_train_mb,
        "peak_rss_mb": result.peak_rss_mb,
        "train_seconds": result.train_seconds,
        "infer_ms_per_image": latency,
        "feature_cache": result.feature_cache,
        "cache_seconds": result.cache_seconds,
        "epochs": job["epochs"],
    }


def run_memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """Peak resident memory of building a backbone and two training steps (worker process)."""
    import resource

    import torch
    import torch.nn.functional as F

    from lorex.backbones import build_backbone, preset_config
    from lorex.models import LorexModel

    torch.manual_seed(0)
    cfg = {**preset_config("vit-base-patch16-224"), "depth": job["depth"], "img_size": job["image"]}
    with torch.no_grad():
        model = LorexModel(build_backbone(cfg), cfg)
    model.add_head("t", [str(i) for i in range(10)])
    method = _make_method(job["method"])

    class _Frames:
        frames = 1

    method.fit_to_data(_Frames())
    method.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(job["batch"], 3, job["image"], job["image"])
    y = torch.randint(0, 10, (job["batch"],))
    model.train(job["method"] != "losa")
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mb": peak_kb / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _pretrained_base(out: Path, s: BenchSettings, size: Size, seed: int) -> Path:
    if size.base_from == "demo":
        from lorex.demo import QUICK as DEMO_QUICK
        from lorex.demo import ensure_base

        return ensure_base(DEMO_QUICK, seed, out, "cpu", {})
    return _pretrain_tiny(out, s, seed)


def _pretrain_tiny(out: Path, s: BenchSettings, seed: int) -> Path:
    from lorex.models import is_model_dir
    from lorex.training.loop import TrainConfig
    from lorex.training.run import pretrain

    base = out / "base-vit-tiny"
    stamp = {"epochs": s.pretrain_epochs, "samples": s.pretrain_samples, "seed": seed}
    stamp_file = base / "bench-stamp.json"
    if is_model_dir(base) and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return base
    cfg = TrainConfig(
        epochs=s.pretrain_epochs,
        batch_size=64,
        lr=5e-4,
        seed=seed,
        augment=True,
        max_samples=s.pretrain_samples,
    )
    pretrain("vit-tiny", base, cfg, data="pretrain/chars")
    stamp_file.write_text(json.dumps(stamp))
    return base


def run_bench(out: Path, quick: bool = False, seed: int = 0, resume: bool = True) -> dict[str, Any]:
    """Every size, task and method; then the memory-cap sweep. Returns ``results.json``'s dict.

    Each job's answer is kept in ``out/jobs/``; with ``resume`` a rerun reuses the answers of
    identical jobs (same settings and lorex version) and runs only the rest.
    """
    s = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    jobs_dir = out / "jobs"
    if not resume and jobs_dir.is_dir():
        shutil.rmtree(jobs_dir)
    reused = [0]
    results: dict[str, Any] = {}
    jobs = []
    for size_name, size in s.sizes.items():
        base = str(_pretrained_base(out, s, size, seed)) if size.pretrained else None
        for task in size.tasks or s.tasks:
            for method in METHODS:
                for cache in (False, True) if method == "losa" else (False,):
                    jobs.append((size_name, task, method, cache, size, base))
    for size_name, task, method, cache, size, base in tqdm(jobs, desc="bench losa", unit="run"):
        job = {
            "kind": "train",
            "task": task,
            "method": method,
            "cache": cache,
            "preset": size.preset,
            "base": base,
            "image": size.image,
            "batch": size.batch,
            "epochs": size.epochs,
            "train_samples": size.train_samples,
            "test_samples": size.test_samples,
            "lr": s.lr[method],
            "seed": seed,
        }
        answer = _saved_worker(job, jobs_dir, reused)
        per_task = results.setdefault(size_name, {}).setdefault("tasks", {}).setdefault(task, {})
        if cache:
            per_task[method]["train_seconds_cached"] = answer.get("train_seconds")
            per_task[method]["peak_train_mb_cached"] = answer.get("peak_train_mb")
            per_task[method]["accuracy_cached"] = answer.get("accuracy")
            per_task[method]["cache_seconds"] = answer.get("cache_seconds")
        else:
            per_task[method] = answer
    for size_name, size in s.sizes.items():
        block = results[size_name]
        block["settings"] = asdict(size)
        for method in METHODS:  # the task mean, under the method's name, as the issue specifies
            runs = [block["tasks"][t][method] for t in size.tasks or s.tasks]
            keys = [
                k
                for k, v in runs[0].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            block[method] = {
                k: sum(r[k] for r in runs) / len(runs)
                for k in keys
                if all(isinstance(r.get(k), (int, float)) for r in runs)
            }
    results["memory_cap"] = _memory_sweep(s, jobs_dir, reused)
    results["settings"] = {
        "sizes": list(s.sizes),
        "reused_jobs": reused[0],
        "quick": quick,
        "tasks": list(s.tasks),
        "pretrain_epochs": s.pretrain_epochs,
        "pretrain_samples": s.pretrain_samples,
        "lr": s.lr,
    }
    return results


def _memory_sweep(s: BenchSettings, jobs_dir: Path | None, reused: list[int]) -> dict[str, Any]:
    cap_mb = s.memory_cap_gb * 1024
    sweep: dict[str, Any] = {
        "cap_gb": s.memory_cap_gb,
        "image": s.memory_image,
        "batch": s.memory_batch,
        "width": 768,
        "runs": {m: [] for m in METHODS},
        "largest_depth": {},
    }
    for method in tqdm(METHODS, desc="memory cap", unit="method"):
        largest = None
        for depth in s.memory_depths:
            job = {
                "kind": "memory",
                "method": method,
                "depth": depth,
                "image": s.memory_image,
                "batch": s.memory_batch,
            }
            answer = _saved_worker(job, jobs_dir, reused)
            answer["depth"] = depth
            sweep["runs"][method].append(answer)
            if "error" in answer or answer["peak_mb"] > cap_mb:
                break
            largest = depth
        sweep["largest_depth"][method] = largest
    return sweep


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
    from lorex.metrics.agreement import binomial_se, chance_check, ordering_agreement

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
    from lorex.io import write_json
    from lorex.report import markdown_table

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
            lines += ["Accuracy per task (%):", "", markdown_table(["task", *METHODS], per), ""]
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


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    answer = run_train_job(job) if job["kind"] == "train" else run_memory_job(job)
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
