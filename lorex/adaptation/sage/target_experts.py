"""Stage 2: each source expert adapted to the unlabelled target with LoRA on pseudo-labels.

Why LoRA and not full fine-tuning: the K adapted experts must later run side by side on one
shared (averaged) backbone, which works when each expert is a small low-rank delta. Following
the authors' code: r = 8, alpha = 32 on every block's qkv, proj, fc1 and fc2, plus every bias of
the backbone (loralib's ``bias="all"``); the BN-neck keeps the source's statistics and its
classifier is reset to the target's cluster centroids every epoch (frozen).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.objectives import train_on_pseudo_labels
from lorex.adaptation.sage.relabel import reid_head
from lorex.adapters.lora import LoraConfig, add_adapter, default_targets, mark_trainable
from lorex.data.market1501 import Market1501
from lorex.errors import LorexError
from lorex.models import LorexModel, load_model
from lorex.training import distributed
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.engine import make_optimizer
from lorex.training.evaluation import evaluate_reid
from lorex.training.expert_jobs import save_trained

TARGET_HEAD = "target"


def start_from_source(source: str | Path, target_hw: tuple[int, int], device) -> LorexModel:
    """The source expert with one BN-neck head for the target (the source's BN statistics, an
    empty classifier until the first clustering)."""
    model = load_model(source, device)
    if model.image_hw != tuple(target_hw):
        raise LorexError(
            f"{source}: the expert takes {model.image_hw[0]}x{model.image_hw[1]} images and the "
            f"target is {target_hw[0]}x{target_hw[1]}"
        )
    bn_state = reid_head(model).bn.state_dict()
    for key in list(model.heads):
        del model.heads[key]
        del model.head_info[key]
    model.add_head(TARGET_HEAD, ["cluster-0"], kind="bnneck")
    reid_head(model).bn.load_state_dict(bn_state)
    return model


def adapt_source_expert(
    source: str | Path,
    target: Market1501,
    out: str | Path,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
    true_ids: np.ndarray | None = None,
    made_by: dict[str, Any] | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Adapt ``source`` (a re-ID expert directory) to ``target``'s unlabelled train images and
    save it as a LoRA delta on the source. Returns its metrics (query vs gallery, reporting
    only: nothing is selected on them)."""
    torch.manual_seed(cfg.seed)  # LoRA's A initialisation
    images = target.train.images
    model = start_from_source(source, images.shape[1:3], device)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=default_targets(model.backbone),
        bias="all",
    )
    add_adapter(model.backbone, lora)
    mark_trainable(model.backbone, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    iters = cfg.iters or math.ceil(len(images) / cfg.batch_size)
    train_cfg = cfg.train_config()
    result = train_on_pseudo_labels(
        model,
        images,
        PseudoLabeler(cfg.k1, cfg.k2, cfg.rho, cfg.min_samples),
        params,
        lambda total: make_optimizer(model, train_cfg, total),
        cfg,
        epochs=cfg.epochs,
        iters=iters,
        device=device,
        progress=progress,
        desc=f"LoRA expert {Path(source).name}",
        true_ids=true_ids,
        checkpoint=checkpoint,
        fingerprint={"source": str(source)},
    )
    if not distributed.current().main:  # under torchrun rank 0 scores and writes
        return {}
    scores = evaluate_reid(model, target, device)
    metrics = {
        **scores,
        "source": str(source),
        "trainable_params": result.trainable_params,
        "train_seconds": result.train_seconds,
        "peak_train_mb": result.peak_train_mb,
        "history": result.history,
    }
    title = f"LoRA expert from {Path(source).name}"
    save_trained(model, out, metrics, result, title, cfg.seed, made_by, "delta", source)
    result.checkpoint.discard()
    return metrics
