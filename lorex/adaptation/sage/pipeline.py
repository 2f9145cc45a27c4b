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
from lorex.adaptation.sage.stages import GATE_VARIANTS, SageRun, source_names
from lorex.adaptation.sage.target_experts import adapt_source_expert
from lorex.data.reid import load_reid_data, subset_ids
from lorex.errors import LorexError
from lorex.io import read_json
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
    run = SageRun.start(sources, out, cfg, device, work, checkpoint)
    cfg, device = run.cfg, run.device
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

    def adapt(source: Path, path: Path, sub: CheckpointOptions | None) -> None:
        made_by = run_record("adapt reid (stage 2)", source=str(source), target=str(target))
        adapt_source_expert(source, data, path, cfg, device, progress, true_ids, made_by, sub)

    experts = run.experts(str(target), adapt)
    for name, expert in zip(run.names, experts, strict=True):
        run.histories[f"lora/{name}"] = read_json(expert / "metrics.json")["history"]
    models = run.variants(
        experts,
        lambda model, sub: train_gate(model, images, cfg, device, progress, true_ids, sub, cameras),
    )

    def files(metrics: dict[str, Any]) -> dict[str, Any]:
        title = f"gate weights on {target}"
        png = gate_weights_png(metrics["gate_weights"], run.names, title)
        return {"report.md": sage_report(metrics).encode(), "gate_weights.png": png}

    # measurements (reporting only)
    return run.finish(
        "adapt reid",
        str(target),
        models,
        lambda model: evaluate_reid(model, data, device),
        data.query.images,
        np.concatenate([data.query.images, data.gallery.images]),
        {"target_train_images": len(images)},
        files,
    )
