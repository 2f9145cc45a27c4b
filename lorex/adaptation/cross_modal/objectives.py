"""Cross-modal transfer's two training objectives, run by :mod:`lorex.training.engine`.

:class:`TargetTransfer` (SHOT, SOCKET and TGKT share it): a copy of the source adapted to the
unlabelled task-relevant target images, its classifier frozen, with five weighted terms:
- ``im_weight``: information maximisation (confident and diverse predictions);
- ``self_weight``: cross-entropy to SHOT's centroid pseudo-labels, re-computed every epoch;
- ``stats_weight``: the batch's per-block token statistics matched to the source's;
- ``ti_weight``: its features of TI target images matched to the source's features of the
  paired TI RGB images (computed once: the source is frozen);
- ``kd_weight``: KL distillation from the frozen source applied to the TGMB translations of
  the same target images (computed once: source and translator are frozen); with
  ``kd_refresh`` each later epoch's teacher also averages the target model's own reading.
A zero weight skips its term's computation.

:class:`Translator` (TGMB): a translator from the target modality to source-like RGB, the source
frozen. Losses (docs/cross_modal.md): reconstruction of the paired TI RGB (in pixels, and
optionally in the frozen source's feature space); information maximisation of the source's
predictions on translated task-relevant target images; and an optional LSGAN critic between
real TI RGB and translated target images. Only the translator and the critic learn; as in the
published recipe their gradients are not clipped (``clip_norm = None``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.losses import (
    feature_alignment,
    information_maximisation,
    kl_distillation,
    lsgan_critic_loss,
    lsgan_generator_loss,
    statistics_matching,
    teacher_log_probs,
)
from lorex.adaptation.cross_modal.transfer import features_and_logits, replicate
from lorex.adaptation.cross_modal.translator import PatchCritic, build_translator
from lorex.adaptation.sage.relabel import class_pseudo_labels
from lorex.models import LorexModel
from lorex.training.batches import random_shift
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.config import TrainConfig
from lorex.training.engine import Objective, TrainResult, make_optimizer, train

Stats = tuple[list[torch.Tensor], list[torch.Tensor]]


class TargetTransfer(Objective):
    """A copy of ``source`` adapted to ``target`` ``(N, 1, H, W)``; the inputs a term needs are
    required only when its weight is positive."""

    loop = "cross-modal transfer"

    def __init__(
        self,
        source,
        target,
        cfg: CrossModalConfig,
        ti_target,
        ti_source_features,
        teacher_logits,
        source_stats: Stats | None,
        desc: str,
    ):
        super().__init__()
        needs = {
            "ti_weight": ti_target is not None and ti_source_features is not None,
            "kd_weight": teacher_logits is not None,
            "stats_weight": source_stats is not None,
        }
        for weight, present in needs.items():
            if getattr(cfg, weight) > 0 and not present:
                raise ValueError(f"{weight} > 0 needs its inputs")
        self.source, self.target, self.cfg, self.desc = source, target, cfg, desc
        self.ti_target, self.ti_source_features = ti_target, ti_source_features
        self.teacher_logits, self.source_stats = teacher_logits, source_stats
        self.seed, self.epochs, self.resumed = cfg.seed, cfg.epochs, None
        self.fingerprint = {"config": cfg.to_dict(), "target": len(target), "desc": desc}

    def prepare(self, device: torch.device) -> None:
        cfg, self.device = self.cfg, device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.generators = {"batches": self.generator}
        self.model = model = copy.deepcopy(self.source).to(device)
        model.requires_grad_(False)
        model.backbone.requires_grad_(True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.head = model.heads[model.active_head]
        self.steps_per_epoch = max(1, len(self.target) // cfg.batch_size)  # IM needs a batch
        if self.source_stats is not None:
            means, variances = self.source_stats
            self.source_stats = ([m.to(device) for m in means], [v.to(device) for v in variances])
        self.refresh = cfg.kd_refresh and cfg.kd_weight > 0
        self.teacher = self.teacher_logits

    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def optimizers(self, total: int):
        cfg = self.cfg
        train_cfg = TrainConfig(
            epochs=max(1, cfg.epochs), lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed
        )
        return make_optimizer(self.model, train_cfg, max(1, total))

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        if "batch" not in position:  # a checkpoint from before the engine named it "step"
            position["batch"] = position["step"]
        self.resumed = position["sums"], arrays["order"], arrays.get("labels")
        self.teacher = arrays.get("teacher", self.teacher)

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        arrays = {"order": self.order}
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.refresh:
            arrays["teacher"] = self.teacher
        return {"sums": self.sums}, arrays

    def begin_epoch(self, epoch: int) -> list[torch.Tensor]:
        cfg, model, self.epoch = self.cfg, self.model, epoch
        if self.resumed is None:
            self.labels = None
            if cfg.self_weight > 0 or (self.refresh and epoch > 0):
                feats, logits = features_and_logits(model, self.target, self.device)
            if cfg.self_weight > 0:
                probs = F.softmax(logits, 1).numpy()
                self.labels = torch.from_numpy(class_pseudo_labels(feats.numpy(), probs))
            if self.refresh and epoch > 0:  # the fixed teacher's view and the model's own
                self.teacher = teacher_log_probs(self.teacher_logits, logits, cfg.kd_balance)
            self.order = torch.randperm(len(self.target), generator=self.generator)
            self.sums: dict[str, float] = {}
        else:  # the epoch a checkpoint was taken in: its labels and order as they were
            self.sums, self.order, self.labels = self.resumed
            self.resumed = None
        model.train()
        n = cfg.batch_size
        return [self.order[s * n : (s + 1) * n] for s in range(self.steps_per_epoch)]

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, device, model = self.cfg, self.device, self.model
        x = self.target[idx]
        if cfg.augment:
            x = _augment(x, self.generator)
        tokens = model.backbone.forward_tokens(replicate(x.to(device)))
        logits = self.head(model.backbone.pool(tokens[-1]))
        terms: dict[str, torch.Tensor] = {}
        if cfg.im_weight > 0:
            terms["im"] = cfg.im_weight * information_maximisation(logits)
        if self.labels is not None:
            target = self.labels[idx].to(device)
            terms["self"] = cfg.self_weight * F.cross_entropy(logits, target)
        if cfg.stats_weight > 0:
            terms["stats"] = cfg.stats_weight * statistics_matching(
                tokens, *self.source_stats, cfg.first_layer_stats_factor
            )
        if cfg.kd_weight > 0:
            teacher = self.teacher[idx].to(device)
            kd = kl_distillation(logits, teacher, cfg.kd_temperature, cfg.kd_confidence)
            terms["kd"] = cfg.kd_weight * kd
        if cfg.ti_weight > 0:
            ti_idx = torch.randint(len(self.ti_target), (len(idx),), generator=self.generator)
            ti_feats = model.features(replicate(self.ti_target[ti_idx].to(device)))
            terms["ti"] = cfg.ti_weight * feature_alignment(
                ti_feats, self.ti_source_features[ti_idx].to(device)
            )
        loss = sum(terms.values())
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        return loss, {"epoch": self.epoch + 1, "loss": f"{float(loss.detach()):.3f}"}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        entry = {"epoch": epoch + 1, **{k: v / self.steps_per_epoch for k, v in self.sums.items()}}
        if self.labels is not None:
            entry["pseudo_label_classes"] = int(len(np.unique(self.labels.numpy())))
        return entry


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return random_shift(x, 2, generator)


class Translator(Objective):
    """TGMB: one epoch of ``translator_steps`` random batches; the history has one entry per 50
    steps. Two optimisers (translator, critic), no schedule, no clipping."""

    loop = "tgmb"
    desc = "TGMB"
    clip_norm = None
    divergence = "TGMB diverged: loss is {loss} at step {step}"
    LOG_EVERY = 50

    def __init__(
        self, source, ti_target, ti_rgb, target, cfg: CrossModalConfig, ti_source_features
    ):
        super().__init__()
        if cfg.tgmb_feat_weight > 0 and ti_source_features is None:
            raise ValueError("tgmb_feat_weight > 0 needs the source's features of the TI RGB")
        self.source, self.ti_target, self.ti_rgb, self.target = source, ti_target, ti_rgb, target
        self.cfg, self.ti_source_features, self.seed = cfg, ti_source_features, cfg.seed
        self.fingerprint = {"config": cfg.to_dict(), "ti": len(ti_target), "target": len(target)}
        self.running: dict[str, float] = {}

    def prepare(self, device: torch.device) -> None:
        cfg, self.device = self.cfg, device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.generators = {"batches": self.generator}
        self.model = build_translator(cfg.translator, cfg.translator_width).to(device)
        self.critic = PatchCritic().to(device) if cfg.adv_weight > 0 else None
        self.source.eval()
        self.source.requires_grad_(False)
        self.params = list(self.model.parameters())
        self.batch = min(cfg.batch_size, len(self.ti_target), len(self.target))

    def total_steps(self) -> int:
        return self.cfg.translator_steps

    def optimizers(self, total: int):
        def adam(net: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.Adam(net.parameters(), lr=self.cfg.translator_lr, betas=(0.5, 0.999))

        optimizers = {"translator": adam(self.model)}
        if self.critic is not None:
            optimizers["critic"] = adam(self.critic)
        return optimizers, None

    def checkpointed(self) -> nn.Module:
        critic = {"critic": self.critic} if self.critic is not None else {}
        return nn.ModuleDict({"translator": self.model, **critic})

    def load_state(self, position: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        self.running = position["running"]

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"running": self.running}, {}

    def start(self, result: TrainResult) -> None:
        self.model.train()

    def begin_epoch(self, epoch: int) -> range:
        return range(self.cfg.translator_steps)

    def step(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        cfg, device, g, source = self.cfg, self.device, self.generator, self.source
        ti_idx = torch.randint(len(self.ti_target), (self.batch,), generator=g)
        tr_idx = torch.randint(len(self.target), (self.batch,), generator=g)
        ti_in, ti_out = self.ti_target[ti_idx].to(device), self.ti_rgb[ti_idx].to(device)
        tr_in = self.target[tr_idx].to(device)
        fake_ti, fake_tr = self.model(ti_in), self.model(tr_in)
        terms = {"rec": F.mse_loss(fake_ti, ti_out)}
        if cfg.tgmb_feat_weight > 0:
            reference = self.ti_source_features[ti_idx].to(device)
            terms["feat"] = feature_alignment(source.features(fake_ti), reference)
        if cfg.tgmb_im_weight > 0:
            terms["im"] = information_maximisation(source(fake_tr))
        if self.critic is not None:
            terms["adv"] = lsgan_generator_loss(self.critic(fake_tr))
        losses = {
            "translator": cfg.rec_weight * terms["rec"]
            + cfg.tgmb_feat_weight * terms.get("feat", 0.0)
            + cfg.tgmb_im_weight * terms.get("im", 0.0)
            + cfg.adv_weight * terms.get("adv", 0.0)
        }
        if self.critic is not None:  # the critic is not the translator's: same values as after
            real, fake = self.critic(ti_out), self.critic(fake_tr.detach())
            losses["critic"] = terms["critic"] = lsgan_critic_loss(real, fake)
        for k, v in terms.items():
            self.running[k] = self.running.get(k, 0.0) + float(v.detach())
        if (i + 1) % self.LOG_EVERY == 0 or i + 1 == cfg.translator_steps:
            n = (i % self.LOG_EVERY) + 1
            self.history.append({"step": i + 1, **{k: v / n for k, v in self.running.items()}})
            self.running = {}
            return losses, {"rec": f"{self.history[-1]['rec']:.4f}"}
        return losses, None


def train_target_model(
    source: LorexModel,
    target: torch.Tensor,
    cfg: CrossModalConfig,
    device: torch.device,
    ti_target: torch.Tensor | None = None,
    ti_source_features: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    source_stats: Stats | None = None,
    progress: bool | None = None,
    desc: str = "transfer",
    checkpoint: CheckpointOptions | None = None,
) -> tuple[LorexModel, TrainResult]:
    """A copy of ``source`` adapted to ``target`` ``(N, 1, H, W)``; the inputs a term needs are
    required only when its weight is positive. ``checkpoint``: as in ``fit``."""
    objective = TargetTransfer(
        source, target, cfg, ti_target, ti_source_features, teacher_logits, source_stats, desc
    )
    result = train(objective, device, progress, checkpoint)
    return objective.model, result


def train_translator(
    source: LorexModel,
    ti_target: torch.Tensor,
    ti_rgb: torch.Tensor,
    target: torch.Tensor,
    cfg: CrossModalConfig,
    device: torch.device,
    progress: bool | None = None,
    ti_source_features: torch.Tensor | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """The trained translator (in eval mode) and its loss curve (one entry per 50 steps).

    ``ti_target`` ``(M, 1, H, W)`` and ``ti_rgb`` ``(M, 3, H, W)`` are the TI pairs; ``target``
    ``(N, 1, H, W)`` the unlabelled task-relevant target images; all in [0, 1] on the CPU.
    ``ti_source_features``: the source's features of ``ti_rgb``, needed when ``tgmb_feat_weight``
    is positive. ``checkpoint``: as in ``fit`` (translator, critic, both optimisers, the RNGs).
    """
    objective = Translator(source, ti_target, ti_rgb, target, cfg, ti_source_features)
    result = train(objective, device, progress, checkpoint)
    return objective.model, result.history
