"""The one training loop. Every way lorex trains is an :class:`Objective` run by :func:`train`.

Why one loop: seeding, the optimiser and schedule, checkpoints and their resumption, DDP,
gradient clipping, divergence, the progress bar, memory figures and the loss history are the
same for every objective; written once, every objective has all of them and they cannot drift
apart. An objective says only what is particular to it: what it builds, each epoch's batches,
what one batch's loss is, and what a checkpoint must add to resume it mid-epoch.

The engine keeps each objective's order of operations and random draws as it was when the
objective had its own loop, so outputs are bit-identical to those loops' (CPU, same threads).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorex.errors import LorexError
from lorex.metrics.resources import PeakMemory
from lorex.training import distributed
from lorex.training.checkpoint import Checkpointer, CheckpointOptions
from lorex.training.config import TrainConfig
from lorex.training.methods import count_parameters

Loss = torch.Tensor | dict[str, torch.Tensor]


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


class TrainingDiverged(LorexError):
    """A NaN or Inf loss: training stops before the step, so no bad weights are saved."""


class Objective(abc.ABC):
    """What one way of training adds to the engine. Subclasses set the attributes in
    ``__init__`` (checks only: the engine seeds, then calls ``prepare``) and override the
    hooks they need; ``step`` is the one every objective writes."""

    loop = "objective"  # its name in the checkpoint's fingerprint
    desc = "train"  # the progress bar's label
    clip_norm: float | None = 1.0  # gradients clipped to this norm; None: not clipped
    find_unused = False  # DDP: a step may leave some trainable tensors out of the loss
    divergence = "training diverged: loss is {loss} at epoch {epoch}; try a lower --lr"
    seed = 0
    epochs = 1

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.fingerprint: dict[str, Any] = {}  # what a resumed run must share with the first
        self.generators: dict[str, torch.Generator] = {}  # checkpointed with the run
        self.forward: nn.Module | None = None  # forward_module(), in DDP under torchrun

    # ---- set up (after the engine's torch.manual_seed(seed))
    @abc.abstractmethod
    def prepare(self, device: torch.device) -> None:
        """Build what trains; set ``self.model`` (finished at the end), ``self.params`` (the
        trainable tensors, in the order they are clipped) and ``self.generators``."""

    @abc.abstractmethod
    def total_steps(self) -> int:
        """How many optimisation steps the whole run takes (the schedule's length)."""

    @abc.abstractmethod
    def optimizers(self, total: int) -> tuple[Any, Any]:
        """``(optimizer or {name: optimizer}, scheduler or None)``."""

    def checkpointed(self) -> nn.Module:
        """The module whose state a checkpoint holds."""
        return self.model

    def forward_module(self) -> nn.Module | None:
        """The training forward as one module, for DDP to see every step (None: no DDP)."""
        return None

    # ---- resumption
    def before_load(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        """Reshape the model to fit a checkpoint before its state is loaded."""
        return None  # optional: nothing to do unless overridden

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        """Take back what ``extra_state`` saved (used by the epoch the checkpoint was in)."""
        return None  # optional: nothing to do unless overridden

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What a checkpoint adds to resume mid-epoch: plain numbers and tensors."""
        return {}, {}

    # ---- the loop
    def start(self, result: TrainResult) -> None:
        """Once, inside the timed and measured part, before the first epoch."""
        return None  # optional: nothing to do unless overridden

    @abc.abstractmethod
    def begin_epoch(self, epoch: int) -> Sequence[Any]:
        """The epoch's batches (re-clustering, a new order...); ``step`` gets each in turn."""

    @abc.abstractmethod
    def step(self, batch: Any) -> tuple[Loss, dict[str, Any] | None]:
        """One batch's loss (or ``{optimizer name: loss}``, stepped in that order) and what the
        progress bar shows. Runs before the update: the engine checks, steps and clips."""

    def end_epoch(self, epoch: int) -> dict[str, Any] | None:
        """The epoch's history entry."""
        return None


def train(
    objective: Objective,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> TrainResult:
    """Run ``objective``: seed, prepare, optimise with checkpoints, and finish the model."""
    device = torch.device(device)
    world = distributed.current()
    torch.manual_seed(objective.seed)
    objective.prepare(device)
    result = TrainResult(
        trainable_params=sum(p.numel() for p in objective.params),
        total_params=count_parameters(objective.model),
    )
    total = objective.total_steps()
    optimizers, scheduler = objective.optimizers(total)
    ckpt = Checkpointer(
        checkpoint,
        {"loop": objective.loop, **objective.fingerprint},
        objective.checkpointed(),
        optimizers,
        scheduler,
        objective.generators,
    )
    step, epoch0, batch0 = 0, 0, 0
    restored = ckpt.restore(objective.before_load)
    if restored is not None:
        step, position, arrays = restored
        objective.load_state(position, arrays)
        epoch0, batch0 = position.get("epoch", 0), position.get("batch", step)
        objective.history = position["history"]
    objective.forward = data_parallel(objective.forward_module(), device, objective.find_unused)
    update = _Updater(objective, ckpt.optimizers, scheduler, ckpt)
    bar = tqdm(
        total=total,
        initial=step,
        desc=objective.desc,
        unit="step",
        disable=progress is False or not world.main,
        leave=False,
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        objective.start(result)
        for epoch in range(epoch0, objective.epochs):
            batches = objective.begin_epoch(epoch)
            for b in range(batch0, len(batches)):
                loss, postfix = objective.step(batches[b])
                update(loss, epoch, step)
                step += 1
                bar.update(1)
                if postfix:
                    bar.set_postfix(**postfix)
                if ckpt.due(step) or step == total:
                    extra, arrays = objective.extra_state()
                    position = {"epoch": epoch, "batch": b + 1, **extra}
                    ckpt.save(step, {**position, "history": objective.history}, arrays)
            entry = objective.end_epoch(epoch)
            if entry is not None:
                objective.history.append(entry)
            batch0 = 0
        result.train_seconds = time.perf_counter() - start
    bar.close()
    result.history = objective.history
    result.checkpoint = ckpt
    return finish_training(objective.model, result, mem)


class _Updater:
    """One optimisation step per loss: checked first (a non-finite loss stops training before
    any weight moves), then zero_grad, backward, clip, step; the schedule steps once."""

    def __init__(self, objective: Objective, optimizers, scheduler, ckpt: Checkpointer):
        self.objective, self.optimizers = objective, optimizers
        self.scheduler, self.ckpt = scheduler, ckpt

    def __call__(self, loss: Loss, epoch: int, step: int) -> None:
        losses = loss if isinstance(loss, dict) else {"main": loss}
        for value in losses.values():
            if not torch.isfinite(value):
                text = self.objective.divergence.format(
                    loss=value.item(), epoch=epoch + 1, step=step + 1
                )
                raise diverged(TrainingDiverged(text), self.ckpt)
        clip = self.objective.clip_norm
        for name, value in losses.items():
            optimizer = self.optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self._clipped(name, optimizer), clip)
            optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def _clipped(self, name: str, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """The main optimiser clips ``objective.params`` in their order (the order sets the
        float sum of the norm); another clips its own groups' tensors."""
        if name == "main":
            return self.objective.params
        return [p for group in optimizer.param_groups for p in group["params"]]


def diverged(exc: TrainingDiverged, ckpt: Checkpointer) -> TrainingDiverged:
    """The divergence message, pointing at the last good checkpoint when there is one."""
    if ckpt.path is not None and ckpt.path.exists():
        return TrainingDiverged(f"{exc}; the last good checkpoint is kept at {ckpt.path}")
    return exc


def data_parallel(
    module: nn.Module | None, device: torch.device, find_unused: bool = False
) -> nn.Module | None:
    """``module`` in DDP under torchrun, bare otherwise. ``find_unused``: a step may leave some
    trainable tensors out of the loss (SAGE's stages train every bias); DDP must then not wait
    for their gradients."""
    if module is None or not distributed.current().distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def finish_training(model: nn.Module, result: TrainResult, mem: PeakMemory) -> TrainResult:
    """Back to eval mode and frozen weights; record the peak memory figures."""
    model.eval()
    model.requires_grad_(False)
    result.peak_rss_mb, result.peak_train_mb = mem.peak_rss_mb, mem.peak_delta_mb
    result.peak_device_mb = mem.peak_device_mb
    return result


# ------------------------------------------------------------------ the usual optimiser


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
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


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters with the warmup + cosine schedule most objectives
    use."""
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total_steps, cfg.warmup_fraction)
    )
    return optimizer, scheduler
