"""``lorex bench losa``: full fine-tuning, LoRA and LoSA on one backbone, data and schedule.

Every measurement runs in its own fresh Python process (``python -m lorex.experiments.losa_jobs``
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

from lorex.experiments import settings as demo_settings
from lorex.experiments.stages import ensure_base, run_stage, teller
from lorex.io import write_json
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import pretrain
from lorex.version import __version__

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
    key = json.dumps({"job": job, "lorex": __version__}, sort_keys=True)
    return jobs_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _saved_worker(job: dict[str, Any], jobs_dir: Path | None, reused: list[int]) -> dict[str, Any]:
    """``_worker``, with each answer saved under ``jobs_dir`` as it lands: a stopped benchmark
    resumes where it stopped (failed jobs are not saved, so they run again)."""
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
        [sys.executable, "-m", "lorex.experiments.losa_jobs", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pretrained_base(out: Path, s: BenchSettings, size: Size, seed: int) -> Path:
    if size.base_from == "demo":
        return ensure_base(demo_settings.QUICK, seed, out, "cpu", {})
    return _pretrain_tiny(out, s, seed)


def _pretrain_tiny(out: Path, s: BenchSettings, seed: int) -> Path:
    """The vit-tiny base of the full bench, pretrained here once per settings."""
    base = out / "base-vit-tiny"
    record = {"epochs": s.pretrain_epochs, "samples": s.pretrain_samples, "seed": seed}
    cfg = TrainConfig(
        epochs=s.pretrain_epochs,
        batch_size=64,
        lr=5e-4,
        seed=seed,
        augment=True,
        max_samples=s.pretrain_samples,
    )
    make = lambda: pretrain("vit-tiny", base, cfg, data="pretrain/chars")  # noqa: E731
    run_stage(base, record, make, "pretrain vit-tiny on pretrain/chars", teller("losa"))
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
