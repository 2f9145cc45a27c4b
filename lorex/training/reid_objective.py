"""The person re-ID training objective: stage 1 of SAGE-reID, one source expert per domain.

``lorex train --objective reid`` trains any method (``full`` for SAGE's experts) on a re-ID
dataset (``reid/a`` .. ``reid/d`` or a Market-1501 folder) the way the authors' code does
(brief, Part A, A.3-A.4):

* batches of P identities x K images (:class:`PKSampler`; P = batch size / K, default 16 x 4);
* a BN-neck head (:class:`lorex.models.BNNeckHead`): pooled feature -> BatchNorm1d with its bias
  frozen at 0 -> bias-free classifier initialised N(0, 0.001);
* loss = label-smoothed cross-entropy (eps 0.1) on the classifier's logits
  (:func:`label_smoothed_cross_entropy`) + batch-hard soft-margin triplet on the feature before
  the BN (:func:`batch_hard_soft_triplet`);
* evaluation: L2-normalised BN features of query and gallery, squared Euclidean distance
  (``2 - 2 cos``), :func:`lorex.metrics.reid.evaluate` (mAP, CMC rank-1/5/10, mINP).

A base made for another image size (the 32x32 digit bases) is fitted to the 64x32 crops by
resampling its position table (:func:`fit_image_size`); see docs/reid.md, "Source experts".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorex.data import ImageDataset
from lorex.data.market1501 import FOLDERS, Market1501, ReidSplit, relabel
from lorex.errors import LorexError
from lorex.metrics.agreement import mean_se
from lorex.metrics.reid import evaluate
from lorex.metrics.resources import PeakMemory, inference_ms_per_image
from lorex.models import BNNeckHead, LorexModel, load_model
from lorex.training import distributed
from lorex.training.checkpoint import Checkpointer, CheckpointOptions
from lorex.training.loop import (
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    as_float,
    diverged,
    extract_features,
    finish_training,
    make_optimizer,
    optimizer_step,
    random_shift,
)
from lorex.training.methods import TrainingMethod, count_parameters, trainable_parameters

log = logging.getLogger("lorex")

DEFAULT_INSTANCES = 4  # K: images per identity in a batch (SAGE: 16 ids x 4)
RANKS = (1, 5, 10)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def label_smoothed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, eps: float = 0.1
) -> torch.Tensor:
    """Mean cross-entropy against ``(1 - eps) * one_hot + eps / C`` (CrossEntropyLabelSmooth of
    open-reid / MMT, which SAGE uses; equal to ``F.cross_entropy(label_smoothing=eps)``)."""
    if not 0 <= eps < 1:
        raise LorexError(f"label smoothing: expected 0 <= eps < 1, got {eps}")
    log_p = F.log_softmax(logits, dim=1)
    smooth = torch.full_like(log_p, eps / logits.shape[1])
    smooth.scatter_add_(
        1, targets[:, None], torch.full_like(log_p[:, :1], 1.0 - eps)
    )  # (1 - eps) on the true class, plus its eps / C share
    return -(smooth * log_p).sum(1).mean()


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` Euclidean distances, ``sqrt(max(|a|^2 + |b|^2 - 2ab, 1e-12))`` as MMT's
    ``euclidean_dist``: the clamp keeps the gradient finite for identical images."""
    sq = x.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_soft_triplet(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch-hard triplet loss with a soft margin: mean over anchors of
    ``softplus(d(a, hardest positive) - d(a, hardest negative))``.

    SAGE's ``SoftTripletLoss_vallia(margin=0)``: ``-log_softmax([d_ap, d_an])[1]``, which is this
    softplus. The hardest positive may be the anchor itself (distance ~1e-6) when it is its
    identity's only image in the batch, as in the authors' code. Needs two identities in a batch.
    """
    if features.ndim != 2 or targets.shape != (features.shape[0],):
        raise LorexError(
            f"triplet: expected features (B, D) and targets (B,), got {tuple(features.shape)} "
            f"and {tuple(targets.shape)}"
        )
    same = targets[:, None] == targets[None, :]
    if bool(same.all()):
        raise LorexError("triplet: a batch needs at least two identities")
    dist = pairwise_euclidean(features)
    d_ap = dist.masked_fill(~same, float("-inf")).max(1).values
    d_an = dist.masked_fill(same, float("inf")).min(1).values
    valid = torch.isfinite(d_an)  # an anchor with no negative in the batch adds nothing
    return F.softplus(d_ap[valid] - d_an[valid]).sum() / features.shape[0]


# --------------------------------------------------------------------------------------------
# P x K sampler
# --------------------------------------------------------------------------------------------


class PKSampler:
    """Batches of P identities x K images each, seeded and deterministic.

    Each epoch (torchreid's ``RandomIdentitySampler``): every identity's images are shuffled and
    cut into chunks of K (an identity with fewer than K images is drawn K times with
    replacement; a remainder shorter than K is left out this epoch); then batches take one chunk
    from each of P distinct identities chosen at random among those with chunks left, until
    fewer than P have any. So an epoch sees about every image once. A batch lists its
    identities' chunks one after the other: ``batch.reshape(P, K)`` has one identity per row.
    """

    def __init__(self, ids: np.ndarray, p: int, k: int = DEFAULT_INSTANCES, seed: int = 0):
        ids = np.asarray(ids)
        if k < 1:
            raise LorexError(f"instances per identity: expected K >= 1, got {k}")
        if p < 2:
            raise LorexError(f"identities per batch: expected P >= 2, got {p}")
        order = np.argsort(ids, kind="stable")
        uniq, starts = np.unique(ids[order], return_index=True)
        if len(uniq) < 2:
            raise LorexError(f"re-ID training needs at least 2 identities, got {len(uniq)}")
        self.groups = np.split(order, starts[1:])  # image indices per identity, ascending
        self.ids = uniq
        self.p, self.k = min(p, len(uniq)), k
        if self.p < p:
            log.warning("only %d identities: batches of %d ids x %d", len(uniq), self.p, k)
        self.rng = np.random.default_rng([seed, 7])

    def epoch(self) -> list[np.ndarray]:
        """The batches of one epoch: index arrays of length P * K."""
        rng, k = self.rng, self.k
        chunks: list[list[np.ndarray]] = []
        for idx in self.groups:
            if len(idx) < k:
                chunks.append([rng.choice(idx, k, replace=True)])
            else:
                idx = rng.permutation(idx)
                chunks.append([idx[i : i + k] for i in range(0, len(idx) - k + 1, k)])
        left = np.array([len(c) for c in chunks])
        used = np.zeros(len(chunks), dtype=np.int64)
        batches = []
        while (left > 0).sum() >= self.p:
            chosen = rng.choice(np.flatnonzero(left > 0), self.p, replace=False)
            batches.append(np.concatenate([chunks[c][used[c]] for c in chosen]))
            used[chosen] += 1
            left[chosen] -= 1
        return batches


# --------------------------------------------------------------------------------------------
# image size
# --------------------------------------------------------------------------------------------


def fit_image_size(model: LorexModel, hw: tuple[int, int]) -> bool:
    """Make the built-in ViT take ``(height, width)`` images: same weights, the position table
    bicubically resampled to the new token grid (the class slot kept). True if it changed.

    Patches keep their size and shape, so a 32x32 base sees a 64x32 person crop at full
    resolution and undistorted, on an 8x4 grid instead of 4x4 (patch 8), like SAGE's
    14x14 -> 16x8 resampling of its ImageNet ViT.
    """
    hw = (int(hw[0]), int(hw[1]))
    if model.image_hw == hw:
        return False
    h, w = model.image_hw
    if model.backbone_config.get("type") != "vit":
        raise LorexError(
            f"the model takes {h}x{w} images and the data is {hw[0]}x{hw[1]}: only the built-in "
            "ViT can change its input size"
        )
    from lorex.adapters import lora
    from lorex.backbones.vit import VisionTransformer, ViTConfig, resample_pos_embed

    if lora.lora_layers(model.backbone) or model.side is not None:
        raise LorexError(
            f"the model takes {h}x{w} images and the data is {hw[0]}x{hw[1]}: its input size "
            "cannot change under adapters or a side network"
        )
    config = {**model.backbone_config, "img_size": list(hw)}
    old = model.backbone
    new = VisionTransformer(ViTConfig.from_dict(config))
    state = dict(old.state_dict())
    state["pos_embed"] = resample_pos_embed(
        state["pos_embed"], new.patch_embed.grid_size, old.patch_embed.grid_size
    )
    new.load_state_dict(state)
    new.to(next(old.parameters()).device).train(old.training)
    model.backbone, model.backbone_config = new, config
    log.info("input size %dx%d -> %dx%d: position table resampled", h, w, *hw)
    return True


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def is_reid_data(name: str | Path) -> bool:
    """A built-in re-ID domain name, or a folder in the Market-1501 layout."""
    from lorex.data.reid_synth import DOMAINS

    if str(name) in DOMAINS:
        return True
    root = Path(name)
    return root.is_dir() and all((root / f).is_dir() for f in FOLDERS.values())


def load_reid_data(name: str | Path) -> Market1501:
    """``load_reid`` with a one-line error that says what a re-ID dataset is."""
    from lorex.data import BUILTINS, REID_DOMAINS, load_reid

    if str(name) in BUILTINS:
        raise LorexError(
            f"{name} is a classification dataset; --objective reid needs a re-ID dataset "
            f"({', '.join(REID_DOMAINS)} or a Market-1501 folder)"
        )
    root = Path(name)
    if not is_reid_data(name) and root.is_dir():
        missing = [f for f in FOLDERS.values() if not (root / f).is_dir()]
        raise LorexError(
            f"{root}: not a Market-1501 folder (no {missing[0]}/); --objective reid needs a "
            f"re-ID dataset ({', '.join(REID_DOMAINS)} or a Market-1501 folder)"
        )
    return load_reid(name)


def subset_ids(split: ReidSplit, max_samples: int | None, seed: int = 0) -> ReidSplit:
    """Whole identities, taken in a seeded random order when all their images still fit in
    ``max_samples``; relabelled 0..K-1 (the original ids stay in ``raw_ids``)."""
    if max_samples is None or max_samples >= len(split):
        return split
    uniq, counts = np.unique(split.raw_ids, return_counts=True)
    keep, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(uniq)):
        if total + counts[i] <= max_samples:
            keep.append(uniq[i])
            total += int(counts[i])
    if len(keep) < 2:
        raise LorexError(f"--max-samples {max_samples} keeps fewer than 2 whole identities")
    mask = np.isin(split.raw_ids, keep)
    files = [f for f, m in zip(split.files, mask, strict=True) if m] if split.files else []
    return relabel(
        ReidSplit(split.images[mask], split.ids[mask], split.cams[mask], files, split.raw_ids[mask])
    )


def _classes(split: ReidSplit) -> list[str]:
    """Class names for the relabelled train ids 0..K-1: the ids in the file names."""
    names = {int(i): str(int(r)) for i, r in zip(split.ids, split.raw_ids, strict=True)}
    if sorted(names) != list(range(len(names))):
        raise LorexError("train ids must be relabelled 0..K-1 (market1501.relabel)")
    return [names[i] for i in range(len(names))]


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3)))


# --------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------


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
        step = cls(model, head)
        if not distributed.current().distributed:
            return step
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # A step may not reach every trainable tensor (in SAGE's stages some trainable biases
        # take no part in the loss); DDP must not wait for gradients that never come.
        return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)


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


def reid_step(
    feats: torch.Tensor,
    head: nn.Module,
    target: torch.Tensor,
    label_smoothing: float,
    step: Any,
    stats: EpochStats,
    logits: torch.Tensor | None = None,
) -> float:
    """The re-ID loss on one batch (label-smoothed CE on the head's logits + batch-hard soft
    triplet on ``feats``), one optimiser step (``step(loss)``); returns the loss. ``logits``:
    the head's, when the caller computed them (under DDP, in the same forward)."""
    logits = head(feats) if logits is None else logits
    ce = label_smoothed_cross_entropy(logits, target, label_smoothing)
    triplet = batch_hard_soft_triplet(feats, target)
    loss = ce + triplet
    step(loss)
    for name, value in (("loss", loss), ("ce", ce), ("triplet", triplet)):
        stats.sums[name] += value.item()
    stats.correct += int((logits.argmax(1) == target).sum())
    stats.seen += len(target)
    stats.steps += 1
    return loss.item()


def fit_reid(
    model: LorexModel,
    method: TrainingMethod,
    train: ReidSplit,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    num_instances: int = DEFAULT_INSTANCES,
    checkpoint: CheckpointOptions | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (active head: a BN-neck) on a relabelled re-ID train split.

    The optimiser and schedule are ``fit``'s (AdamW, warmup + cosine, clip 1.0); an epoch is one
    pass of :class:`PKSampler`. The history records per epoch the mean ``loss``, its ``ce`` and
    ``triplet`` parts, and the classifier's ``train_accuracy``. ``checkpoint`` and
    ``fingerprint``: as in ``fit`` (the sampler's plan is drawn from the seed, so a checkpoint
    needs only the position in it).
    """
    device = torch.device(device)
    head = model.heads[model.active_head] if model.active_head is not None else None
    if not isinstance(head, BNNeckHead):
        raise LorexError("re-ID training needs a BN-neck head (add_head(..., kind='bnneck'))")
    if cfg.batch_size % num_instances or cfg.batch_size // num_instances < 2:
        raise LorexError(
            f"--batch-size {cfg.batch_size} with --num-instances {num_instances}: the batch must "
            "be P x K images with P >= 2 identities (e.g. 64 = 16 x 4)"
        )
    world = distributed.current()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = PKSampler(train.ids, cfg.batch_size // num_instances, num_instances, cfg.seed)
    plan = [sampler.epoch() for _ in range(cfg.epochs)]
    total = sum(len(e) for e in plan)
    if total == 0:
        raise LorexError(f"too few identities with {num_instances} images for one batch")
    model.to(device)
    names = [str(i) for i in range(int(train.ids.max()) + 1)]
    method.fit_to_data(ImageDataset(train.images, train.ids, names, "reid"))
    method.prepare(model)
    head.bn.bias.requires_grad_(False)  # the BN-neck's bias stays 0
    params = trainable_parameters(model)
    if not params:
        raise LorexError(f"method '{method.name}' left no trainable parameters")
    result = TrainResult(
        trainable_params=count_parameters(model, trainable_only=True),
        total_params=count_parameters(model),
    )
    x = _tensor(train.images)
    y = torch.from_numpy(train.ids)
    use_cache = method.frozen_backbone and not cfg.augment and cfg.feature_cache
    result.feature_cache = use_cache
    optimizer, scheduler = make_optimizer(model, cfg, total)
    ckpt = Checkpointer(
        checkpoint,
        {
            "loop": "fit_reid",
            "config": cfg.to_dict(),
            "method": method.name,
            "method_options": method.options(),
            "samples": len(x),
            "num_instances": num_instances,
            **(fingerprint or {}),
        },
        model,
        optimizer,
        scheduler,
        {"augment": generator},
    )
    step, epoch0, batch0, stats_state = 0, 0, 0, None
    restored = ckpt.restore()
    if restored is not None:
        step, position, _ = restored
        epoch0, batch0 = position["epoch"], position["batch"]
        stats_state, result.history = position["stats"], position["history"]
        if not world.main:  # rank 0 carries the sums so far; the others add their shares
            stats_state = None
    forward = ReidForward.wrap(model, head, device)
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"{method.name} (re-ID)",
        unit="step",
        disable=progress is False or None or not world.main,
        leave=False,
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        if use_cache:
            features = extract_features(model, x, max(cfg.batch_size, 64), device)
            result.cache_seconds = time.perf_counter() - start
        model.train(not method.frozen_backbone)
        model.heads.train()  # the BN-neck learns its batch statistics whatever the method
        for epoch in range(epoch0, len(plan)):
            batches = plan[epoch]
            stats = EpochStats() if stats_state is None else EpochStats.from_state(stats_state)
            for b in range(batch0, len(batches)):
                mine, part = group_rows(batches[b], num_instances)  # whole ids per rank
                idx = torch.from_numpy(mine)
                target = y[idx].to(device)
                if use_cache:
                    feats, logits = forward(features[idx.to(features.device)].to(device), True)
                else:
                    batch = as_float(x[idx], device)
                    if cfg.augment:
                        batch = augment_batch(batch, generator, part)
                    feats, logits = forward(batch)
                try:
                    loss = reid_step(
                        feats,
                        head,
                        target,
                        cfg.label_smoothing,
                        lambda v, e=epoch: optimizer_step(v, optimizer, scheduler, params, e),
                        stats,
                        logits,
                    )
                except TrainingDiverged as exc:
                    raise diverged(exc, ckpt) from None
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
                if ckpt.due(step) or step == total:
                    position = {
                        "epoch": epoch,
                        "batch": b + 1,
                        "stats": stats.reduced(device).state(),
                        "history": result.history,
                    }
                    ckpt.save(step, position)
            summary = stats.reduced(device).summary()
            result.history.append({"epoch": epoch + 1, **summary, "steps": len(batches)})
            batch0, stats_state = 0, None
        result.train_seconds = time.perf_counter() - start
    bar.close()
    result.checkpoint = ckpt
    return finish_training(model, result, mem)


@torch.inference_mode()
def reid_embeddings(
    model: LorexModel,
    images: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``model.embedding`` (L2-normalised) of uint8 ``(N, H, W, 3)`` images, in eval mode."""
    device = torch.device(device)
    model.eval()
    x = _tensor(images)
    return torch.cat(
        [
            model.embedding(as_float(x[i : i + batch_size], device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def evaluate_reid(
    model: LorexModel, data: Market1501, device: torch.device | str = "cpu", batch_size: int = 256
) -> dict[str, Any]:
    """Query-vs-gallery retrieval: ``mAP``, ``rank1``, ``rank5``, ``rank10``, ``mINP`` and
    ``num_valid_queries``, on L2-normalised embeddings with the squared Euclidean distance
    ``2 - 2 cos`` (ranks as the Euclidean distance does)."""
    hw = tuple(int(s) for s in data.query.images.shape[1:3])
    if model.image_hw != hw:
        raise LorexError(
            f"the model takes {model.image_hw[0]}x{model.image_hw[1]} images, the data is "
            f"{hw[0]}x{hw[1]}"
        )
    q = reid_embeddings(model, data.query.images, batch_size, device)
    g = reid_embeddings(model, data.gallery.images, batch_size, device)
    dist = (2.0 - 2.0 * (q @ g.T)).clamp_(min=0.0).numpy()
    r = evaluate(dist, data.query.ids, data.gallery.ids, data.query.cams, data.gallery.cams)
    out = {"mAP": r["mAP"], **{f"rank{k}": float(r["cmc"][k - 1]) for k in RANKS}}
    out.update(mINP=r["mINP"], num_valid_queries=r["num_valid_queries"])
    out["mAP_se"] = mean_se(r["ap"].tolist())  # over queries: the noise of a small gallery
    return out


class _Embedder(nn.Module):
    def __init__(self, model: LorexModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(x)


def embedding_ms_per_image(
    model: LorexModel, images: np.ndarray, device: torch.device | str = "cpu", batch: int = 64
) -> float:
    return inference_ms_per_image(_Embedder(model), as_float(_tensor(images[:batch]), device))


def train_reid_expert(
    base: str | Path,
    data: str,
    method: TrainingMethod,
    out: str | Path,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    num_instances: int = DEFAULT_INSTANCES,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Train a re-ID expert from ``base`` on ``data``'s train split; save it with its metrics
    (query-vs-gallery on the same dataset) and provenance, like ``train_expert``."""
    from lorex.training.run import efficiency_metrics, run_record, run_stamp, save_expert

    device = torch.device(device)
    splits = load_reid_data(data)
    train = subset_ids(splits.train, cfg.max_samples, cfg.seed)
    hw = (int(train.images.shape[1]), int(train.images.shape[2]))
    model = load_model(base, device)
    if method.saves == "delta" and model.image_hw != hw:
        raise LorexError(
            f"--method {method.name} saves only what differs from the base, but the base takes "
            f"{model.image_hw[0]}x{model.image_hw[1]} images and {data} is {hw[0]}x{hw[1]}: "
            "train --method full first, or start from a base of that size"
        )
    resized = fit_image_size(model, hw)
    torch.manual_seed(cfg.seed)  # the classifier's N(0, 0.001) initialisation
    model.add_head(splits.name or str(data), _classes(train), kind="bnneck")
    result = fit_reid(
        model,
        method,
        train,
        cfg,
        device,
        progress,
        num_instances,
        checkpoint,
        {"base": str(base), "data": str(data)},
    )
    if not distributed.current().main:  # under torchrun rank 0 evaluates and writes
        return {}
    scores = evaluate_reid(model, splits, device)
    infer_ms = embedding_ms_per_image(model, splits.query.images, device)
    p = min(cfg.batch_size // num_instances, len(np.unique(train.ids)))
    metrics = {
        **scores,
        **efficiency_metrics(result, infer_ms),
        "data": str(data),
        "method": method.name,
        "objective": "reid",
        "train_samples": len(train),
        "train_ids": len(np.unique(train.ids)),
        "query_samples": len(splits.query),
        "gallery_samples": len(splits.gallery),
        "image_size": list(hw),
        **run_stamp(result, cfg, device),
    }
    objective = {
        "name": "reid",
        "ids_per_batch": p,
        "instances_per_id": num_instances,
        "label_smoothing": cfg.label_smoothing,
        "triplet": "batch-hard, soft margin (softplus), Euclidean, on the pre-BN feature",
        "head": "bnneck",
        "distance": "squared Euclidean on L2-normalised BN features",
        "position_table_resampled": resized,
    }
    made_by = run_record(
        "train",
        cfg,
        method=method.name,
        method_options=method.options(),
        objective=objective,
        data=str(data),
        base=str(base),
    )
    save_expert(
        model, out, method, base, cfg, made_by, metrics, result, f"{method.name} re-ID on {data}"
    )
    result.checkpoint.discard()
    log.info(
        "trained %s re-ID expert %s: mAP %.4f rank-1 %.4f mINP %.4f on %s",
        method.name,
        out,
        scores["mAP"],
        scores["rank1"],
        scores["mINP"],
        data,
    )
    return metrics


def reid_line(scores: dict[str, Any]) -> str:
    """``mAP 0.4123, rank-1 0.6012, rank-5 ..., mINP 0.1234`` for the CLI."""
    ranks = ", ".join(f"rank-{k} {scores[f'rank{k}']:.4f}" for k in RANKS)
    return f"mAP {scores['mAP']:.4f}, {ranks}, mINP {scores['mINP']:.4f}"


__all__ = [
    "PKSampler",
    "batch_hard_soft_triplet",
    "evaluate_reid",
    "fit_image_size",
    "fit_reid",
    "label_smoothed_cross_entropy",
    "reid_embeddings",
    "train_reid_expert",
]
