"""The settings of one training run, as every objective reads them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lorex.errors import LorexError


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = False  # random shifts of up to 2 pixels
    # With a frozen backbone and no augmentation, compute its features once (off: every epoch).
    feature_cache: bool = True
    seed: int = 0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "seed": 0 <= self.seed < 2**63,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "max_samples": self.max_samples is None or self.max_samples >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise LorexError(f"{name}: invalid value {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)
