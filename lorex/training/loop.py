"""The training loop shared by every method: seeded, deterministic on the CPU, device-agnostic."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorex.data import ImageDataset
from lorex.errors import LorexError
from lorex.metrics.resources import PeakMemory
from lorex.models import LorexModel
from lorex.training import distributed
from lorex.training.checkpoint import Checkpointer, CheckpointOptions
from lorex.training.methods import TrainingMethod, count_parameters, trainable_parameters

log = logging.getLogger("lorex")
#: Above this size (MB) cached features go to a memory-mapped file instead of memory.
CACHE_MEMORY_MB = 2048.0


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = False  # random shifts of up to 2 pixels
    # With a frozen backbone and no augmentation, compute its features once (off: every epoch).
    feature_cache: bool = True
    seed: int = 0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "seed": 0 <= self.seed < 2**63,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "max_samples": self.max_samples is None or self.max_samples >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise LorexError(f"{name}: invalid value {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_train_mb: float = 0.0
    peak_device_mb: float | None = None
    trainable_params: int = 0
    total_params: int = 0
    feature_cache: bool = False
    cache_seconds: float = 0.0  # of train_seconds, the time spent filling the feature cache
    checkpoint: Checkpointer | None = None  # discard() it once the output is written


def images_to_tensor(data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 3, H, W)`` images (clips ``(N, T, 3, H, W)``), 4x smaller than float, and
    int64 labels."""
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data.images, -1, -3)))
    return x, torch.from_numpy(data.labels)


def as_float(batch_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch_u8.to(device, non_blocking=True).float().div_(255.0)


def random_shift(
    x: torch.Tensor,
    max_shift: int,
    generator: torch.Generator,
    part: tuple[int, slice] | None = None,
) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the edge pixels.
    A clip ``(T, 3, H, W)`` moves as a whole, so the motion within it is kept.

    ``part=(n, rows)``: ``x`` is the rows ``rows`` of a batch of ``n`` (one rank's share under
    data parallelism); the shifts of all ``n`` are drawn, so each image moves as it would in
    one process."""
    if x.ndim == 5:
        flat = random_shift(x.flatten(1, 2), max_shift, generator, part)
        return flat.unflatten(1, x.shape[1:3])
    n, _, h, w = x.shape
    total, rows = part if part is not None else (n, slice(0, n))
    drawn = torch.randint(-max_shift, max_shift + 1, (total, 2), generator=generator)
    shifts = drawn[rows].tolist()
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    return torch.stack(
        [
            padded[i, :, max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]
            for i, (dy, dx) in enumerate(shifts)
        ]
    )


@torch.no_grad()
def extract_features(
    model: LorexModel,
    x_u8: torch.Tensor,
    batch_size: int,
    device: torch.device,
    memory_limit_mb: float | None = None,
) -> torch.Tensor:
    """``model.frozen_features`` of every sample, computed once: in memory, or in a memory-mapped
    temporary file when they would take more than ``memory_limit_mb`` (default
    ``CACHE_MEMORY_MB``; on the CPU)."""
    limit = CACHE_MEMORY_MB if memory_limit_mb is None else memory_limit_mb
    model.eval()
    first = model.frozen_features(as_float(x_u8[:1], device))
    shape = (len(x_u8), *first.shape[1:])
    size_mb = first.element_size() * first[0].numel() * len(x_u8) / 2**20
    if device.type == "cpu" and size_mb > limit:
        handle = tempfile.NamedTemporaryFile(prefix="lorex-features-", suffix=".f32")
        log.info("feature cache: %.0f MB in a memory-mapped file %s", size_mb, handle.name)
        store = torch.from_numpy(np.memmap(handle, np.float32, "w+", shape=shape))
        store._lorex_file = handle  # closed (and deleted) with the tensor
    else:
        store = torch.empty(shape, dtype=first.dtype, device=first.device)
    for i in range(0, len(x_u8), batch_size):
        store[i : i + batch_size] = model.frozen_features(
            as_float(x_u8[i : i + batch_size], device)
        )
    return store


@torch.inference_mode()
def predict(
    model: LorexModel, data: ImageDataset, batch_size: int = 256, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Predicted class indices for every image of ``data``."""
    device = torch.device(device)
    model.eval()
    x, _ = images_to_tensor(data)
    preds = [
        model(as_float(x[i : i + batch_size], device)).argmax(1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(preds).numpy()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position tables and class tokens (the usual ViT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (
                no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay
            ).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _schedule(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters with the warmup + cosine schedule every loop uses."""
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total_steps, cfg.warmup_fraction)
    )
    return optimizer, scheduler


class TrainingDiverged(LorexError):
    """A NaN or Inf loss: training stops before the step, so no bad weights are saved."""


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    epoch: int,
) -> None:
    """One step (gradients clipped to norm 1.0); a non-finite loss stops training in one line."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged: loss is {loss.item()} at epoch {epoch + 1}; try a lower --lr"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


def finish_training(model: torch.nn.Module, result: TrainResult, mem: PeakMemory) -> TrainResult:
    """Back to eval mode and frozen weights; record the peak memory figures."""
    model.eval()
    model.requires_grad_(False)
    result.peak_rss_mb, result.peak_train_mb = mem.peak_rss_mb, mem.peak_delta_mb
    result.peak_device_mb = mem.peak_device_mb
    return result


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
    device = torch.device(device)
    world = distributed.current()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    method.fit_to_data(data)
    method.prepare(model)
    if freeze_head:
        model.heads.requires_grad_(False)
    params = trainable_parameters(model)
    if not params:
        raise LorexError(f"method '{method.name}' left no trainable parameters")
    result = TrainResult(
        trainable_params=count_parameters(model, trainable_only=True),
        total_params=count_parameters(model),
    )
    x, y = images_to_tensor(data)
    use_cache = method.frozen_backbone and not cfg.augment and cfg.feature_cache
    result.feature_cache = use_cache
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer, scheduler = make_optimizer(model, cfg, total)
    ckpt = Checkpointer(
        checkpoint,
        {
            "loop": "fit",
            "config": cfg.to_dict(),
            "method": method.name,
            "method_options": method.options(),
            "data": data.name,
            "samples": len(x),
            "freeze_head": freeze_head,
            **(fingerprint or {}),
        },
        model,
        optimizer,
        scheduler,
        {"data": generator},
    )
    step, epoch0, batch0, order = 0, 0, 0, None
    loss_sum, correct = 0.0, 0
    restored = ckpt.restore()
    if restored is not None:
        step, position, arrays = restored
        epoch0, batch0 = position["epoch"], position["batch"]
        loss_sum, correct = position["loss_sum"], position["correct"]
        result.history = position["history"]
        order = arrays["order"]
        if not world.main:  # rank 0 carries the sums so far; the others add their shares
            loss_sum, correct = 0.0, 0
    step_model = DataParallelStep.wrap(model, device)
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"{method.name} on {data.name or 'data'}",
        unit="step",
        disable=progress is False or None or not world.main,
        leave=False,
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        if use_cache:
            log.info("feature cache: on (frozen backbone, no augmentation): the backbone runs once")
            features = extract_features(model, x, max(cfg.batch_size, 64), device)
            result.cache_seconds = time.perf_counter() - start
        elif method.frozen_backbone:
            reason = "augmentation changes the inputs" if cfg.augment else "turned off"
            log.info("feature cache: off (%s): the frozen backbone runs every step", reason)
        model.train(not method.frozen_backbone)
        for epoch in range(epoch0, cfg.epochs):
            if order is None:  # a resumed epoch keeps the order it was drawn with
                order = torch.randperm(len(x), generator=generator)
                loss_sum, correct = 0.0, 0
            for b in range(batch0, steps_per_epoch):
                batch_idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                rows = distributed.shard_slice(len(batch_idx), world)
                idx = batch_idx[rows]  # this rank's share of the global batch
                target = y[idx].to(device)
                if use_cache:
                    logits = step_model(features[idx.to(features.device)].to(device), True)
                else:
                    batch = as_float(x[idx], device)
                    if cfg.augment:
                        batch = random_shift(batch, 2, generator, (len(batch_idx), rows))
                    logits = step_model(batch, False)
                loss = share_of_batch_cross_entropy(
                    logits, target, cfg.label_smoothing, len(batch_idx)
                )
                try:
                    optimizer_step(loss, optimizer, scheduler, params, epoch)
                except TrainingDiverged as exc:
                    raise diverged(exc, ckpt) from None
                step += 1
                loss_sum += loss.item() * len(batch_idx) / world.size
                correct += int((logits.argmax(1) == target).sum())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                if ckpt.due(step) or step == total:
                    sums = distributed.all_sum([loss_sum, correct], device)
                    position = {
                        "epoch": epoch,
                        "batch": b + 1,
                        "loss_sum": sums[0],
                        "correct": int(sums[1]),
                        "history": result.history,
                    }
                    ckpt.save(step, position, {"order": order})
            loss_all, correct_all = distributed.all_sum([loss_sum, correct], device)
            result.history.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_all / len(x),
                    "train_accuracy": int(correct_all) / len(x),
                }
            )
            order, batch0 = None, 0
        result.train_seconds = time.perf_counter() - start
    bar.close()
    result.checkpoint = ckpt
    return finish_training(model, result, mem)


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
    that DDP sees every step; ``wrap`` returns it in DDP under torchrun, bare otherwise."""

    def __init__(self, model: LorexModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, cached: bool) -> torch.Tensor:
        return self.model.forward_cached(x) if cached else self.model(x)

    @classmethod
    def wrap(
        cls, model: LorexModel, device: torch.device, find_unused: bool = False
    ) -> torch.nn.Module:
        """``find_unused``: a step may leave some trainable tensors out of the loss (SAGE's
        stages train every bias); DDP must then not wait for their gradients."""
        step = cls(model)
        if not distributed.current().distributed:
            return step
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=find_unused)


def diverged(exc: TrainingDiverged, ckpt: Checkpointer) -> TrainingDiverged:
    """The divergence message, pointing at the last good checkpoint when there is one."""
    if ckpt.path is not None and ckpt.path.exists():
        return TrainingDiverged(f"{exc}; the last good checkpoint is kept at {ckpt.path}")
    return exc
