"""Training on target pseudo-labels: the loop shared by stage 2 (LoRA experts) and stage 4 (gate).

Each epoch re-labels the unlabelled target images with the current model (L2-normalised BN-neck
features -> k-reciprocal Jaccard distance -> DBSCAN, eps fixed on the first clustering), drops
the outliers, resets the classifier to the normalised cluster centroids (a fixed prototype
classifier, as SAGE's code does), then takes ``iters`` steps of label-smoothed cross-entropy +
batch-hard soft triplet on P x K batches of the clustered images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorex.adaptation.pseudo_labels import PseudoLabeler, centroids
from lorex.adaptation.sage.config import SageConfig
from lorex.errors import LorexError
from lorex.metrics.resources import PeakMemory
from lorex.models import BNNeckHead, LorexModel
from lorex.training.loop import TrainResult, as_float, finish_training, optimizer_step
from lorex.training.methods import count_parameters
from lorex.training.reid_objective import (
    EpochStats,
    PKSampler,
    _tensor,
    augment_batch,
    reid_embeddings,
    reid_step,
)

log = logging.getLogger("lorex")

MakeOptimizer = Callable[[int], tuple[torch.optim.Optimizer, Any]]


def reid_head(model: LorexModel) -> BNNeckHead:
    head = model.heads[model.active_head] if model.active_head is not None else None
    if not isinstance(head, BNNeckHead):
        raise LorexError("target adaptation needs a model whose active head is a BN-neck")
    return head


def set_centroid_classifier(model: LorexModel, cents: np.ndarray) -> None:
    """Replace the active BN-neck's classifier by the frozen cluster centroids, one row each, and
    rename its classes ``cluster-0 .. cluster-{C-1}``."""
    head = reid_head(model)
    weight = torch.as_tensor(cents, dtype=head.bn.weight.dtype, device=head.bn.weight.device)
    classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.device)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    classifier.requires_grad_(False)
    head.classifier = classifier
    model.head_info[model.active_head]["classes"] = [f"cluster-{c}" for c in range(len(cents))]


def relabel(
    model: LorexModel, images: np.ndarray, labeler: PseudoLabeler, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels (N,) (-1: outlier) and the normalised centroids (C, D) by the current
    model; the classifier is reset to the centroids."""
    feats = reid_embeddings(model, images, device=device).numpy()
    labels, num = labeler(feats)
    if num < 2:
        raise LorexError(
            f"pseudo-labelling found {num} cluster(s) in {len(images)} target images (eps "
            f"{labeler.eps:.4g}); a larger rho gives a larger eps"
        )
    cents = centroids(feats, labels)
    set_centroid_classifier(model, cents)
    return labels, cents


def _cycle(sampler: PKSampler, iters: int) -> list[np.ndarray]:
    batches: list[np.ndarray] = []
    while len(batches) < iters:
        epoch = sampler.epoch()
        if not epoch:
            raise LorexError("too few pseudo-identities with enough images for one P x K batch")
        batches.extend(epoch)
    return batches[:iters]


def train_on_pseudo_labels(
    model: LorexModel,
    images: np.ndarray,
    labeler: PseudoLabeler,
    params: list[nn.Parameter],
    make_optimizer: MakeOptimizer,
    cfg: SageConfig,
    *,
    epochs: int,
    iters: int,
    device: torch.device,
    progress: bool | None = None,
    desc: str = "adapt",
    true_ids: np.ndarray | None = None,
    freeze_neck: bool = False,
) -> TrainResult:
    """Train ``params`` of ``model`` for ``epochs`` x ``iters`` steps on re-labelled images.

    ``true_ids`` (synthetic data only) adds each clustering's adjusted Rand index to the
    history as a diagnostic; nothing reads it. ``freeze_neck`` keeps the BN-neck in eval mode,
    so its running statistics stay as they were (the gate stage: only the gate trains).
    """
    if not params:
        raise LorexError("nothing to train")
    head = reid_head(model)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = _tensor(images)
    optimizer, scheduler = make_optimizer(epochs * iters)
    result = TrainResult(
        trainable_params=sum(p.numel() for p in params), total_params=count_parameters(model)
    )
    bar = tqdm(
        total=epochs * iters, desc=desc, unit="step", disable=progress is False or None, leave=False
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        for epoch in range(epochs):
            tick = time.perf_counter()
            labels, _ = relabel(model, images, labeler, device)
            label_seconds = time.perf_counter() - tick
            keep = np.flatnonzero(labels >= 0)
            p = cfg.batch_size // cfg.num_instances
            sampler = PKSampler(labels[keep], p, cfg.num_instances, cfg.seed + 1000 * epoch)
            batches = [keep[b] for b in _cycle(sampler, iters)]
            model.train()
            if freeze_neck:
                head.bn.eval()
            stats = EpochStats()
            for idx_np in batches:
                target = torch.from_numpy(labels[idx_np]).to(device)
                batch = as_float(x[torch.from_numpy(idx_np)], device)
                if cfg.augment:
                    batch = augment_batch(batch, generator)
                reid_step(
                    model.features(batch),
                    head,
                    target,
                    cfg.label_smoothing,
                    lambda value, e=epoch: optimizer_step(value, optimizer, scheduler, params, e),
                    stats,
                )
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, clusters=int(labels.max()) + 1)
            entry = {
                "epoch": epoch + 1,
                **stats.summary(),
                "clusters": int(labels.max()) + 1,
                "outlier_fraction": float((labels < 0).mean()),
                "eps": float(labeler.eps),
                "label_seconds": label_seconds,
            }
            if true_ids is not None:
                from sklearn.metrics import adjusted_rand_score

                entry["diagnostic_ari"] = float(adjusted_rand_score(true_ids[keep], labels[keep]))
            result.history.append(entry)
            log.info(
                "%s epoch %d: %d clusters, %.0f%% outliers, loss %.3f",
                desc,
                epoch + 1,
                entry["clusters"],
                100 * entry["outlier_fraction"],
                entry["loss"],
            )
        result.train_seconds = time.perf_counter() - start
    bar.close()
    return finish_training(model, result, mem)
