"""Stages of the demo and the benches: each finished one is reused when its settings match.

A stage writes one model directory and then its record (``stage.json``, ``lorex.models.stamps``);
a rerun with the same record skips it, so a stopped run resumes where it stopped. The demo's
stages are also kept in lorex's cache, keyed by their settings and by lorex's own code, so the
quick benches copy what the quick demo already trained. Every experiment starts from one base,
the quick demo's (``ensure_base``).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorex.data import cache_dir
from lorex.experiments.settings import DemoSettings
from lorex.io import atomic_directory, write_json
from lorex.models.stamps import STAGE_FILE, stage_record, stamp
from lorex.pretrained import find_shipped, install_shipped
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import pretrain
from lorex.version import __version__

#: The quick base shipped as package data (``lorex.pretrained``; recipe.json says how to remake it).
SHIPPED_BASE = "chars-vit-micro"


def say(message: str) -> None:
    """Stage lines on stderr: the demo is long, and a progress bar alone does not name its stage."""
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def teller(bench: str) -> Callable[[str], None]:
    """A bench's stage lines, on stdout and named after the bench (``[bench sage] ...``)."""
    return lambda message: print(f"[bench {bench}] {message}", flush=True)


def short(domain: str) -> str:
    """A domain's folder name in an experiment's output (``digits/mnist`` -> ``mnist``)."""
    return domain.split("/")[-1]


def augmented_config(epochs: int, lr: float, seed: int, samples: int | None) -> TrainConfig:
    """The benches' fine-tuning recipe: batches of 64 augmented images."""
    return TrainConfig(
        epochs=epochs, batch_size=64, lr=lr, augment=True, seed=seed, max_samples=samples
    )


@functools.cache
def code_fingerprint() -> str:
    """A short hash of lorex's own source files: cached stages are not reused across code edits."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def run_stage(
    path: Path,
    record: dict[str, Any],
    make: Callable[[], Any],
    label: str,
    tell: Callable[[str], None],
    timings: dict[str, float] | None = None,
    kept: Path | None = None,
) -> Any:
    """Run ``make`` (which writes the model directory ``path``) unless ``path`` already holds
    a stage recorded as ``record``; returns what ``make`` returned, None when reused.

    ``timings[label]`` gets the stage's seconds (0 when reused). With ``kept`` the finished
    stage is also copied there, and a stage found there is copied instead of made."""
    if stage_record(path) == record:
        tell(f"{label}: reusing {path}")
        if timings is not None:
            timings[label] = 0.0
        if kept is not None and stage_record(kept) != record:
            copy_dir(path, kept)
        return None
    if kept is not None and stage_record(kept) == record:
        tell(f"{label}: reusing the cached {kept}")
        copy_dir(kept, path)
        if timings is not None:
            timings[label] = 0.0
        return None
    tell(f"{label} ...")
    start = time.perf_counter()
    made = make()
    write_json(path / STAGE_FILE, record)
    if timings is not None:
        timings[label] = round(time.perf_counter() - start, 2)
    if kept is not None:
        copy_dir(path, kept)
    return made


def cached_stage(
    path: Path, record: dict[str, Any], make: Callable[[], Any], label: str, timings: dict
) -> None:
    """A demo stage (``run_stage``), also kept in the cache under its settings and lorex's code,
    so another run with the same settings (the quick benches after the quick demo) copies it.
    ``timings[label]`` gets its seconds, data generation included: metrics.json shows where a
    run's time went."""
    kept = cache_dir() / "stages" / f"{stamp(**record)[:12]}-{code_fingerprint()}"
    run_stage(path, record, make, label, say, timings, kept)


def copy_dir(source: Path, target: Path) -> None:
    """A stage's folder copied whole; a delta model's base path is relative (``../../../base``),
    so the copy finds the same base from the same place in another run's folder."""
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def base_stamp(s: DemoSettings, seed: int) -> dict:
    """What decides the base: equal stamps give the same model, bit for bit, on the CPU."""
    return {
        "stage": "pretrain",
        "preset": s.preset,
        "samples": s.pretrain_samples,
        "epochs": s.pretrain_epochs,
        "lr": s.pretrain_lr,
        "augment": s.pretrain_augment,
        "batch_size": s.batch_size,
        "seed": seed,
        "lorex_version": __version__,
    }


def base_recipe(s: DemoSettings, seed: int) -> dict:
    """The stamp without the version: what a shipped base must have been made with."""
    return {k: v for k, v in base_stamp(s, seed).items() if k != "lorex_version"}


def ensure_base(
    s: DemoSettings, seed: int, out: Path, device: torch.device | str, timings: dict[str, float]
) -> Path:
    """Pretrain the base once per settings (cached under the cache dir; the shipped base when
    the settings are its recipe's) and copy it into ``out``."""
    record = base_stamp(s, seed)
    cached = cache_dir() / "models" / f"base-{s.preset}-{stamp(**record)[:12]}"
    cfg = TrainConfig(
        epochs=s.pretrain_epochs,
        batch_size=s.batch_size,
        lr=s.pretrain_lr,
        seed=seed,
        max_samples=s.pretrain_samples,
        augment=s.pretrain_augment,
    )
    # The shipped base is the same model, bit for bit, without the minutes of pretraining.
    shipped = find_shipped(SHIPPED_BASE, base_recipe(s, seed))
    if shipped is not None:
        label = (
            f"base {s.preset} on pretrain/chars ({s.pretrain_epochs} epochs), shipped with lorex"
        )
        make = lambda: install_shipped(shipped, cached)  # noqa: E731
    else:
        label = f"pretrain {s.preset} on pretrain/chars ({s.pretrain_epochs} epochs)"
        make = lambda: pretrain(s.preset, cached, cfg, device=device)  # noqa: E731
    run_stage(cached, record, make, label, say, timings)
    target = out / "base"
    if stage_record(target) != record:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(cached, target)
    return target
