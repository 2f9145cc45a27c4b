"""Classification: label-smoothed cross-entropy on shuffled batches, any training method.

The objective behind ``lorex train`` and ``lorex pretrain``. With a frozen backbone and no
augmentation the backbone's features are computed once (the feature cache) and each step runs
only the trainable part.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from lorex.data import ImageDataset
from lorex.errors import LorexError
from lorex.models import LorexModel
from lorex.training import distributed
from lorex.training.batches import as_float, extract_features, images_to_tensor, random_shift
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.config import TrainConfig
from lorex.training.engine import Objective, TrainResult, data_parallel, make_optimizer, train
from lorex.training.methods import TrainingMethod, trainable_parameters

log = logging.getLogger("lorex")


class Classification(Objective):
    """``method`` trains ``model`` on ``data``; ``freeze_head`` keeps the task heads fixed."""

    loop = "fit"

    def __init__(
        self,
        model: LorexModel,
        method: TrainingMethod,
        data: ImageDataset,
        cfg: TrainConfig,
        freeze_head: bool = False,
        fingerprint: dict | None = None,
    ):
        super().__init__()
        self.model, self.method, self.data, self.cfg = model, method, data, cfg
        self.freeze_head, self.seed, self.epochs = freeze_head, cfg.seed, cfg.epochs
        self.desc = f"{method.name} on {data.name or 'data'}"
        self.extra_fingerprint = fingerprint or {}

    def prepare(self, device: torch.device) -> None:
        model, method, cfg = self.model, self.method, self.cfg
        self.device, self.world = device, distributed.current()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.generators = {"data": self.generator}
        model.to(device)
        method.fit_to_data(self.data)
        method.prepare(model)
        if self.freeze_head:
            model.heads.requires_grad_(False)
        self.params = trainable_parameters(model)
        if not self.params:
            raise LorexError(f"method '{method.name}' left no trainable parameters")
        self.x, self.y = images_to_tensor(self.data)
        self.use_cache = method.frozen_backbone and not cfg.augment and cfg.feature_cache
        self.order, self.loss_sum, self.correct = None, 0.0, 0
        self.fingerprint = {
            "config": cfg.to_dict(),
            "method": method.name,
            "method_options": method.options(),
            "data": self.data.name,
            "samples": len(self.x),
            "freeze_head": self.freeze_head,
            **self.extra_fingerprint,
        }

    def total_steps(self) -> int:
        return math.ceil(len(self.x) / self.cfg.batch_size) * self.cfg.epochs

    def optimizers(self, total: int):
        return make_optimizer(self.model, self.cfg, total)

    def forward_module(self) -> torch.nn.Module:
        return DataParallelStep(self.model)

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        self.order = arrays["order"]
        if self.world.main:  # rank 0 carries the sums so far; the others add their shares
            self.loss_sum, self.correct = position["loss_sum"], position["correct"]

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sums = distributed.all_sum([self.loss_sum, self.correct], self.device)
        return {"loss_sum": sums[0], "correct": int(sums[1])}, {"order": self.order}

    def start(self, result: TrainResult) -> None:
        result.feature_cache = self.use_cache
        if self.use_cache:
            log.info("feature cache: on (frozen backbone, no augmentation): the backbone runs once")
            tick = time.perf_counter()
            self.features = extract_features(
                self.model, self.x, max(self.cfg.batch_size, 64), self.device
            )
            result.cache_seconds = time.perf_counter() - tick
        elif self.method.frozen_backbone:
            reason = "augmentation changes the inputs" if self.cfg.augment else "turned off"
            log.info("feature cache: off (%s): the frozen backbone runs every step", reason)
        self.model.train(not self.method.frozen_backbone)

    def begin_epoch(self, epoch: int) -> list[torch.Tensor]:
        self.epoch = epoch
        if self.order is None:  # a resumed epoch keeps the order it was drawn with
            self.order = torch.randperm(len(self.x), generator=self.generator)
            self.loss_sum, self.correct = 0.0, 0
        n = self.cfg.batch_size
        return [self.order[i : i + n] for i in range(0, len(self.x), n)]

    def step(self, batch_idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, device = self.cfg, self.device
        rows = distributed.shard_slice(len(batch_idx), self.world)
        idx = batch_idx[rows]  # this rank's share of the global batch
        target = self.y[idx].to(device)
        if self.use_cache:
            logits = self.forward(self.features[idx.to(self.features.device)].to(device), True)
        else:
            batch = as_float(self.x[idx], device)
            if cfg.augment:
                batch = random_shift(batch, 2, self.generator, (len(batch_idx), rows))
            logits = self.forward(batch, False)
        loss = share_of_batch_cross_entropy(logits, target, cfg.label_smoothing, len(batch_idx))
        self.loss_sum += loss.item() * len(batch_idx) / self.world.size
        self.correct += int((logits.argmax(1) == target).sum())
        return loss, {"epoch": self.epoch + 1, "loss": f"{loss.item():.3f}"}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        loss_all, correct_all = distributed.all_sum([self.loss_sum, self.correct], self.device)
        self.order = None
        return {
            "epoch": epoch + 1,
            "loss": loss_all / len(self.x),
            "train_accuracy": int(correct_all) / len(self.x),
        }


def fit(
    model: LorexModel,
    method: TrainingMethod,
    data: ImageDataset,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    freeze_head: bool = False,
    checkpoint: CheckpointOptions | None = None,
    fingerprint: dict | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``method``; returns the loss curve and resource figures.

    ``freeze_head`` keeps the task heads as they are (fine-tuning under a fixed head, as Task
    Arithmetic's experts do: their task vectors merge better, docs/merging.md).
    ``checkpoint`` saves the loop's whole state every ``checkpoint.every`` steps and, with
    ``resume``, continues from it; ``fingerprint`` adds what the caller knows must not change
    between the run and its resumption (base, data).
    """
    objective = Classification(model, method, data, cfg, freeze_head, fingerprint)
    return train(objective, device, progress, checkpoint)


def share_of_batch_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, batch_size: int
) -> torch.Tensor:
    """The cross-entropy of one rank's share of a global batch of ``batch_size``, scaled so that
    DDP's average over ranks is the mean over the whole batch (uneven shares included); the
    plain mean in one process."""
    world = distributed.current()
    if not world.distributed:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="sum")
    return total * (world.size / batch_size)


class DataParallelStep(torch.nn.Module):
    """The training forward (on images, or on cached backbone features) as one ``forward``, so
    that DDP sees every step."""

    def __init__(self, model: LorexModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, cached: bool) -> torch.Tensor:
        return self.model.forward_cached(x) if cached else self.model(x)

    @classmethod
    def wrap(
        cls, model: LorexModel, device: torch.device, find_unused: bool = False
    ) -> torch.nn.Module:
        """The step in DDP under torchrun, bare otherwise (``engine.data_parallel``)."""
        return data_parallel(cls(model), device, find_unused)
