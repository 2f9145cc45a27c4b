"""SAGE-reID's settings: the authors' values where they transfer to small CPU backbones, and the
deliberate departures, each with its reason (docs/sage.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.adapters.gated import GATE_KINDS
from lorex.adapters.lora.config import RANK_OPTION
from lorex.errors import LorexError
from lorex.settings_field import setting
from lorex.training.config import TrainConfig


@dataclass
class SageConfig:
    """Each field's ``help`` (and ``check``, how its flag parses) is its ``lorex adapt`` flag's."""

    # Stage 2: one LoRA expert per source, adapted on target pseudo-labels.
    epochs: int = setting(
        6, "stage 2: each epoch re-labels the target, then trains", check="positive"
    )
    iters: int | None = setting(
        None, "stage 2: steps per epoch (default: one pass over the target)", check="positive"
    )
    batch_size: int = setting(64, "stage 2: P x K = 16 x 4", check="positive")
    num_instances: int = setting(4, "stage 2: K images per pseudo-identity", check="positive")
    # AdamW, warmup + cosine over all stage-2 steps (docs/sage.md: 1e-3 hurt).
    lr: float = setting(2e-4, "stage 2: AdamW peak lr", check="positive")
    weight_decay: float = setting(
        1e-4, "stage 2: AdamW weight decay, the authors' value", check="non_negative"
    )
    # r = 8, alpha = 32 (scaling 4), on qkv, proj, fc1, fc2, plus every bias.
    rank: int = field(default=8, metadata=RANK_OPTION)
    alpha: float = setting(32.0, "LoRA alpha", check="positive")
    label_smoothing: float = setting(0.1, "stage 2: cross-entropy label smoothing")
    augment: bool = setting(True, "stage 2: flip + 2-pixel shift (SAGE's flip + pad-and-crop)")
    # Pseudo-labels (lorex.adaptation.pseudo_labels).
    k1: int = setting(20, "k-reciprocal k1", check="positive")
    k2: int = setting(6, "query expansion k2", check="positive")
    rho: float = setting(1.6e-3, "DBSCAN eps heuristic", check="positive")
    min_samples: int = setting(4, "DBSCAN min samples", check="positive")
    # Stage 4: only the gate trains, on one clustering by the initial (uniform) model.
    gate_iters: int = setting(
        41, "stage 4: gate steps, the authors' 10% of 400 + 1 (docs/sage.md)", check="positive"
    )
    # Adam: the published and light gates' gradients differ in scale.
    gate_lr: float = setting(1e-2, "stage 4: the gate's Adam lr", check="positive")
    gate: str = setting(
        "light",
        "stage 4: the gate of the model written to --out; both are measured",
        choices=tuple(sorted(GATE_KINDS)),
    )
    gate_camera: bool = setting(
        True,
        "re-ID targets: the gate also lowers the features' between-camera share, "
        "read from the target's camera ids (docs/sage.md)",
    )
    gate_camera_batch: int = setting(
        128, "random target images per gate step for the camera term", check="positive"
    )
    max_target_samples: int | None = setting(
        None, "whole target identities, at most N", check="positive"
    )
    seed: int = setting(0, "random seed", check="seed")

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
