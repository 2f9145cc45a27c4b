"""``LorexModel``: a backbone plus named per-task linear heads.

The backbone maps ``[0, 1]`` images ``(B, 3, H, W)`` to features ``(B, D)``; each head maps
features to one task's logits. Heads are named by task so one backbone can serve several.
Clips ``(B, T, 3, H, W)`` run frame by frame and their features are averaged over time. An
optional side network (LoSA) computes the features from the frozen backbone's block tokens.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lorex.errors import LorexError


def head_key(task: str) -> str:
    """A module-name-safe key for a task name (``digits/mnist`` -> ``digits_mnist``)."""
    key = re.sub(r"[^0-9A-Za-z_]+", "_", task).strip("_")
    return key or "task"


class LorexModel(nn.Module):
    def __init__(self, backbone: nn.Module, backbone_config: dict):
        super().__init__()
        self.backbone = backbone
        self.backbone_config = backbone_config
        self.heads = nn.ModuleDict()
        self.head_info: dict[str, dict] = {}  # key -> {"task": name, "classes": [...]}
        self.active_head: str | None = None
        self.side: nn.Module | None = None  # a LoSA side network, when one is attached

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    @property
    def image_size(self) -> int:
        return int(self.backbone_config.get("img_size") or self.backbone_config["image_size"])

    def add_head(self, task: str, classes: list[str], activate: bool = True) -> str:
        key = head_key(task)
        self.heads[key] = nn.Linear(self.num_features, len(classes))
        nn.init.zeros_(self.heads[key].weight)  # a zero head starts at uniform predictions
        nn.init.zeros_(self.heads[key].bias)
        self.heads[key].to(next(self.backbone.parameters()).device)
        self.head_info[key] = {"task": task, "classes": list(classes)}
        if activate:
            self.active_head = key
        return key

    def set_head(self, task_or_key: str) -> None:
        key = task_or_key if task_or_key in self.heads else head_key(task_or_key)
        if key not in self.heads:
            raise LorexError(
                f"no head for task '{task_or_key}'; heads: {', '.join(self.tasks) or 'none'}"
            )
        self.active_head = key

    @property
    def tasks(self) -> list[str]:
        return [info["task"] for info in self.head_info.values()]

    @property
    def classes(self) -> list[str]:
        if self.active_head is None:
            raise LorexError("this model has no classification head (it is a bare backbone)")
        return self.head_info[self.active_head]["classes"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, D)`` of images ``(B, 3, H, W)`` or clips ``(B, T, 3, H, W)``."""
        if self.side is not None:
            return self.side(self.backbone, x)
        if x.ndim == 5:
            return self.backbone(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1)).mean(1)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_head is None:
            raise LorexError("this model has no classification head (it is a bare backbone)")
        return self.heads[self.active_head](self.features(x))

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """What a frozen backbone gives for ``x``, which a feature cache may store: the pooled
        features, or the stacked block tokens a side network reads."""
        return self.side.taps(self.backbone, x) if self.side is not None else self.features(x)

    def forward_cached(self, cached: torch.Tensor) -> torch.Tensor:
        """Logits from ``frozen_features`` output: only the trainable part runs."""
        if self.side is not None:
            cached = self.side.features_from_taps(self.backbone, cached)
        return self.heads[self.active_head](cached)
