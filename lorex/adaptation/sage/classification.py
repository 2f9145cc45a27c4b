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

from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import (
    add_target_head,
    gate_optimizer,
)
from lorex.adaptation.sage.stages import (
    GATE_VARIANTS,
    check_sources,
    costs,
    gate_weight_means,
    lora_experts,
    source_names,
    variant_models,
    work_dir,
    write_adapted,
)
from lorex.adapters.gated import mark_gate_trainable
from lorex.adapters.lora import LoraConfig, add_adapter, default_targets, mark_trainable
from lorex.data import ImageDataset, load_dataset
from lorex.errors import LorexError
from lorex.metrics.classification import accuracy
from lorex.metrics.resources import PeakMemory
from lorex.models import LorexModel, load_model, save_model
from lorex.training import distributed
from lorex.training.checkpoint import Checkpointer, CheckpointOptions
from lorex.training.loop import (
    DataParallelStep,
    TrainingDiverged,
    TrainResult,
    as_float,
    diverged,
    finish_training,
    images_to_tensor,
    make_optimizer,
    optimizer_step,
    predict,
    random_shift,
    share_of_batch_cross_entropy,
)

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
    checkpoint: CheckpointOptions | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> TrainResult:
    """Each epoch: label the target with the current model, then ``iters`` steps of
    cross-entropy on random batches (the head frozen). ``checkpoint``/``fingerprint``: as in
    ``fit``; a checkpoint holds the epoch's pseudo-labels."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x, true = images_to_tensor(data)
    optimizer, scheduler = make_opt(epochs * iters)
    result = TrainResult(trainable_params=sum(p.numel() for p in params))
    ckpt = Checkpointer(
        checkpoint,
        {
            "loop": "class-pseudo-labels",
            "config": cfg.to_dict(),
            "epochs": epochs,
            "iters": iters,
            "images": len(x),
            "desc": desc,
            **(fingerprint or {}),
        },
        model,
        optimizer,
        scheduler,
        {"batches": generator},
    )
    step, epoch0, batch0, resumed = 0, 0, 0, None
    restored = ckpt.restore()
    if restored is not None:
        step, position, arrays = restored
        epoch0, batch0, result.history = position["epoch"], position["batch"], position["history"]
        resumed = position, arrays["labels"]
    world = distributed.current()
    step_model = DataParallelStep.wrap(model, device, find_unused=True)
    bar = tqdm(
        total=epochs * iters,
        initial=step,
        desc=desc,
        disable=progress is False or None or not world.main,
        leave=False,
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        for epoch in range(epoch0, epochs):
            if resumed is None:
                feats, probs = _features_and_probs(model, x, device)
                mine = class_pseudo_labels(feats, probs) if world.main else None
                link = device if device.type == "cuda" else torch.device("cpu")
                labels = torch.from_numpy(distributed.broadcast_array(mine, link))  # rank 0's
                loss_sum, correct = 0.0, 0
            else:  # the epoch a checkpoint was taken in, with its labels
                position, labels = resumed
                loss_sum, correct = position["loss_sum"], position["correct"]
                if not world.main:  # rank 0 carries the sums so far
                    loss_sum, correct = 0.0, 0
                resumed = None
            model.train()
            for b in range(batch0, iters):
                drawn = torch.randint(len(x), (cfg.batch_size,), generator=generator)
                rows = distributed.shard_slice(len(drawn), world)
                idx = drawn[rows]  # this rank's share of the global batch
                batch = as_float(x[idx], device)
                if cfg.augment:
                    batch = random_shift(batch, 2, generator, (len(drawn), rows))
                logits = step_model(batch, False)
                loss = share_of_batch_cross_entropy(
                    logits, labels[idx].to(device), cfg.label_smoothing, len(drawn)
                )
                try:
                    optimizer_step(loss, optimizer, scheduler, params, epoch)
                except TrainingDiverged as exc:
                    raise diverged(exc, ckpt) from None
                step += 1
                loss_sum += loss.item() / world.size
                correct += int((logits.argmax(1).cpu() == labels[idx]).sum())
                bar.update(1)
                if ckpt.due(step) or step == epochs * iters:
                    sums = distributed.all_sum([loss_sum, correct], device)
                    position = {
                        "epoch": epoch,
                        "batch": b + 1,
                        "loss_sum": sums[0],
                        "correct": int(sums[1]),
                        "history": result.history,
                    }
                    ckpt.save(step, position, {"labels": labels})
            batch0 = 0
            loss_sum, correct = distributed.all_sum([loss_sum, correct], device)
            result.history.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum / iters,
                    # the share of pseudo-labels that are right: a diagnostic nothing reads
                    "diagnostic_label_accuracy": float((labels == true).float().mean()),
                    # agreement with the pseudo-labels it trains on, as in the re-ID loop
                    "train_accuracy": int(correct) / (iters * cfg.batch_size),
                }
            )
        result.train_seconds = time.perf_counter() - start
    bar.close()
    result.checkpoint = ckpt
    return finish_training(model, result, mem)


def adapt_source_expert_classification(
    source: str | Path,
    target: ImageDataset,
    out: str | Path,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
    checkpoint: CheckpointOptions | None = None,
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
        checkpoint,
        {"source": str(source)},
    )
    if not distributed.current().main:  # under torchrun rank 0 writes
        return {}
    metrics = {"history": result.history, "train_seconds": result.train_seconds}
    save_model(
        model,
        out,
        weights="delta",
        base_dir=source,
        seed=cfg.seed,
        extra_files={"metrics.json": metrics},
    )
    result.checkpoint.discard()
    return metrics


def train_gate_classification(
    model: LorexModel,
    target: ImageDataset,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> TrainResult:
    params = mark_gate_trainable(model.backbone)
    model.heads.requires_grad_(False)

    def make_opt(total: int):
        return gate_optimizer(model, cfg.gate_lr)

    kind = model.backbone.gate_config.kind
    return train_on_class_pseudo_labels(
        model,
        target,
        params,
        make_opt,
        cfg,
        1,
        cfg.gate_iters,
        device,
        progress,
        f"{kind} gate",
        checkpoint,
        {"gate": kind},
    )


def adapt_classification(
    sources: Sequence[str | Path],
    target: str,
    out: str | Path,
    cfg: SageConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    work: str | Path | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """``adapt_reid``'s pipeline on a classification target: every variant's test accuracy.
    ``checkpoint`` (every, resume): each training stage checkpoints under the work directory."""
    cfg = cfg or SageConfig()
    device = torch.device(device)
    sources = check_sources(sources)
    out = Path(out)
    work = work_dir(out, work)
    ckpt = checkpoint.at(work / "checkpoints") if checkpoint is not None else None
    train = load_dataset(target, "train", cfg.max_target_samples, cfg.seed)
    test = load_dataset(target, "test")
    names = source_names(sources)
    timings: dict[str, float] = {}
    histories: dict[str, Any] = {}

    def adapt(source: Path, path: Path) -> None:
        sub = ckpt and ckpt.sub(f"experts-{path.name}")
        adapt_source_expert_classification(source, train, path, cfg, device, progress, sub)

    experts = lora_experts(sources, names, work, f"classify {target}", cfg, adapt, timings)
    models = variant_models(
        sources,
        experts,
        names,
        work,
        cfg,
        lambda model, label: train_gate_classification(
            model, train, cfg, device, progress, ckpt and ckpt.sub(label.replace("/", "-"))
        ),
        device,
        timings,
        histories,
    )
    if not distributed.current().main:  # under torchrun rank 0 measures and writes
        return {}
    variants = {
        label: {"accuracy": _accuracy(model, test, device)} for label, model in models.items()
    }
    cost = costs(models, names, variants, test.images, device)
    gate_weights = {
        label: gate_weight_means(models[label], test.images[:512], device)
        for label in GATE_VARIANTS.values()
    }
    results = {
        "names": names,
        "variants": variants,
        "costs": cost,
        "gate_weights": gate_weights,
        "histories": histories,
        "stage_seconds": timings,
    }
    metrics = write_adapted(
        "adapt classify", models, out, work, cfg, sources, target, results, device=device
    )
    return metrics


def _accuracy(model: LorexModel, data: ImageDataset, device: torch.device) -> float:
    """Test accuracy of the active head (a source's own, or the target head)."""
    if list(model.classes) != list(data.classes):
        raise LorexError(f"the model's classes differ from {data.name}'s")
    return float(accuracy(predict(model, data, 256, device), data.labels))
