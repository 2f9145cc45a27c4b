"""SAGE-reID's settings: the authors' values where they transfer to small CPU backbones, and the
deliberate departures, each with its reason (docs/sage.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lorex.adapters.gated import GATE_KINDS
from lorex.errors import LorexError
from lorex.training.config import TrainConfig


@dataclass
class SageConfig:
    # Stage 2: one LoRA expert per source, adapted on target pseudo-labels.
    epochs: int = 6  # each epoch re-labels the target, then trains `iters` steps
    iters: int | None = None  # steps per epoch; None: one pass over the clustered images
    batch_size: int = 64  # P x K = 16 pseudo-identities x 4 images
    num_instances: int = 4
    lr: float = 2e-4  # AdamW, warmup + cosine over all stage-2 steps (docs/sage.md: 1e-3 hurt)
    weight_decay: float = 1e-4  # the authors' value
    rank: int = 8  # r = 8, alpha = 32 (scaling 4), on qkv, proj, fc1, fc2, plus every bias
    alpha: float = 32.0
    label_smoothing: float = 0.1
    augment: bool = True  # flip + 2-pixel shift (SAGE's flip + pad-and-crop at 64x32)
    # Pseudo-labels (lorex.adaptation.pseudo_labels).
    k1: int = 20
    k2: int = 6
    rho: float = 1.6e-3
    min_samples: int = 4
    # Stage 4: only the gate trains, on one clustering by the initial (uniform) model.
    gate_iters: int = 41  # the authors' 10% of 400 + 1 (400 was tried: docs/sage.md)
    gate_lr: float = 1e-2  # Adam: the published and light gates' gradients differ in scale
    gate: str = "light"  # the gate of the model written to --out; both are measured
    # The gate also lowers the features' between-camera share (target camera ids; docs/sage.md).
    gate_camera: bool = True
    gate_camera_batch: int = 128  # random target images per step for that term
    max_target_samples: int | None = None  # whole identities of the target train split
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": isinstance(self.epochs, int) and self.epochs >= 1,
            "iters": self.iters is None or (isinstance(self.iters, int) and self.iters >= 1),
            "batch_size": self.batch_size >= 2 * self.num_instances
            and self.batch_size % self.num_instances == 0,
            "num_instances": self.num_instances >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0,
            "rank": isinstance(self.rank, int) and self.rank >= 1,
            "alpha": self.alpha > 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "k1": self.k1 >= 1,
            "k2": self.k2 >= 1,
            "rho": 0 < self.rho <= 1,
            "min_samples": self.min_samples >= 1,
            "gate_iters": self.gate_iters >= 1,
            "gate_lr": self.gate_lr > 0 and math.isfinite(self.gate_lr),
            "gate": self.gate in GATE_KINDS,
            "gate_camera_batch": isinstance(self.gate_camera_batch, int)
            and self.gate_camera_batch >= 8,
            "max_target_samples": self.max_target_samples is None or self.max_target_samples >= 8,
        }
        for name, ok in checks.items():
            if not ok:
                raise LorexError(f"sage: invalid {name} {getattr(self, name)!r}")

    def train_config(self) -> TrainConfig:
        """The stage-2 optimiser settings in the form every lorex loop takes."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            augment=self.augment,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
