"""SAGE on a classification task (the digit domains): same stages, class pseudo-labels.

Re-ID clusters pseudo-identities because target identities are new; in classification the
target shares the sources' classes, so cluster ids would not line up with them. The one change
is therefore the labelling step (SHOT's, Liang et al. 2020): each class's centroid is the
mean of the L2-normalised target features weighted by the expert's softmax, every image takes
its nearest centroid (cosine), and a second round recomputes the centroids from those hard
labels. The expert's own head stays frozen as the classifier (SHOT freezes it too); stage 2
trains LoRA (r 8, alpha 32, every block's qkv, proj, fc1, fc2) plus the biases with
label-smoothed cross-entropy on random batches; stage 4 trains only the gate on one labelling
by the uniform model. Nothing reads target labels except the final scoring.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorex import __version__
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import (
    add_target_head,
    averaged_sources,
    gate_optimizer,
    gated_model,
)
from lorex.adaptation.sage.pipeline import (
    GATE_VARIANTS,
    _reusable,
    _stamp,
    source_names,
)
from lorex.adapters.gated import gate_parameters, mark_gate_trainable
from lorex.adapters.lora import LoraConfig, add_adapter, default_targets, mark_trainable
from lorex.data import ImageDataset, load_dataset
from lorex.errors import LorexError
from lorex.io import read_json, write_json
from lorex.metrics.classification import accuracy
from lorex.metrics.resources import PeakMemory
from lorex.models import LorexModel, is_model_dir, load_model, save_model
from lorex.models.store import file_sha256
from lorex.training.loop import (
    TrainResult,
    as_float,
    finish_training,
    images_to_tensor,
    make_optimizer,
    optimizer_step,
    predict,
    random_shift,
)
from lorex.training.run import run_record

log = logging.getLogger("lorex")


def class_pseudo_labels(features: np.ndarray, probs: np.ndarray, rounds: int = 2) -> np.ndarray:
    """SHOT's labels: nearest class centroid by cosine, centroids first weighted by ``probs``
    ``(N, C)``, then (each further round) the mean of the images that took that label."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    weights = probs
    labels = np.zeros(len(x), np.int64)
    for _ in range(rounds):
        cents = weights.T @ x / np.maximum(weights.sum(0)[:, None], 1e-12)
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        labels = np.argmax(x @ cents.T, axis=1)
        weights = np.eye(probs.shape[1], dtype=x.dtype)[labels]
    return labels


@torch.inference_mode()
def _features_and_probs(
    model: LorexModel, x: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    feats, probs = [], []
    for i in range(0, len(x), batch):
        f = model.features(as_float(x[i : i + batch], device))
        feats.append(f.float().cpu())
        probs.append(F.softmax(model.heads[model.active_head](f), 1).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def train_on_class_pseudo_labels(
    model: LorexModel,
    data: ImageDataset,
    params: list[nn.Parameter],
    make_opt: Callable[[int], tuple[torch.optim.Optimizer, Any]],
    cfg: SageConfig,
    epochs: int,
    iters: int,
    device: torch.device,
    progress: bool | None = None,
    desc: str = "adapt",
) -> TrainResult:
    """Each epoch: label the target with the current model, then ``iters`` steps of
    cross-entropy on random batches (the head frozen)."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x, true = images_to_tensor(data)
    optimizer, scheduler = make_opt(epochs * iters)
    result = TrainResult(trainable_params=sum(p.numel() for p in params))
    bar = tqdm(total=epochs * iters, desc=desc, disable=progress is False or None, leave=False)
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        for epoch in range(epochs):
            feats, probs = _features_and_probs(model, x, device)
            labels = torch.from_numpy(class_pseudo_labels(feats, probs))
            model.train()
            loss_sum = 0.0
            for _ in range(iters):
                idx = torch.randint(len(x), (cfg.batch_size,), generator=generator)
                batch = as_float(x[idx], device)
                if cfg.augment:
                    batch = random_shift(batch, 2, generator)
                logits = model(batch)
                loss = F.cross_entropy(
                    logits, labels[idx].to(device), label_smoothing=cfg.label_smoothing
                )
                optimizer_step(loss, optimizer, scheduler, params, epoch)
                loss_sum += loss.item()
                bar.update(1)
            result.history.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum / iters,
                    # the share of pseudo-labels that are right: a diagnostic nothing reads
                    "diagnostic_label_accuracy": float((labels == true).float().mean()),
                    "train_accuracy": float((labels == true).float().mean()),
                }
            )
        result.train_seconds = time.perf_counter() - start
    bar.close()
    return finish_training(model, result, mem)


def adapt_source_expert_classification(
    source: str | Path,
    target: ImageDataset,
    out: str | Path,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Stage 2 for classification: LoRA + biases on SHOT pseudo-labels, the head frozen."""
    torch.manual_seed(cfg.seed)
    model = load_model(source, device)
    if model.active_head is None or list(model.classes) != list(target.classes):
        raise LorexError(f"{source}: its head's classes differ from the target's")
    state = model.heads[model.active_head].state_dict()
    for key in list(model.heads):
        del model.heads[key]
        del model.head_info[key]
    add_target_head(model, "linear", state, list(target.classes))
    model.to(device)
    add_adapter(
        model.backbone,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=default_targets(model.backbone),
            bias="all",
        ),
    )
    mark_trainable(model.backbone, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    train_cfg = cfg.train_config()
    iters = cfg.iters or math.ceil(len(target) / cfg.batch_size)
    result = train_on_class_pseudo_labels(
        model,
        target,
        params,
        lambda total: make_optimizer(model, train_cfg, total),
        cfg,
        cfg.epochs,
        iters,
        device,
        progress,
        f"LoRA expert {Path(source).name}",
    )
    metrics = {"history": result.history, "train_seconds": result.train_seconds}
    save_model(
        model,
        out,
        weights="delta",
        base_dir=source,
        seed=cfg.seed,
        extra_files={"metrics.json": metrics},
    )
    return metrics


def train_gate_classification(
    model: LorexModel,
    target: ImageDataset,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
) -> TrainResult:
    params = mark_gate_trainable(model.backbone)
    model.heads.requires_grad_(False)

    def make_opt(total: int):
        return gate_optimizer(model, cfg.gate_lr)

    return train_on_class_pseudo_labels(
        model, target, params, make_opt, cfg, 1, cfg.gate_iters, device, progress, "gate"
    )


def adapt_classification(
    sources: Sequence[str | Path],
    target: str,
    out: str | Path,
    cfg: SageConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    work: str | Path | None = None,
) -> dict[str, Any]:
    """``adapt_reid``'s pipeline on a classification target: every variant's test accuracy."""
    from lorex.adaptation.sage.pipeline import gate_weight_means, interleaved_ms_per_image

    cfg = cfg or SageConfig()
    device = torch.device(device)
    sources = [Path(s) for s in sources]
    if len(sources) < 2:
        raise LorexError(f"--sources: SAGE mixes at least 2 source experts, got {len(sources)}")
    for source in sources:
        if not is_model_dir(source):
            raise LorexError(f"{source}: not a model directory")
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".parts")
    train = load_dataset(target, "train", cfg.max_target_samples, cfg.seed)
    test = load_dataset(target, "test")
    names = source_names(sources)
    experts, timings = [], {}
    stage2 = {k: v for k, v in cfg.to_dict().items() if not k.startswith("gate")}
    for name, source in zip(names, sources, strict=True):
        path = work / "experts" / name
        stamp = _stamp(
            stage=2,
            source=file_sha256(source / "model.safetensors"),
            target=target,
            cfg=stage2,
            task="classification",
        )
        if not _reusable(path, stamp):
            tick = time.perf_counter()
            adapt_source_expert_classification(source, train, path, cfg, device, progress)
            write_json(path / "stage.json", {"stamp": stamp, "lorex_version": __version__})
            timings[f"lora/{name}"] = time.perf_counter() - tick
        experts.append(path)
    models: dict[str, LorexModel] = {}
    for name, source in zip(names, sources, strict=True):
        models[f"direct/{name}"] = load_model(source, device)
    models["averaged"] = averaged_sources(sources, device)
    for name, path in zip(names, experts, strict=True):
        models[f"lora/{name}"] = load_model(path, device)
    models["uniform"] = gated_model(sources, experts, names, "light", device)
    histories = {}
    for kind, label in GATE_VARIANTS.items():
        path = work / label
        stamp = _stamp(
            stage=4,
            experts=[file_sha256(e / "adapter" / "adapter_model.safetensors") for e in experts],
            kind=kind,
            cfg=cfg.to_dict(),
        )
        if not _reusable(path, stamp):
            tick = time.perf_counter()
            model = gated_model(sources, experts, names, kind, device)
            result = train_gate_classification(model, train, cfg, device, progress)
            save_model(
                model,
                path,
                seed=cfg.seed,
                extra_files={"history.json": {"history": result.history}},
            )
            write_json(path / "stage.json", {"stamp": stamp, "lorex_version": __version__})
            timings[label] = time.perf_counter() - tick
        models[label] = load_model(path, device)
        histories[label] = read_json(path / "history.json")["history"]
    variants = {}
    for label, model in models.items():
        variants[label] = {
            "accuracy": _accuracy(model, test, device),
            "params": sum(p.numel() for p in model.backbone.parameters()),
        }
    sample = test.images[:64]
    times = interleaved_ms_per_image(models, sample, device)
    for label, ms in times.items():
        variants[label]["infer_ms_per_image"] = ms
    gate_weights = {
        label: gate_weight_means(models[label], test.images[:512], device)
        for label in GATE_VARIANTS.values()
    }
    backbone = variants["averaged"]["params"]
    metrics = {
        "target": target,
        "sources": [str(s) for s in sources],
        "names": names,
        "gate": cfg.gate,
        "variants": variants,
        "costs": {
            "backbone_params": backbone,
            "gate_params": {
                label: sum(p.numel() for p in gate_parameters(models[label].backbone))
                for label in GATE_VARIANTS.values()
            },
            "time_ratio_to_single": {
                label: times[label] / times["averaged"]
                for label in ("uniform", *GATE_VARIANTS.values())
            },
        },
        "gate_weights": gate_weights,
        "histories": histories,
        "stage_seconds": timings,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "lorex_version": __version__,
    }
    save_model(
        models[GATE_VARIANTS[cfg.gate]],
        out,
        seed=cfg.seed,
        made_by=run_record(
            "adapt classify",
            sources=[str(s) for s in sources],
            target=target,
            sage=cfg.to_dict(),
            work=str(work),
        ),
        extra_files={"metrics.json": metrics},
    )
    return metrics


def _accuracy(model: LorexModel, data: ImageDataset, device: torch.device) -> float:
    """Test accuracy of the active head (a source's own, or the target head)."""
    if list(model.classes) != list(data.classes):
        raise LorexError(f"the model's classes differ from {data.name}'s")
    return float(accuracy(predict(model, data, 256, device), data.labels))
