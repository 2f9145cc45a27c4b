"""Whole training jobs, shared by the CLI and the experiments: pretrain a base, train a
classification or re-ID expert, and write it with its metrics and provenance."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorex.backbones import build_backbone, preset_config
from lorex.data import load_dataset
from lorex.data.reid import (
    DEFAULT_INSTANCES,
    is_reid_data,
    load_reid_data,
    reid_class_names,
    subset_ids,
)
from lorex.errors import LorexError
from lorex.models import LorexModel, load_model, save_model
from lorex.models.resize import fit_image_size
from lorex.report import curve_png
from lorex.training import distributed
from lorex.training.batches import images_to_tensor
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.config import TrainConfig
from lorex.training.engine import TrainResult
from lorex.training.evaluation import (
    classifier_ms_per_image,
    embedding_ms_per_image,
    evaluate_classifier,
    evaluate_reid,
)
from lorex.training.feature_stats import STATS_FILE, feature_statistics, stats_bytes
from lorex.training.methods import TRAINING_METHODS, TrainingMethod
from lorex.training.objectives.classification import fit
from lorex.training.objectives.reid import fit_reid
from lorex.training.records import efficiency_metrics, run_record, run_stamp

log = logging.getLogger("lorex")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LorexError(f"--device: unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorexError("--device: CUDA was requested but is not available")
    return device


def _metrics(
    acc: float,
    result: TrainResult,
    data: str,
    method: str,
    cfg: TrainConfig,
    n_train: int,
    n_test: int,
    device: torch.device,
    infer_ms: float,
) -> dict[str, Any]:
    return {
        "accuracy": acc,
        **efficiency_metrics(result, infer_ms),
        "data": data,
        "method": method,
        "train_samples": n_train,
        "test_samples": n_test,
        **run_stamp(result, cfg, device),
    }


def pretrain(
    preset: str | dict,
    out: str | Path,
    cfg: TrainConfig,
    data: str = "pretrain/chars",
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Train a backbone from scratch with a head on ``data``: the base that experts start from.
    ``checkpoint``: see ``fit``; the checkpoint is removed once the model is written."""
    device = torch.device(device)
    backbone_cfg = preset_config(preset) if isinstance(preset, str) else preset
    train = load_dataset(data, "train", cfg.max_samples, cfg.seed)
    test = load_dataset(data, "test")
    torch.manual_seed(cfg.seed)
    model = LorexModel(build_backbone(backbone_cfg), backbone_cfg)
    if model.image_size != train.image_size[0]:
        raise LorexError(
            f"{data}: images are {train.image_size[0]}px, the preset needs {model.image_size}px"
        )
    model.add_head(train.name or data, train.classes)
    fingerprint = {"preset": backbone_cfg}
    result = fit(
        model,
        TRAINING_METHODS["full"](),
        train,
        cfg,
        device,
        progress,
        False,
        checkpoint,
        fingerprint,
    )
    if not distributed.current().main:  # under torchrun rank 0 evaluates and writes
        return {}
    acc = evaluate_classifier(model, test, device)
    infer_ms = classifier_ms_per_image(model, test, device)
    metrics = _metrics(acc, result, data, "pretrain", cfg, len(train), len(test), device, infer_ms)
    made_by = run_record(
        "pretrain", cfg, preset=preset if isinstance(preset, str) else None, data=data
    )
    save_trained(model, out, metrics, result, f"pretrain {data}", cfg.seed, made_by)
    result.checkpoint.discard()
    log.info("pretrained %s: test accuracy %.4f on %s", out, acc, data)
    return metrics


def _copy_head(model: LorexModel, key: str, source: LorexModel, path: Path) -> None:
    task = model.head_info[key]["task"]
    if key not in source.heads:
        raise LorexError(f"{path}: no head for task '{task}' (heads: {', '.join(source.tasks)})")
    if source.head_info[key]["classes"] != model.head_info[key]["classes"]:
        raise LorexError(f"{path}: the head for '{task}' has other classes than the data")
    with torch.no_grad():
        model.heads[key].load_state_dict(source.heads[key].state_dict())


def train_expert(
    base: str | Path,
    data: str,
    method: TrainingMethod,
    out: str | Path,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    head_from: str | Path | None = None,
    freeze_head: bool = False,
    feature_stats: bool = False,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Fine-tune ``base`` on one dataset with ``method`` and save the expert with its metrics.

    ``head_from`` starts the task head from another model's head for the same task (a linear
    probe); ``freeze_head`` keeps it fixed while the rest trains (it needs ``head_from``).
    ``feature_stats`` also records the per-block token statistics of the training set (what
    SOCKET's BN-statistics matching needs from a source model; docs/cross_modal.md).
    ``checkpoint``: see ``fit``; the checkpoint is removed once the expert is written.
    """
    if freeze_head and head_from is None:
        raise LorexError("--freeze-head needs --head-from: a fixed zero head cannot learn a task")
    device = torch.device(device)
    if is_reid_data(data):
        raise LorexError(f"{data} is a re-ID dataset: train on it with --objective reid")
    train = load_dataset(data, "train", cfg.max_samples, cfg.seed)
    test = load_dataset(data, "test")
    model = load_model(base, device)
    if train.image_size[0] != model.image_size:
        raise LorexError(
            f"{data}: images are {train.image_size[0]}x{train.image_size[1]}, the model needs "
            f"{model.image_size}x{model.image_size}"
        )
    key = model.add_head(train.name or data, train.classes)
    if head_from is not None:
        _copy_head(model, key, load_model(head_from, device), Path(head_from))
    torch.manual_seed(cfg.seed)
    fingerprint = {"base": str(base), "head_from": None if head_from is None else str(head_from)}
    result = fit(model, method, train, cfg, device, progress, freeze_head, checkpoint, fingerprint)
    if not distributed.current().main:  # under torchrun rank 0 evaluates and writes
        return {}
    acc = evaluate_classifier(model, test, device)
    infer_ms = classifier_ms_per_image(model, test, device)
    metrics = _metrics(acc, result, data, method.name, cfg, len(train), len(test), device, infer_ms)
    log.info(
        "efficiency (%s): %s trainable parameters (%.2f%% of %s), peak training memory %.0f MB, "
        "training %.1f s (feature cache %s), inference %.3f ms/image, accuracy %.4f",
        method.name,
        f"{result.trainable_params:,}",
        100 * result.trainable_params / max(1, result.total_params),
        f"{result.total_params:,}",
        result.peak_train_mb,
        result.train_seconds,
        "on" if result.feature_cache else "off",
        infer_ms,
        acc,
    )
    made_by = run_record(
        "train", cfg, method=method.name, method_options=method.options(), data=data, base=str(base)
    )
    if head_from is not None:
        made_by.update(head_from=str(head_from), freeze_head=freeze_head)
    extra = {}
    if feature_stats:
        x, _ = images_to_tensor(train)
        extra[STATS_FILE] = stats_bytes(*feature_statistics(model, x, device))
        made_by["feature_stats"] = True
    save_expert(
        model, out, method, base, cfg, made_by, metrics, result, f"{method.name} on {data}", extra
    )
    result.checkpoint.discard()
    log.info("trained %s expert %s: test accuracy %.4f on %s", method.name, out, acc, data)
    return metrics


def save_expert(
    model: LorexModel,
    out: str | Path,
    method: TrainingMethod,
    base: str | Path,
    cfg: TrainConfig,
    made_by: dict[str, Any],
    metrics: dict[str, Any],
    result: TrainResult,
    title: str,
    extra_files: dict[str, Any] | None = None,
) -> None:
    """Write a trained expert atomically with its metrics and loss curve. Only the active head is
    kept: a delta model must not save the base's heads a second time."""
    for key in [k for k in model.heads if k != model.active_head]:
        del model.heads[key]
        del model.head_info[key]
    base_dir = base if method.saves == "delta" else None
    save_trained(
        model, out, metrics, result, title, cfg.seed, made_by, method.saves, base_dir, extra_files
    )


def save_trained(
    model: LorexModel,
    out: str | Path,
    metrics: dict[str, Any],
    result: TrainResult,
    title: str,
    seed: int,
    made_by: dict[str, Any] | None = None,
    weights: str = "full",
    base_dir: str | Path | None = None,
    extra_files: dict[str, Any] | None = None,
) -> None:
    """Write a trained model atomically with ``metrics.json`` and its loss curve
    (``train_curve.png``, titled ``title``): what every trained model carries beside it.
    ``weights``/``base_dir``: as in ``save_model``."""
    save_model(
        model,
        out,
        weights=weights,
        base_dir=base_dir,
        made_by=made_by,
        seed=seed,
        extra_files={
            "metrics.json": metrics,
            "train_curve.png": curve_png(result.history, title),
            **(extra_files or {}),
        },
    )


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
    model.add_head(splits.name or str(data), reid_class_names(train), kind="bnneck")
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
    objective = _reid_recipe(p, num_instances, cfg.label_smoothing, resized)
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


def _reid_recipe(p: int, k: int, label_smoothing: float, resized: bool) -> dict[str, Any]:
    """How a re-ID expert was trained, for its provenance record."""
    return {
        "name": "reid",
        "ids_per_batch": p,
        "instances_per_id": k,
        "label_smoothing": label_smoothing,
        "triplet": "batch-hard, soft margin (softplus), Euclidean, on the pre-BN feature",
        "head": "bnneck",
        "distance": "squared Euclidean on L2-normalised BN features",
        "position_table_resampled": resized,
    }
