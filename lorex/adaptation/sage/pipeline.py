"""``lorex adapt reid``: source experts in, one gated target model out (SAGE-reID stages 2-4).

Every variant is measured on the target's query and gallery, for reporting only: no step
selects a model, an epoch or a setting on target labels (the authors' code keeps the best
target-test mAP; we keep the last model). Stage outputs go to a work directory beside ``out``
(``OUT.parts/``) and are reused when their settings match, so a stopped run resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import train_gate
from lorex.adaptation.sage.report import gate_weights_png, sage_report
from lorex.adaptation.sage.stages import (
    GATE_VARIANTS,
    check_sources,
    costs,
    gate_weight_means,
    lora_experts,
    source_names,
    variant_models,
    work_dir,
    write_adapted,
)
from lorex.adaptation.sage.target_experts import adapt_source_expert
from lorex.data.reid import load_reid_data, subset_ids
from lorex.errors import LorexError
from lorex.io import read_json
from lorex.training import distributed
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.evaluation import evaluate_reid
from lorex.training.records import run_record

__all__ = ["GATE_VARIANTS", "adapt_reid", "source_names"]


def adapt_reid(
    sources: Sequence[str | Path],
    target: str | Path,
    out: str | Path,
    cfg: SageConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    work: str | Path | None = None,
    diagnostics: bool = False,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Adapt ``sources`` (re-ID experts) to ``target`` (its unlabelled train images) and write the
    gated model (``cfg.gate``) to ``out`` with ``metrics.json``, ``report.md`` and
    ``gate_weights.png``. ``diagnostics`` records each clustering's agreement with the true
    target ids (synthetic benchmarks; the method never reads them). ``checkpoint`` (every,
    resume): each training stage checkpoints under the work directory. Returns the metrics."""
    cfg = cfg or SageConfig()
    device = torch.device(device)
    sources = check_sources(sources)
    out = Path(out)
    work = work_dir(out, work)
    ckpt = checkpoint.at(work / "checkpoints") if checkpoint is not None else None
    data = load_reid_data(target)
    data.train = subset_ids(data.train, cfg.max_target_samples, cfg.seed)
    images = data.train.images
    true_ids = data.train.ids if diagnostics else None
    cameras = data.train.cams if cfg.gate_camera else None
    if cameras is not None and len(np.unique(cameras)) < 2:
        raise LorexError(
            f"{target}: every target train image has the same camera id; the gate's camera term "
            "needs two or more cameras (--no-gate-camera turns it off)"
        )
    names = source_names(sources)
    timings: dict[str, float] = {}

    def adapt(source: Path, path: Path) -> None:
        made_by = run_record("adapt reid (stage 2)", source=str(source), target=str(target))
        sub = ckpt and ckpt.sub(f"experts-{path.name}")
        adapt_source_expert(source, data, path, cfg, device, progress, true_ids, made_by, sub)

    experts = lora_experts(sources, names, work, str(target), cfg, adapt, timings)
    histories: dict[str, Any] = {
        f"lora/{n}": read_json(e / "metrics.json")["history"]
        for n, e in zip(names, experts, strict=True)
    }
    models = variant_models(
        sources,
        experts,
        names,
        work,
        cfg,
        lambda model, label: train_gate(
            model,
            images,
            cfg,
            device,
            progress,
            true_ids,
            ckpt and ckpt.sub(label.replace("/", "-")),
            cameras,
        ),
        device,
        timings,
        histories,
    )

    if not distributed.current().main:  # under torchrun rank 0 measures and writes
        return {}
    # measurements (reporting only)
    variants = {label: evaluate_reid(model, data, device) for label, model in models.items()}
    cost = costs(models, names, variants, data.query.images, device)
    everything = np.concatenate([data.query.images, data.gallery.images])
    gate_weights = {
        label: gate_weight_means(models[label], everything, device)
        for label in GATE_VARIANTS.values()
    }
    results = {
        "names": names,
        "variants": variants,
        "costs": cost,
        "gate_weights": gate_weights,
        "histories": histories,
        "stage_seconds": timings,
        "target_train_images": len(images),
    }

    def files(metrics: dict[str, Any]) -> dict[str, Any]:
        png = gate_weights_png(gate_weights, names, f"gate weights on {target}")
        return {"report.md": sage_report(metrics).encode(), "gate_weights.png": png}

    metrics = write_adapted(
        "adapt reid", models, out, work, cfg, sources, str(target), results, files, device
    )
    return metrics
