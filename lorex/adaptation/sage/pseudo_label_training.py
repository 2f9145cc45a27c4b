"""Training on target pseudo-labels: the loop shared by stage 2 (LoRA experts) and stage 4 (gate).

Each epoch re-labels the unlabelled target images with the current model (L2-normalised BN-neck
features -> k-reciprocal Jaccard distance -> DBSCAN, eps fixed on the first clustering), drops
the outliers, resets the classifier to the normalised cluster centroids (a fixed prototype
classifier, as SAGE's code does), then takes ``iters`` steps of label-smoothed cross-entropy +
batch-hard soft triplet on P x K batches of the clustered images.

With the target's camera ids (the gate stage), each step also measures the between-camera share
of the features' variance on random target images and adds it to the loss
(``lorex.adaptation.camera_invariance``); docs/sage.md has the reason and the measurements.
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

from lorex.adaptation.camera_invariance import camera_share
from lorex.adaptation.pseudo_labels import PseudoLabeler, centroids
from lorex.adaptation.sage.config import SageConfig
from lorex.data.reid import PKSampler
from lorex.errors import LorexError
from lorex.metrics.resources import PeakMemory
from lorex.models import BNNeckHead, LorexModel
from lorex.training import distributed
from lorex.training.batches import chw_tensor
from lorex.training.checkpoint import Checkpointer, CheckpointOptions
from lorex.training.evaluation import reid_embeddings
from lorex.training.loop import (
    TrainingDiverged,
    TrainResult,
    as_float,
    diverged,
    finish_training,
    optimizer_step,
)
from lorex.training.methods import count_parameters
from lorex.training.objectives.reid import (
    EpochStats,
    ReidForward,
    augment_batch,
    group_rows,
    reid_loss,
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
    model; the classifier is reset to the centroids.

    Under torchrun each rank embeds its shard of the images, rank 0 gathers the features,
    clusters them and sends the labels, centroids and eps to every rank: the clustering is
    global, and the centroids are the same bits everywhere."""
    device = torch.device(device)
    world = distributed.current()
    rows = distributed.shard_slice(len(images), world)
    local = reid_embeddings(model, images[rows], device=device)
    link = device if device.type == "cuda" else torch.device("cpu")  # nccl or gloo
    feats = distributed.gather_rows(local.to(link), len(images)).cpu().numpy()
    labels = cents = None
    summary = np.zeros(2)
    if world.main:
        labels, num = labeler(feats)
        summary[:] = num, labeler.eps
        if num >= 2:
            cents = centroids(feats, labels)
    num, eps = distributed.broadcast_array(summary, link)
    labeler.eps = float(eps)
    if num < 2:
        raise LorexError(
            f"pseudo-labelling found {int(num)} cluster(s) in {len(images)} target images (eps "
            f"{eps:.4g}); a larger rho gives a larger eps"
        )
    labels = distributed.broadcast_array(labels, link)
    cents = distributed.broadcast_array(cents, link)
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
    checkpoint: CheckpointOptions | None = None,
    fingerprint: dict[str, Any] | None = None,
    camera_ids: np.ndarray | None = None,
    camera_batch: int = 128,
) -> TrainResult:
    """Train ``params`` of ``model`` for ``epochs`` x ``iters`` steps on re-labelled images.

    ``camera_ids`` (N,): each step also embeds ``camera_batch`` random target images (in the
    same forward) and the loss becomes ``L / L_0 + S / S_0``, with ``L`` the pseudo-label loss,
    ``S`` the features' between-camera share and ``_0`` their values at the first step, so that
    neither term carries a tuned weight. The history then records each epoch's mean ``S``.

    ``true_ids`` (synthetic data only) adds each clustering's adjusted Rand index to the
    history as a diagnostic; nothing reads it. ``freeze_neck`` keeps the BN-neck in eval mode,
    so its running statistics stay as they were (the gate stage: only the gate trains).
    ``checkpoint``/``fingerprint``: as in ``fit``; a checkpoint also holds the epoch's
    pseudo-labels, batches and centroids, so a resumed epoch is not clustered again.
    """
    if not params:
        raise LorexError("nothing to train")
    head = reid_head(model)
    torch.manual_seed(cfg.seed)
    world = distributed.current()
    generator = torch.Generator().manual_seed(cfg.seed)
    generators = {"augment": generator}
    x = chw_tensor(images)
    cameras = None
    if camera_ids is not None:
        if not freeze_neck:  # the extra images go through the BN-neck: it must not learn them
            raise LorexError("the camera term needs the BN-neck frozen (freeze_neck=True)")
        cameras = torch.as_tensor(np.asarray(camera_ids, np.int64))
        if cameras.shape != (len(images),):
            raise LorexError(f"camera ids: {len(cameras)} for {len(images)} target images")
        generators["camera"] = torch.Generator().manual_seed(cfg.seed + 1)
        camera_batch = min(camera_batch, len(images))
    first: dict[str, float] = {}  # each loss term's value at the first step
    optimizer, scheduler = make_optimizer(epochs * iters)
    result = TrainResult(
        trainable_params=sum(p.numel() for p in params), total_params=count_parameters(model)
    )
    ckpt = Checkpointer(
        checkpoint,
        {
            "loop": "pseudo-labels",
            "config": cfg.to_dict(),
            "epochs": epochs,
            "iters": iters,
            "images": len(images),
            "desc": desc,
            **(fingerprint or {}),
        },
        model,
        optimizer,
        scheduler,
        generators,
    )

    def rebuild_classifier(position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        set_centroid_classifier(model, arrays["centroids"].numpy())

    step, epoch0, batch0, resumed = 0, 0, 0, None
    restored = ckpt.restore(rebuild_classifier)
    if restored is not None:
        step, position, arrays = restored
        epoch0, batch0, result.history = position["epoch"], position["batch"], position["history"]
        labeler.eps = position["eps"]
        first = position.get("first", {})
        resumed = position, arrays
    forward = ReidForward.wrap(model, head, device)
    bar = tqdm(
        total=epochs * iters,
        initial=step,
        desc=desc,
        unit="step",
        disable=progress is False or None or not world.main,
        leave=False,
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        for epoch in range(epoch0, epochs):
            if resumed is None:
                tick = time.perf_counter()
                labels, cents = relabel(model, images, labeler, device)
                label_seconds = time.perf_counter() - tick
                keep = np.flatnonzero(labels >= 0)
                p = cfg.batch_size // cfg.num_instances
                sampler = PKSampler(labels[keep], p, cfg.num_instances, cfg.seed + 1000 * epoch)
                batches = np.stack([keep[b] for b in _cycle(sampler, iters)])
                stats = EpochStats()
            else:  # the epoch a checkpoint was taken in: its clustering and batches as they were
                position, arrays = resumed
                labels, cents = arrays["labels"].numpy(), arrays["centroids"].numpy()
                batches = arrays["batches"].numpy()
                keep = np.flatnonzero(labels >= 0)
                label_seconds = position["label_seconds"]
                stats = EpochStats.from_state(position["stats"]) if world.main else EpochStats()
                resumed = None
            model.train()
            if freeze_neck:
                head.bn.eval()
            for b in range(batch0, len(batches)):
                idx_np, part = group_rows(batches[b], cfg.num_instances)  # whole ids per rank
                target = torch.from_numpy(labels[idx_np]).to(device)
                batch = as_float(x[torch.from_numpy(idx_np)], device)
                if cfg.augment:
                    batch = augment_batch(batch, generator, part)
                share = None
                if cameras is not None:  # this rank's share of the same random images
                    rows = torch.randperm(len(images), generator=generators["camera"])
                    rows = rows[:camera_batch][distributed.shard_slice(camera_batch, world)]
                    batch = torch.cat((batch, as_float(x[rows], device)))
                feats, logits = forward(batch)
                if cameras is not None:
                    n = len(idx_np)
                    share = camera_share(head.bn(feats[n:]), cameras[rows].to(device))
                    feats, logits = feats[:n], logits[:n]
                    stats.sums["camera_share"] = stats.sums.get("camera_share", 0.0) + share.item()

                def step_on(loss: torch.Tensor, e: int = epoch, share=share) -> None:
                    if share is not None:
                        if not first:  # the mean over ranks: one scale everywhere
                            total = distributed.all_sum([loss.item(), share.item()], device)
                            first["loss"], first["camera_share"] = (v / world.size for v in total)
                        loss = loss / first["loss"] + share / max(first["camera_share"], 1e-12)
                    optimizer_step(loss, optimizer, scheduler, params, e)

                try:
                    step_on(reid_loss(feats, logits, target, cfg.label_smoothing, stats))
                except TrainingDiverged as exc:
                    raise diverged(exc, ckpt) from None
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, clusters=int(labels.max()) + 1)
                if ckpt.due(step) or step == epochs * iters:
                    position = {
                        "epoch": epoch,
                        "batch": b + 1,
                        "stats": stats.reduced(device).state(),
                        "history": result.history,
                        "eps": float(labeler.eps),
                        "label_seconds": label_seconds,
                        "first": first,
                    }
                    arrays = {
                        "labels": torch.from_numpy(labels),
                        "centroids": torch.from_numpy(np.ascontiguousarray(cents)),
                        "batches": torch.from_numpy(batches),
                    }
                    ckpt.save(step, position, arrays)
            batch0 = 0
            entry = {
                "epoch": epoch + 1,
                **stats.reduced(device).summary(),
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
    result.checkpoint = ckpt
    return finish_training(model, result, mem)
