"""Stages 3-4: the averaged backbone, the K adapted LoRA experts stacked on it, and the gate.

Stage 3 follows the authors' code: the backbone is the uniform mean of the *source* (stage-1)
experts' backbones, heads left out, and its biases are then replaced by the mean of the
*adapted* (stage-2) experts' biases, which stage 2 trained. Our one departure: the BN-neck's
BatchNorm is the mean of the adapted experts' (whose running statistics were gathered on the
target) rather than of the source experts'. Each expert's A and B are stacked into a
:class:`lorex.adapters.gated.GatedLoraLinear` per adapted layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.objectives import train_on_pseudo_labels
from lorex.adaptation.sage.target_experts import TARGET_HEAD
from lorex.adapters.gated import (
    GateConfig,
    attach_gate,
    gated_layers,
    load_experts,
    mark_gate_trainable,
)
from lorex.adapters.lora import lora_layers
from lorex.backbones import build_backbone
from lorex.errors import LorexError
from lorex.models import BNNeckHead, LorexModel, load_model
from lorex.training.checkpoint import CheckpointOptions
from lorex.training.engine import TrainResult


class _RunningMean:
    """The uniform mean of state dicts seen one at a time (one model in memory, not K)."""

    def __init__(self) -> None:
        self.mean: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor], source: str) -> None:
        if self.count and set(state) != set(self.mean):
            key = sorted(set(state) ^ set(self.mean))[0]
            raise LorexError(f"{source}: key '{key}' does not match the other experts")
        self.count += 1
        for key, value in state.items():
            if self.count == 1:
                self.mean[key] = value.detach().clone()
            elif value.shape != self.mean[key].shape:
                raise LorexError(
                    f"{source}: '{key}' has shape {tuple(value.shape)}, the other experts "
                    f"{tuple(self.mean[key].shape)}"
                )
            elif value.is_floating_point():
                self.mean[key] += (value.to(self.mean[key]) - self.mean[key]) / self.count


def head_state(model: LorexModel, source: str | Path) -> tuple[str, dict, list[str] | None]:
    """What the target head inherits from an expert's active head: a BN-neck's BatchNorm (its
    classifier is per-domain identities, which the target replaces by cluster centroids), or a
    whole linear head (the same classes in every domain)."""
    if model.active_head is None:
        raise LorexError(f"{source}: the expert has no head")
    head = model.heads[model.active_head]
    if isinstance(head, BNNeckHead):
        return "bnneck", head.bn.state_dict(), None
    return "linear", head.state_dict(), list(model.classes)


def add_target_head(
    model: LorexModel, kind: str, state: dict[str, torch.Tensor], classes: list[str] | None
) -> None:
    if kind == "bnneck":
        model.add_head(TARGET_HEAD, ["cluster-0"], kind="bnneck")
        model.heads[model.active_head].bn.load_state_dict(state)
    else:
        model.add_head(TARGET_HEAD, classes)
        model.heads[model.active_head].load_state_dict(state)


def _check_heads(kinds: set, classes: list, source: str | Path) -> None:
    if len(kinds) > 1:
        raise LorexError(f"{source}: its head is a {sorted(kinds)[-1]}, the others' are not")
    if len({tuple(c) if c else None for c in classes}) > 1:
        raise LorexError(f"{source}: its classes differ from the other experts'")


def averaged_sources(
    sources: Sequence[str | Path], device: torch.device | str = "cpu"
) -> LorexModel:
    """The uniform mean of the source experts' backbones, with the mean of what their heads pass
    on (:func:`head_state`) as the target head: the "averaged" variant."""
    if len(sources) < 2:
        raise LorexError(f"averaging needs at least 2 source experts, got {len(sources)}")
    backbone, bn = _RunningMean(), _RunningMean()
    kinds, classes = set(), []
    config = None
    for source in sources:
        expert = load_model(source)
        if config is None:
            config = expert.backbone_config
        elif expert.backbone_config != config:
            raise LorexError(f"{source}: its backbone differs from {sources[0]}'s")
        backbone.add(expert.backbone.state_dict(), str(source))
        kind, state, names = head_state(expert, source)
        kinds.add(kind)
        classes.append(names)
        _check_heads(kinds, classes, source)
        bn.add(state, str(source))
    model = LorexModel(build_backbone(config), config)
    model.backbone.load_state_dict(backbone.mean)
    add_target_head(model, kinds.pop(), bn.mean, classes[0])
    return model.to(device).eval()


def gated_model(
    sources: Sequence[str | Path],
    experts: Sequence[str | Path],
    names: Sequence[str],
    kind: str = "light",
    device: torch.device | str = "cpu",
) -> LorexModel:
    """The averaged backbone with the adapted experts' biases, BN and stacked LoRA weights, and
    a gate of ``kind`` at its initial state (the uniform mix)."""
    if not len(sources) == len(experts) == len(names):
        raise LorexError("gated model: one adapted expert and one name per source")
    model = averaged_sources(sources)
    biases, bn = _RunningMean(), _RunningMean()
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    shapes = None
    for name, path in zip(names, experts, strict=True):
        expert = load_model(path)
        layers = lora_layers(expert.backbone)
        if not layers:
            raise LorexError(f"{path}: not a LoRA expert (no LoRA layers)")
        ranks = {
            (layer.lora_A["default"].weight.shape[0], layer.scaling["default"])
            for layer in layers.values()
        }
        if len(ranks) != 1 or (shapes is not None and ranks != shapes):
            raise LorexError(f"{path}: every expert needs one LoRA rank and scaling, got {ranks}")
        shapes = ranks
        weights[name] = {
            p: (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())
            for p, layer in layers.items()
        }
        biases.add(
            {
                n.replace(".base_layer", ""): p.detach()
                for n, p in expert.backbone.named_parameters()
                if n.endswith("bias") and ".lora_" not in n
            },
            str(path),
        )
        bn.add(head_state(expert, path)[1], str(path))
    ((r, scaling),) = shapes
    state = model.backbone.state_dict()
    unknown = sorted(set(biases.mean) - set(state))
    if unknown:
        raise LorexError(f"{experts[0]}: bias '{unknown[0]}' is not in the averaged backbone")
    state.update(biases.mean)
    model.backbone.load_state_dict(state)
    _load_head(model, bn.mean)
    tokens = None
    if kind == "published":
        if not hasattr(model.backbone, "pos_embed"):
            raise LorexError("the published gate needs a ViT with a position table (token count)")
        tokens = int(model.backbone.pos_embed.shape[1])
    config = GateConfig(
        experts=list(names),
        r=int(r),
        scaling=float(scaling),
        target_modules=sorted(weights[names[0]]),
        kind=kind,
        tokens=tokens,
    )
    attach_gate(model.backbone, config)
    load_experts(model.backbone, weights)
    return model.to(device).eval()


def _load_head(model: LorexModel, state: dict[str, torch.Tensor]) -> None:
    head = model.heads[model.active_head]
    (head.bn if isinstance(head, BNNeckHead) else head).load_state_dict(state)


def gate_optimizer(model: LorexModel, lr: float):
    """Adam on the gates at a constant ``lr``; a published gate's vectors take ``lr / tokens``.

    Why: the published score sums over the N tokens where the light one averages, so with one
    Adam step size its logits would move N times faster (in a trial they saturated to one-hot
    weights within the 41 steps); dividing by N moves both gates' logits at the same rate.
    """
    groups = []
    for layer in gated_layers(model.backbone).values():
        scale = 1.0 / layer.gate.shape[0] if layer.kind == "published" else 1.0
        groups += [{"params": [layer.gate], "lr": lr * scale}, {"params": [layer.tau], "lr": lr}]
    optimizer = torch.optim.Adam(groups, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_gate(
    model: LorexModel,
    images: np.ndarray,
    cfg: SageConfig,
    device: torch.device,
    progress: bool | None = None,
    true_ids: np.ndarray | None = None,
    checkpoint: CheckpointOptions | None = None,
    camera_ids: np.ndarray | None = None,
) -> TrainResult:
    """Stage 4: one clustering by the initial (uniform) model, then ``gate_iters`` Adam steps on
    the gate vectors and temperatures only. Experts, backbone, BN-neck and classifier are frozen,
    the BN-neck's running statistics included: in the authors' code they kept updating, and in
    our first benchmark run that alone cost 0.8 mAP on reid/c (docs/sage.md).

    ``camera_ids`` (the target train images' cameras): the loss also lowers the features'
    between-camera share (``train_on_pseudo_labels``; our addition, docs/sage.md)."""
    params = mark_gate_trainable(model.backbone)
    model.heads.requires_grad_(False)

    def make_optimizer(total: int):
        return gate_optimizer(model, cfg.gate_lr)

    return train_on_pseudo_labels(
        model,
        images,
        PseudoLabeler(cfg.k1, cfg.k2, cfg.rho, cfg.min_samples),
        params,
        make_optimizer,
        cfg,
        epochs=1,
        iters=cfg.gate_iters,
        device=device,
        progress=progress,
        desc=f"{model.backbone.gate_config.kind} gate",
        true_ids=true_ids,
        freeze_neck=True,
        checkpoint=checkpoint,
        fingerprint={"gate": model.backbone.gate_config.kind},
        camera_ids=camera_ids,
        camera_batch=cfg.gate_camera_batch,
    )
