"""SAGE's two training objectives on target pseudo-labels, run by :mod:`lorex.training.engine`.

:class:`PseudoIdentities` (re-ID, stage 2's LoRA experts and stage 4's gate): each epoch
re-clusters the target with the current model, then takes ``iters`` steps of label-smoothed
cross-entropy + batch-hard soft triplet on P x K batches of the clustered images. With the
target's camera ids (the gate stage), each step also measures the between-camera share of the
features' variance on random target images and adds it to the loss
(``lorex.adaptation.camera_invariance``; docs/sage.md has the reason and the measurements).

:class:`ClassPseudoLabels` (classification): each epoch labels the target with SHOT's centroids,
then takes ``iters`` steps of cross-entropy on random batches, the head frozen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lorex.adaptation.camera_invariance import camera_share
from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.relabel import (
    class_pseudo_labels,
    cycle_batches,
    features_and_probs,
    reid_head,
    relabel,
    set_centroid_classifier,
)
from lorex.data import ImageDataset
from lorex.data.reid import PKSampler
from lorex.errors import LorexError
from lorex.models import LorexModel
from lorex.training import distributed
from lorex.training.batches import as_float, chw_tensor, images_to_tensor, random_shift
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.engine import Objective, TrainResult, train
from lorex.training.objectives.classification import (
    DataParallelStep,
    share_of_batch_cross_entropy,
)
from lorex.training.objectives.reid import (
    EpochStats,
    ReidForward,
    augment_batch,
    group_rows,
    reid_loss,
)

log = logging.getLogger("lorex")

MakeOptimizer = Callable[[int], tuple[torch.optim.Optimizer, Any]]


class _OnTarget(Objective):
    """What both SAGE objectives share: given trainable ``params``, a caller's optimiser
    factory, ``epochs`` x ``iters`` steps."""

    def __init__(self, model, params, make_optimizer, cfg, epochs, iters, desc, fingerprint):
        super().__init__()
        self.model, self.params, self.make_optimizer, self.cfg = model, params, make_optimizer, cfg
        self.seed, self.epochs, self.iters, self.desc = cfg.seed, epochs, iters, desc
        self.extra_fingerprint = fingerprint or {}
        self.resumed: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None

    def _fingerprint(self, images: int) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "epochs": self.epochs,
            "iters": self.iters,
            "images": images,
            "desc": self.desc,
            **self.extra_fingerprint,
        }

    def total_steps(self) -> int:
        return self.epochs * self.iters

    def optimizers(self, total: int):
        return self.make_optimizer(total)


class PseudoIdentities(_OnTarget):
    """Re-ID on re-clustered pseudo-identities; ``camera_ids`` adds the camera term (the loss
    becomes ``L / L_0 + S / S_0``, each term over its first-step value: no tuned weight)."""

    loop = "pseudo-labels"
    find_unused = True  # some trainable biases take no part in the loss

    def __init__(
        self,
        model,
        images,
        labeler,
        params,
        make_optimizer,
        cfg: SageConfig,
        *,
        epochs,
        iters,
        desc,
        true_ids,
        freeze_neck,
        fingerprint,
        camera_ids,
        camera_batch,
    ):
        super().__init__(model, params, make_optimizer, cfg, epochs, iters, desc, fingerprint)
        if not params:
            raise LorexError("nothing to train")
        self.head, self.images, self.labeler = reid_head(model), images, labeler
        self.true_ids, self.freeze_neck, self.camera_ids = true_ids, freeze_neck, camera_ids
        self.camera_batch = camera_batch

    def prepare(self, device: torch.device) -> None:
        cfg, images = self.cfg, self.images
        self.device, self.world = device, distributed.current()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.generators = {"augment": self.generator}
        self.x, self.cameras = chw_tensor(images), None
        if self.camera_ids is not None:
            if not self.freeze_neck:  # the extra images go through the BN-neck: it must not learn
                raise LorexError("the camera term needs the BN-neck frozen (freeze_neck=True)")
            self.cameras = torch.as_tensor(np.asarray(self.camera_ids, np.int64))
            if self.cameras.shape != (len(images),):
                raise LorexError(f"camera ids: {len(self.cameras)} for {len(images)} target images")
            self.generators["camera"] = torch.Generator().manual_seed(cfg.seed + 1)
            self.camera_batch = min(self.camera_batch, len(images))
        self.first: dict[str, float] = {}  # each loss term's value at the first step
        self.fingerprint = self._fingerprint(len(images))

    def forward_module(self) -> nn.Module:
        return ReidForward(self.model, self.head)

    def before_load(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        set_centroid_classifier(self.model, arrays["centroids"].numpy())

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        self.labeler.eps = position["eps"]
        self.first = position.get("first", {})
        self.resumed = position, arrays

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        position = {
            "stats": self.stats.reduced(self.device).state(),
            "eps": float(self.labeler.eps),
            "label_seconds": self.label_seconds,
            "first": self.first,
        }
        arrays = {
            "labels": torch.from_numpy(self.labels),
            "centroids": torch.from_numpy(np.ascontiguousarray(self.cents)),
            "batches": torch.from_numpy(self.batches),
        }
        return position, arrays

    def begin_epoch(self, epoch: int) -> np.ndarray:
        cfg, self.epoch = self.cfg, epoch
        if self.resumed is None:
            tick = time.perf_counter()
            self.labels, self.cents = relabel(self.model, self.images, self.labeler, self.device)
            self.label_seconds = time.perf_counter() - tick
            self.keep = np.flatnonzero(self.labels >= 0)
            p = cfg.batch_size // cfg.num_instances
            sampler = PKSampler(
                self.labels[self.keep], p, cfg.num_instances, cfg.seed + 1000 * epoch
            )
            self.batches = np.stack([self.keep[b] for b in cycle_batches(sampler, self.iters)])
            self.stats = EpochStats()
        else:  # the epoch a checkpoint was taken in: its clustering and batches as they were
            position, arrays = self.resumed
            self.labels, self.cents = arrays["labels"].numpy(), arrays["centroids"].numpy()
            self.batches = arrays["batches"].numpy()
            self.keep = np.flatnonzero(self.labels >= 0)
            self.label_seconds = position["label_seconds"]
            self.stats = (
                EpochStats.from_state(position["stats"]) if self.world.main else EpochStats()
            )
            self.resumed = None
        self.model.train()
        if self.freeze_neck:
            self.head.bn.eval()
        return self.batches

    def step(self, batch: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, device, x = self.cfg, self.device, self.x
        idx_np, part = group_rows(batch, cfg.num_instances)  # whole ids per rank
        target = torch.from_numpy(self.labels[idx_np]).to(device)
        images = as_float(x[torch.from_numpy(idx_np)], device)
        if cfg.augment:
            images = augment_batch(images, self.generator, part)
        if self.cameras is not None:  # this rank's share of the same random images
            rows = torch.randperm(len(self.images), generator=self.generators["camera"])
            rows = rows[: self.camera_batch][distributed.shard_slice(self.camera_batch, self.world)]
            images = torch.cat((images, as_float(x[rows], device)))
        feats, logits = self.forward(images)
        share = None
        if self.cameras is not None:
            n = len(idx_np)
            share = camera_share(self.head.bn(feats[n:]), self.cameras[rows].to(device))
            feats, logits = feats[:n], logits[:n]
            sums = self.stats.sums
            sums["camera_share"] = sums.get("camera_share", 0.0) + share.item()
        loss = reid_loss(feats, logits, target, cfg.label_smoothing, self.stats)
        if share is not None:
            if not self.first:  # the mean over ranks: one scale everywhere
                total = distributed.all_sum([loss.item(), share.item()], device)
                self.first["loss"], self.first["camera_share"] = (
                    v / self.world.size for v in total
                )
            loss = loss / self.first["loss"] + share / max(self.first["camera_share"], 1e-12)
        return loss, {"epoch": self.epoch + 1, "clusters": int(self.labels.max()) + 1}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        labels, keep = self.labels, self.keep
        entry = {
            "epoch": epoch + 1,
            **self.stats.reduced(self.device).summary(),
            "clusters": int(labels.max()) + 1,
            "outlier_fraction": float((labels < 0).mean()),
            "eps": float(self.labeler.eps),
            "label_seconds": self.label_seconds,
        }
        if self.true_ids is not None:
            from sklearn.metrics import adjusted_rand_score

            entry["diagnostic_ari"] = float(adjusted_rand_score(self.true_ids[keep], labels[keep]))
        log.info(
            "%s epoch %d: %d clusters, %.0f%% outliers, loss %.3f",
            self.desc,
            epoch + 1,
            entry["clusters"],
            100 * entry["outlier_fraction"],
            entry["loss"],
        )
        return entry


class ClassPseudoLabels(_OnTarget):
    """Classification on SHOT's labels, re-computed each epoch; batches drawn at random."""

    loop = "class-pseudo-labels"
    find_unused = True

    def __init__(
        self,
        model,
        data: ImageDataset,
        params,
        make_optimizer,
        cfg,
        epochs,
        iters,
        desc,
        fingerprint,
    ):
        super().__init__(model, params, make_optimizer, cfg, epochs, iters, desc, fingerprint)
        self.data = data

    def prepare(self, device: torch.device) -> None:
        self.device, self.world = device, distributed.current()
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.generators = {"batches": self.generator}
        self.x, self.true = images_to_tensor(self.data)
        self.fingerprint = self._fingerprint(len(self.x))

    def forward_module(self) -> nn.Module:
        return DataParallelStep(self.model)

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        self.resumed = position, arrays

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sums = distributed.all_sum([self.loss_sum, self.correct], self.device)
        return {"loss_sum": sums[0], "correct": int(sums[1])}, {"labels": self.labels}

    def begin_epoch(self, epoch: int) -> range:
        if self.resumed is None:
            feats, probs = features_and_probs(self.model, self.x, self.device)
            mine = class_pseudo_labels(feats, probs) if self.world.main else None
            link = self.device if self.device.type == "cuda" else torch.device("cpu")
            self.labels = torch.from_numpy(distributed.broadcast_array(mine, link))  # rank 0's
            self.loss_sum, self.correct = 0.0, 0
        else:  # the epoch a checkpoint was taken in, with its labels
            position, arrays = self.resumed
            self.labels = arrays["labels"]
            self.loss_sum, self.correct = position["loss_sum"], position["correct"]
            if not self.world.main:  # rank 0 carries the sums so far
                self.loss_sum, self.correct = 0.0, 0
            self.resumed = None
        self.model.train()
        return range(self.iters)

    def step(self, batch: int) -> tuple[torch.Tensor, None]:
        cfg, labels = self.cfg, self.labels
        drawn = torch.randint(len(self.x), (cfg.batch_size,), generator=self.generator)
        rows = distributed.shard_slice(len(drawn), self.world)
        idx = drawn[rows]  # this rank's share of the global batch
        images = as_float(self.x[idx], self.device)
        if cfg.augment:
            images = random_shift(images, 2, self.generator, (len(drawn), rows))
        logits = self.forward(images, False)
        loss = share_of_batch_cross_entropy(
            logits, labels[idx].to(self.device), cfg.label_smoothing, len(drawn)
        )
        self.loss_sum += loss.item() / self.world.size
        self.correct += int((logits.argmax(1).cpu() == labels[idx]).sum())
        return loss, None

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        loss_sum, correct = distributed.all_sum([self.loss_sum, self.correct], self.device)
        return {
            "epoch": epoch + 1,
            "loss": loss_sum / self.iters,
            # the share of pseudo-labels that are right: a diagnostic nothing reads
            "diagnostic_label_accuracy": float((self.labels == self.true).float().mean()),
            # agreement with the pseudo-labels it trains on, as in the re-ID objective
            "train_accuracy": int(correct) / (self.iters * self.cfg.batch_size),
        }


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
    same forward) and the loss becomes ``L / L_0 + S / S_0``; the history then records each
    epoch's mean ``S``. ``true_ids`` (synthetic data only) adds each clustering's adjusted Rand
    index to the history as a diagnostic; nothing reads it. ``freeze_neck`` keeps the BN-neck
    in eval mode, so its running statistics stay as they were (the gate stage).
    ``checkpoint``/``fingerprint``: as in ``fit``; a checkpoint also holds the epoch's
    pseudo-labels, batches and centroids, so a resumed epoch is not clustered again.
    """
    objective = PseudoIdentities(
        model,
        images,
        labeler,
        params,
        make_optimizer,
        cfg,
        epochs=epochs,
        iters=iters,
        desc=desc,
        true_ids=true_ids,
        freeze_neck=freeze_neck,
        fingerprint=fingerprint,
        camera_ids=camera_ids,
        camera_batch=camera_batch,
    )
    return train(objective, device, progress, checkpoint)
