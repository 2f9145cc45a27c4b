"""SAGE on a classification task (the digit domains): same stages, class pseudo-labels.

Re-ID clusters pseudo-identities because target identities are new; in classification the
target shares the sources' classes, so cluster ids would not line up with them. The one change
is therefore the labelling step (SHOT's, Liang et al. 2020): each class's centroid is the
mean of the L2-normalised target features weighted by the expert's softmax, every image takes
its nearest centroid (cosine), and a second round recomputes the centroids from those hard
labels. The expert's own head stays frozen as the classifier (SHOT freezes it too); stage 2
trains LoRA (r 8, alpha 32, every block's qkv, proj, fc1, fc2) plus the biases with
label-smoothed cross-entropy on random batches; stage 4 trains only the gate on one labelling
by the uniform model. Nothing reads target labels except the final scoring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import (
    add_target_head,
    gate_optimizer,
)
from lorex.adaptation.sage.objectives import ClassPseudoLabels
from lorex.adaptation.sage.stages import SageRun
from lorex.adapters.gated import mark_gate_trainable
from lorex.adapters.lora import LoraConfig, add_adapter, default_targets, mark_trainable
from lorex.data import ImageDataset, load_dataset
from lorex.errors import LorexError
from lorex.metrics.classification import accuracy
from lorex.models import LorexModel, load_model, save_model
from lorex.training import distributed
from lorex.training.batches import predict
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.engine import TrainResult, make_optimizer, train

log = logging.getLogger("lorex")


def adapt_source_expert_classification(
    source: str | Path,
    target: ImageDataset,
    out: str | Path,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Stage 2 for classification: LoRA + biases on SHOT pseudo-labels, the head frozen."""
    torch.manual_seed(cfg.seed)
    model = load_model(source, device)
    if model.active_head is None or list(model.classes) != list(target.classes):
        raise LorexError(f"{source}: its head's classes differ from the target's")
    state = model.heads[model.active_head].state_dict()
    for key in list(model.heads):
        del model.heads[key]
        del model.head_info[key]
    add_target_head(model, "linear", state, list(target.classes))
    model.to(device)
    add_adapter(
        model.backbone,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=default_targets(model.backbone),
            bias="all",
        ),
    )
    mark_trainable(model.backbone, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    train_cfg = cfg.train_config()
    iters = cfg.iters or math.ceil(len(target) / cfg.batch_size)
    objective = ClassPseudoLabels(
        model,
        target,
        params,
        lambda total: make_optimizer(model, train_cfg, total),
        cfg,
        cfg.epochs,
        iters,
        f"LoRA expert {Path(source).name}",
        {"source": str(source)},
    )
    result = train(objective, device, progress, checkpoint)
    if not distributed.current().main:  # under torchrun rank 0 writes
        return {}
    metrics = {"history": result.history, "train_seconds": result.train_seconds}
    save_model(
        model,
        out,
        weights="delta",
        base_dir=source,
        seed=cfg.seed,
        extra_files={"metrics.json": metrics},
    )
    result.checkpoint.discard()
    return metrics


def train_gate_classification(
    model: LorexModel,
    target: ImageDataset,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> TrainResult:
    params = mark_gate_trainable(model.backbone)
    model.heads.requires_grad_(False)

    def make_opt(total: int):
        return gate_optimizer(model, cfg.gate_lr)

    kind = model.backbone.gate_config.kind
    objective = ClassPseudoLabels(
        model, target, params, make_opt, cfg, 1, cfg.gate_iters, f"{kind} gate", {"gate": kind}
    )
    return train(objective, device, progress, checkpoint)


def adapt_classification(
    sources: Sequence[str | Path],
    target: str,
    out: str | Path,
    cfg: SageConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    work: str | Path | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """``adapt_reid``'s pipeline on a classification target: every variant's test accuracy.
    ``checkpoint`` (every, resume): each training stage checkpoints under the work directory."""
    run = SageRun.start(sources, out, cfg, device, work, checkpoint)
    cfg, device = run.cfg, run.device
    train = load_dataset(target, "train", cfg.max_target_samples, cfg.seed)
    test = load_dataset(target, "test")

    def adapt(source: Path, path: Path, sub: CheckpointOptions | None) -> None:
        adapt_source_expert_classification(source, train, path, cfg, device, progress, sub)

    experts = run.experts(f"classify {target}", adapt)
    models = run.variants(
        experts,
        lambda model, sub: train_gate_classification(model, train, cfg, device, progress, sub),
    )
    return run.finish(
        "adapt classify",
        target,
        models,
        lambda model: {"accuracy": _accuracy(model, test, device)},
        test.images,
        test.images[:512],
    )


def _accuracy(model: LorexModel, data: ImageDataset, device: torch.device) -> float:
    """Test accuracy of the active head (a source's own, or the target head)."""
    if list(model.classes) != list(data.classes):
        raise LorexError(f"the model's classes differ from {data.name}'s")
    return float(accuracy(predict(model, data, 256, device), data.labels))
