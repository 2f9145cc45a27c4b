"""The target model's training, shared by SHOT, SOCKET and TGKT: one loop, five weighted terms.

The target model starts as a copy of the source; its classifier stays frozen (SHOT, SOCKET) and
the backbone trains on the unlabelled task-relevant target images with
- ``im_weight``: information maximisation (confident and diverse predictions);
- ``self_weight``: cross-entropy to SHOT's centroid pseudo-labels, re-computed every epoch;
- ``stats_weight``: the batch's per-block token statistics matched to the source's;
- ``ti_weight``: its features of TI target images matched to the source's features of the
  paired TI RGB images (computed once: the source is frozen);
- ``kd_weight``: KL distillation from the frozen source applied to the TGMB translations of
  the same target images (computed once: source and translator are frozen); with
  ``kd_refresh`` each later epoch's teacher also averages the target model's own reading.
A zero weight skips its term's computation.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.losses import (
    feature_alignment,
    information_maximisation,
    kl_distillation,
    statistics_matching,
    teacher_log_probs,
)
from lorex.adaptation.sage.relabel import class_pseudo_labels
from lorex.metrics.resources import PeakMemory
from lorex.models import LorexModel
from lorex.training.checkpoint import Checkpointer, CheckpointOptions
from lorex.training.loop import (
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    diverged,
    finish_training,
    make_optimizer,
    optimizer_step,
    random_shift,
)


def replicate(one_channel: torch.Tensor) -> torch.Tensor:
    """A one-channel image as the 3-channel input of an RGB model (SOCKET's loader does this)."""
    return one_channel.expand(-1, 3, -1, -1)


@torch.inference_mode()
def features_and_logits(
    model: LorexModel, images: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and logits of float images ``(N, C, H, W)`` (1 channel: replicated)."""
    model.eval()
    feats, logits = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        f = model.features(replicate(x) if x.shape[1] == 1 else x)
        feats.append(f.cpu())
        logits.append(model.heads[model.active_head](f).cpu())
    return torch.cat(feats), torch.cat(logits)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return random_shift(x, 2, generator)


def train_target_model(
    source: LorexModel,
    target: torch.Tensor,
    cfg: CrossModalConfig,
    device: torch.device,
    ti_target: torch.Tensor | None = None,
    ti_source_features: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    source_stats: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    progress: bool | None = None,
    desc: str = "transfer",
    checkpoint: CheckpointOptions | None = None,
) -> tuple[LorexModel, TrainResult]:
    """A copy of ``source`` adapted to ``target`` ``(N, 1, H, W)``; the inputs a term needs are
    required only when its weight is positive. ``checkpoint``: as in ``fit``."""
    needs = {
        "ti_weight": ti_target is not None and ti_source_features is not None,
        "kd_weight": teacher_logits is not None,
        "stats_weight": source_stats is not None,
    }
    for weight, present in needs.items():
        if getattr(cfg, weight) > 0 and not present:
            raise ValueError(f"{weight} > 0 needs its inputs")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = copy.deepcopy(source).to(device)
    model.requires_grad_(False)
    model.backbone.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    head = model.heads[model.active_head]
    steps_per_epoch = max(1, len(target) // cfg.batch_size)  # full batches: IM needs a batch
    total = steps_per_epoch * cfg.epochs
    train_cfg = TrainConfig(
        epochs=max(1, cfg.epochs), lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed
    )
    optimizer, scheduler = make_optimizer(model, train_cfg, max(1, total))
    result = TrainResult(
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()),
    )
    if source_stats is not None:
        source_stats = (
            [m.to(device) for m in source_stats[0]],
            [v.to(device) for v in source_stats[1]],
        )
    ckpt = Checkpointer(
        checkpoint,
        {
            "loop": "cross-modal transfer",
            "config": cfg.to_dict(),
            "target": len(target),
            "desc": desc,
        },
        model,
        optimizer,
        scheduler,
        {"batches": generator},
    )
    done, epoch0, step0, resumed = 0, 0, 0, None
    refresh = cfg.kd_refresh and cfg.kd_weight > 0
    teacher = teacher_logits
    restored = ckpt.restore()
    if restored is not None:
        done, position, arrays = restored
        epoch0, step0, result.history = position["epoch"], position["step"], position["history"]
        resumed = position["sums"], arrays["order"], arrays.get("labels")
        teacher = arrays.get("teacher", teacher)
    bar = tqdm(
        total=total,
        initial=done,
        desc=desc,
        unit="step",
        disable=progress is False or None,
        leave=False,
    )
    with PeakMemory(device=device) as mem:
        start = time.perf_counter()
        for epoch in range(epoch0, cfg.epochs):
            if resumed is None:
                labels = None
                if cfg.self_weight > 0 or (refresh and epoch > 0):
                    feats, logits = features_and_logits(model, target, device)
                if cfg.self_weight > 0:
                    probs = F.softmax(logits, 1).numpy()
                    labels = torch.from_numpy(class_pseudo_labels(feats.numpy(), probs))
                if refresh and epoch > 0:  # the fixed teacher's view and the model's own
                    teacher = teacher_log_probs(teacher_logits, logits, cfg.kd_balance)
                order = torch.randperm(len(target), generator=generator)
                sums: dict[str, float] = {}
            else:  # the epoch a checkpoint was taken in: its labels and order as they were
                sums, order, labels = resumed
                resumed = None
            model.train()
            for step in range(step0, steps_per_epoch):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x = target[idx]
                if cfg.augment:
                    x = _augment(x, generator)
                tokens = model.backbone.forward_tokens(replicate(x.to(device)))
                logits = head(model.backbone.pool(tokens[-1]))
                terms: dict[str, torch.Tensor] = {}
                if cfg.im_weight > 0:
                    terms["im"] = cfg.im_weight * information_maximisation(logits)
                if labels is not None:
                    terms["self"] = cfg.self_weight * F.cross_entropy(
                        logits, labels[idx].to(device)
                    )
                if cfg.stats_weight > 0:
                    terms["stats"] = cfg.stats_weight * statistics_matching(
                        tokens, *source_stats, cfg.first_layer_stats_factor
                    )
                if cfg.kd_weight > 0:
                    terms["kd"] = cfg.kd_weight * kl_distillation(
                        logits,
                        teacher[idx].to(device),
                        cfg.kd_temperature,
                        cfg.kd_confidence,
                    )
                if cfg.ti_weight > 0:
                    ti_idx = torch.randint(len(ti_target), (len(idx),), generator=generator)
                    ti_feats = model.features(replicate(ti_target[ti_idx].to(device)))
                    terms["ti"] = cfg.ti_weight * feature_alignment(
                        ti_feats, ti_source_features[ti_idx].to(device)
                    )
                loss = sum(terms.values())
                try:
                    optimizer_step(loss, optimizer, scheduler, params, epoch)
                except TrainingDiverged as exc:
                    raise diverged(exc, ckpt) from None
                done += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
                if ckpt.due(done) or done == total:
                    position = {
                        "epoch": epoch,
                        "step": step + 1,
                        "sums": sums,
                        "history": result.history,
                    }
                    arrays = {"order": order, **({"labels": labels} if labels is not None else {})}
                    if refresh:
                        arrays["teacher"] = teacher
                    ckpt.save(done, position, arrays)
            step0 = 0
            entry = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}}
            if labels is not None:
                entry["pseudo_label_classes"] = int(len(np.unique(labels.numpy())))
            result.history.append(entry)
        result.train_seconds = time.perf_counter() - start
    bar.close()
    result.checkpoint = ckpt
    return model, finish_training(model, result, mem)
