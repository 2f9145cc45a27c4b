"""What every output records about how it was made: the command, settings, versions, costs."""

from __future__ import annotations

import platform
from typing import Any

import torch

from lorex.training.config import TrainConfig
from lorex.training.engine import TrainResult
from lorex.version import __version__


def run_record(command: str, cfg: TrainConfig | None = None, **extra: Any) -> dict[str, Any]:
    """What made an output: command, settings, seed, versions. Stored beside every result."""
    record = {
        "command": command,
        "lorex_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }
    if cfg is not None:
        record["config"] = cfg.to_dict()
        record["seed"] = cfg.seed
    return record


def efficiency_metrics(result: TrainResult, infer_ms: float) -> dict[str, Any]:
    """The four-axis cost figures every training run reports (any method, any objective)."""
    return {
        "infer_ms_per_image": infer_ms,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "train_seconds": result.train_seconds,
        "peak_rss_mb": result.peak_rss_mb,
        "peak_train_mb": result.peak_train_mb,
        "peak_device_mb": result.peak_device_mb,
        "feature_cache": result.feature_cache,
        "cache_seconds": result.cache_seconds,
    }


def run_stamp(result: TrainResult, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Where, with which seed and lorex version a run trained, and its loss curve."""
    return {
        "device": str(device),
        "seed": cfg.seed,
        "lorex_version": __version__,
        "history": result.history,
    }
