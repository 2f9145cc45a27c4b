"""``LorexModel``: a backbone plus named per-task heads.

The backbone maps ``[0, 1]`` images ``(B, 3, H, W)`` to features ``(B, D)``; each head maps
features to one task's logits. Heads are named by task so one backbone can serve several.
Clips ``(B, T, 3, H, W)`` run frame by frame and their features are averaged over time. An
optional side network (LoSA) computes the features from the frozen backbone's block tokens.

A head is a linear layer (``kind="linear"``, the default) or a re-ID BN-neck (``"bnneck"``):
BatchNorm1d with its bias at zero, then a bias-free classifier; ``embedding`` gives the re-ID
feature, the L2-normalised BN output (docs/reid.md).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from lorex.backbones.vit import image_hw
from lorex.errors import LorexError

HEAD_KINDS = ("linear", "bnneck")


def head_key(task: str) -> str:
    """A module-name-safe key for a task name (``digits/mnist`` -> ``digits_mnist``)."""
    key = re.sub(r"[^0-9A-Za-z_]+", "_", task).strip("_")
    return key or "task"


class BNNeckHead(nn.Module):
    """The re-ID head of BoT / SAGE: ``BatchNorm1d`` (bias frozen at 0) -> bias-free ``Linear``.

    The triplet loss reads the features before the BN, the classifier the BN output, and
    retrieval the L2-normalised BN output. ``bn.bias`` stays a parameter (state dict keys as
    ``nn.BatchNorm1d``'s) but starts at zero and is kept out of training by the re-ID objective.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        if not self.classifier.weight.is_meta:  # meta: shapes only (torch's meta normal_ is slow)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def neck(self, features: torch.Tensor) -> torch.Tensor:
        return self.bn(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(features))


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
    def image_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the images the backbone takes."""
        return image_hw(self.backbone_config.get("img_size") or self.backbone_config["image_size"])

    @property
    def image_size(self) -> int:
        """The side of the square images the backbone takes (``image_hw`` for any shape)."""
        h, w = self.image_hw
        if h != w:
            raise LorexError(f"this model takes {h}x{w} (height x width) images, not square ones")
        return h

    def add_head(
        self, task: str, classes: list[str], activate: bool = True, kind: str = "linear"
    ) -> str:
        """A head for ``task``: a zero linear layer, or (``kind="bnneck"``) a re-ID BN-neck."""
        if kind not in HEAD_KINDS:
            raise LorexError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
        key = head_key(task)
        if kind == "bnneck":
            self.heads[key] = BNNeckHead(self.num_features, len(classes))
        else:
            self.heads[key] = nn.Linear(self.num_features, len(classes))
            nn.init.zeros_(self.heads[key].weight)  # a zero head starts at uniform predictions
            nn.init.zeros_(self.heads[key].bias)
        self.heads[key].to(next(self.backbone.parameters()).device)
        # "kind" is written only for non-linear heads: linear heads' configs stay as they were.
        self.head_info[key] = {"task": task, "classes": list(classes)}
        if kind != "linear":
            self.head_info[key]["kind"] = kind
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

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The re-ID feature ``(B, D)``: the active BN-neck head's BN output, L2-normalised; for
        any other model, the L2-normalised pooled features."""
        features = self.features(x)
        head = self.heads[self.active_head] if self.active_head is not None else None
        if isinstance(head, BNNeckHead):
            features = head.neck(features)
        return F.normalize(features, dim=1)

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """What a frozen backbone gives for ``x``, which a feature cache may store: the pooled
        features, or the stacked block tokens a side network reads."""
        return self.side.taps(self.backbone, x) if self.side is not None else self.features(x)

    def features_cached(self, cached: torch.Tensor) -> torch.Tensor:
        """Pooled features from ``frozen_features`` output: only the trainable part runs."""
        if self.side is not None:
            return self.side.features_from_taps(self.backbone, cached)
        return cached

    def forward_cached(self, cached: torch.Tensor) -> torch.Tensor:
        """Logits from ``frozen_features`` output: only the trainable part runs."""
        return self.heads[self.active_head](self.features_cached(cached))
