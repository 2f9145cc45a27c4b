"""Person re-ID: stage 1 of SAGE-reID, one source expert per domain.

``lorex train --objective reid`` trains any method (``full`` for SAGE's experts) on a re-ID
dataset the way the authors' code does (brief, Part A, A.3-A.4):

* batches of P identities x K images (:class:`lorex.data.reid.PKSampler`; default 16 x 4);
* a BN-neck head (:class:`lorex.models.BNNeckHead`): pooled feature -> BatchNorm1d with its bias
  frozen at 0 -> bias-free classifier initialised N(0, 0.001);
* loss = label-smoothed cross-entropy (eps 0.1) on the classifier's logits + batch-hard
  soft-margin triplet on the feature before the BN (:mod:`lorex.training.reid_losses`).

The batch pieces here (:class:`ReidForward`, :class:`EpochStats`, :func:`reid_loss`) are also
those of SAGE's pseudo-label stages.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from lorex.data import ImageDataset
from lorex.data.market1501 import ReidSplit
from lorex.data.reid import DEFAULT_INSTANCES, PKSampler
from lorex.errors import LorexError
from lorex.models import BNNeckHead, LorexModel
from lorex.training import distributed
from lorex.training.batches import as_float, chw_tensor, extract_features, random_shift
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.config import TrainConfig
from lorex.training.engine import Objective, TrainResult, data_parallel, make_optimizer, train
from lorex.training.methods import TrainingMethod, trainable_parameters
from lorex.training.reid_losses import batch_hard_soft_triplet, label_smoothed_cross_entropy


class Reid(Objective):
    """``method`` trains ``model`` (active head: a BN-neck) on a relabelled re-ID train split;
    an epoch is one pass of the P x K sampler, whose plan is drawn from the seed up front."""

    loop = "fit_reid"
    find_unused = True  # in SAGE's stages some trainable biases take no part in the loss

    def __init__(
        self,
        model: LorexModel,
        method: TrainingMethod,
        data: ReidSplit,
        cfg: TrainConfig,
        num_instances: int = DEFAULT_INSTANCES,
        fingerprint: dict[str, Any] | None = None,
    ):
        super().__init__()
        head = model.heads[model.active_head] if model.active_head is not None else None
        if not isinstance(head, BNNeckHead):
            raise LorexError("re-ID training needs a BN-neck head (add_head(..., kind='bnneck'))")
        if cfg.batch_size % num_instances or cfg.batch_size // num_instances < 2:
            raise LorexError(
                f"--batch-size {cfg.batch_size} with --num-instances {num_instances}: the batch "
                "must be P x K images with P >= 2 identities (e.g. 64 = 16 x 4)"
            )
        self.model, self.head, self.method, self.data, self.cfg = model, head, method, data, cfg
        self.k, self.seed, self.desc = num_instances, cfg.seed, f"{method.name} (re-ID)"
        self.extra_fingerprint = fingerprint or {}

    def prepare(self, device: torch.device) -> None:
        model, method, cfg, train_ids = self.model, self.method, self.cfg, self.data.ids
        self.device = device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.generators = {"augment": self.generator}
        sampler = PKSampler(train_ids, cfg.batch_size // self.k, self.k, cfg.seed)
        self.plan = [sampler.epoch() for _ in range(cfg.epochs)]
        self.epochs = len(self.plan)
        if self.total_steps() == 0:
            raise LorexError(f"too few identities with {self.k} images for one batch")
        model.to(device)
        names = [str(i) for i in range(int(train_ids.max()) + 1)]
        method.fit_to_data(ImageDataset(self.data.images, train_ids, names, "reid"))
        method.prepare(model)
        self.head.bn.bias.requires_grad_(False)  # the BN-neck's bias stays 0
        self.params = trainable_parameters(model)
        if not self.params:
            raise LorexError(f"method '{method.name}' left no trainable parameters")
        self.x, self.y = chw_tensor(self.data.images), torch.from_numpy(train_ids)
        self.use_cache = method.frozen_backbone and not cfg.augment and cfg.feature_cache
        self.stats = EpochStats()
        self.fingerprint = {
            "config": cfg.to_dict(),
            "method": method.name,
            "method_options": method.options(),
            "samples": len(self.x),
            "num_instances": self.k,
            **self.extra_fingerprint,
        }

    def total_steps(self) -> int:
        return sum(len(e) for e in self.plan)

    def optimizers(self, total: int):
        return make_optimizer(self.model, self.cfg, total)

    def forward_module(self) -> nn.Module:
        return ReidForward(self.model, self.head)

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        if distributed.current().main:  # rank 0 carries the sums so far; the others add theirs
            self.stats = EpochStats.from_state(position["stats"])

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"stats": self.stats.reduced(self.device).state()}, {}

    def start(self, result: TrainResult) -> None:
        result.feature_cache = self.use_cache
        if self.use_cache:
            tick = time.perf_counter()
            self.features = extract_features(
                self.model, self.x, max(self.cfg.batch_size, 64), self.device
            )
            result.cache_seconds = time.perf_counter() - tick
        self.model.train(not self.method.frozen_backbone)
        self.model.heads.train()  # the BN-neck learns its batch statistics whatever the method

    def begin_epoch(self, epoch: int) -> list[np.ndarray]:
        self.epoch = epoch
        return self.plan[epoch]

    def step(self, batch: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        mine, part = group_rows(batch, self.k)  # whole ids per rank
        idx = torch.from_numpy(mine)
        target = self.y[idx].to(self.device)
        if self.use_cache:
            feats, logits = self.forward(
                self.features[idx.to(self.features.device)].to(self.device), True
            )
        else:
            images = as_float(self.x[idx], self.device)
            if self.cfg.augment:
                images = augment_batch(images, self.generator, part)
            feats, logits = self.forward(images)
        loss = reid_loss(feats, logits, target, self.cfg.label_smoothing, self.stats)
        return loss, {"epoch": self.epoch + 1, "loss": f"{loss.item():.3f}"}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        summary = self.stats.reduced(self.device).summary()
        self.stats = EpochStats()
        return {"epoch": epoch + 1, **summary, "steps": len(self.plan[epoch])}


def fit_reid(
    model: LorexModel,
    method: TrainingMethod,
    train_split: ReidSplit,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    num_instances: int = DEFAULT_INSTANCES,
    checkpoint: CheckpointOptions | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (active head: a BN-neck) on a relabelled re-ID train split.

    The optimiser and schedule are ``fit``'s (AdamW, warmup + cosine, clip 1.0). The history
    records per epoch the mean ``loss``, its ``ce`` and ``triplet`` parts, and the classifier's
    ``train_accuracy``. ``checkpoint`` and ``fingerprint``: as in ``fit``.
    """
    objective = Reid(model, method, train_split, cfg, num_instances, fingerprint)
    return train(objective, device, progress, checkpoint)


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, part: tuple[int, slice] | None = None
) -> torch.Tensor:
    """Random horizontal flip (p = 0.5), then a random shift of up to 2 pixels with edge
    padding: SAGE's flip + pad-10-and-crop at 256x128, scaled to 64x32. ``part``: as in
    ``random_shift`` (one rank's rows of a global batch)."""
    total, rows = part if part is not None else (len(x), slice(0, len(x)))
    flip = torch.rand(total, generator=generator)[rows] < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return random_shift(x, 2, generator, part)


def group_rows(batch: np.ndarray, group: int) -> tuple[np.ndarray, tuple[int, slice]]:
    """This rank's whole identities of a P x K batch, and where they sit in it."""
    mine, rows = distributed.shard_groups(batch, group, distributed.current())
    return mine, (len(batch), rows)


class ReidForward(nn.Module):
    """Features and the head's logits in one ``forward``, so that DDP sees the whole step."""

    def __init__(self, model: LorexModel, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor, cached: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features_cached(x) if cached else self.model.features(x)
        return feats, self.head(feats)

    @classmethod
    def wrap(cls, model: LorexModel, head: nn.Module, device: torch.device) -> nn.Module:
        """In DDP under torchrun (``find_unused``: some trainable biases may take no part)."""
        return data_parallel(cls(model, head), device, find_unused=True)


class EpochStats:
    """One epoch's mean loss, its cross-entropy and triplet parts, and the classifier's accuracy."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "ce": 0.0, "triplet": 0.0}
        self.correct = self.seen = self.steps = 0

    def state(self) -> dict[str, Any]:
        """Plain numbers, for a checkpoint taken in the middle of an epoch."""
        return {"sums": dict(self.sums), "counts": [self.correct, self.seen, self.steps]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        stats = cls()
        stats.sums = dict(state["sums"])
        stats.correct, stats.seen, stats.steps = state["counts"]
        return stats

    def reduced(self, device: torch.device) -> EpochStats:
        """The sums over every rank (the same numbers alone): what the history reports."""
        values = [*self.sums.values(), self.correct, self.seen, self.steps]
        total = distributed.all_sum(values, device)
        out = EpochStats()
        n = len(self.sums)
        out.sums = dict(zip(self.sums, total[:n], strict=True))
        out.correct, out.seen, out.steps = (int(v) for v in total[n:])
        return out

    def summary(self) -> dict[str, float]:
        steps = max(1, self.steps)
        return {
            **{k: v / steps for k, v in self.sums.items()},
            "train_accuracy": self.correct / max(1, self.seen),
        }


def reid_loss(
    feats: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    stats: EpochStats,
) -> torch.Tensor:
    """The re-ID loss of one batch: label-smoothed CE on the head's logits + batch-hard soft
    triplet on ``feats``; its parts and the classifier's hits are added to ``stats``."""
    ce = label_smoothed_cross_entropy(logits, target, label_smoothing)
    triplet = batch_hard_soft_triplet(feats, target)
    loss = ce + triplet
    for name, value in (("loss", loss), ("ce", ce), ("triplet", triplet)):
        stats.sums[name] += value.item()
    stats.correct += int((logits.argmax(1) == target).sum())
    stats.seen += len(target)
    stats.steps += 1
    return loss
