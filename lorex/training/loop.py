"""Transitional: what the loops not yet moved onto the engine still import."""

from __future__ import annotations

import torch

from lorex.training.batches import (  # noqa: F401
    CACHE_MEMORY_MB,
    as_float,
    extract_features,
    images_to_tensor,
    predict,
    random_shift,
)
from lorex.training.config import TrainConfig  # noqa: F401
from lorex.training.engine import (  # noqa: F401
    TrainingDiverged,
    TrainResult,
    diverged,
    finish_training,
    make_optimizer,
)
from lorex.training.objectives.classification import (  # noqa: F401
    DataParallelStep,
    fit,
    share_of_batch_cross_entropy,
)


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
