"""SAGE-reID's settings: the authors' values where they transfer to small CPU backbones, and the
deliberate departures, each with its reason (docs/sage.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.adapters.gated import GATE_KINDS
from lorex.adapters.lora.config import RANK_OPTION
from lorex.errors import LorexError
from lorex.training.config import TrainConfig


@dataclass
class SageConfig:
    """Each field's ``help`` (and ``check``, how its flag parses) is its ``lorex adapt`` flag's."""

    # Stage 2: one LoRA expert per source, adapted on target pseudo-labels.
    epochs: int = field(
        default=6,
        metadata={
            "help": "stage 2: each epoch re-labels the target, then trains",
            "check": "positive",
        },
    )
    iters: int | None = field(
        default=None,
        metadata={
            "help": "stage 2: steps per epoch (default: one pass over the target)",
            "check": "positive",
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "stage 2: P x K = 16 x 4", "check": "positive"}
    )
    num_instances: int = field(
        default=4, metadata={"help": "stage 2: K images per pseudo-identity", "check": "positive"}
    )
    # AdamW, warmup + cosine over all stage-2 steps (docs/sage.md: 1e-3 hurt).
    lr: float = field(
        default=2e-4, metadata={"help": "stage 2: AdamW peak lr", "check": "positive"}
    )
    weight_decay: float = field(
        default=1e-4,
        metadata={
            "help": "stage 2: AdamW weight decay, the authors' value",
            "check": "non_negative",
        },
    )
    # r = 8, alpha = 32 (scaling 4), on qkv, proj, fc1, fc2, plus every bias.
    rank: int = field(default=8, metadata=RANK_OPTION)
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha", "check": "positive"})
    label_smoothing: float = field(
        default=0.1, metadata={"help": "stage 2: cross-entropy label smoothing"}
    )
    augment: bool = field(
        default=True,
        metadata={"help": "stage 2: flip + 2-pixel shift (SAGE's flip + pad-and-crop)"},
    )
    # Pseudo-labels (lorex.adaptation.pseudo_labels).
    k1: int = field(default=20, metadata={"help": "k-reciprocal k1", "check": "positive"})
    k2: int = field(default=6, metadata={"help": "query expansion k2", "check": "positive"})
    rho: float = field(
        default=1.6e-3, metadata={"help": "DBSCAN eps heuristic", "check": "positive"}
    )
    min_samples: int = field(
        default=4, metadata={"help": "DBSCAN min samples", "check": "positive"}
    )
    # Stage 4: only the gate trains, on one clustering by the initial (uniform) model.
    gate_iters: int = field(
        default=41,
        metadata={
            "help": "stage 4: gate steps, the authors' 10% of 400 + 1 (docs/sage.md)",
            "check": "positive",
        },
    )
    # Adam: the published and light gates' gradients differ in scale.
    gate_lr: float = field(
        default=1e-2, metadata={"help": "stage 4: the gate's Adam lr", "check": "positive"}
    )
    gate: str = field(
        default="light",
        metadata={
            "help": "stage 4: the gate of the model written to --out; both are measured",
            "choices": tuple(sorted(GATE_KINDS)),
        },
    )
    gate_camera: bool = field(
        default=True,
        metadata={
            "help": "re-ID targets: the gate also lowers the features' between-camera share, "
            "read from the target's camera ids (docs/sage.md)"
        },
    )
    gate_camera_batch: int = field(
        default=128,
        metadata={
            "help": "random target images per gate step for the camera term",
            "check": "positive",
        },
    )
    max_target_samples: int | None = field(
        default=None,
        metadata={"help": "whole target identities, at most N", "check": "positive"},
    )
    seed: int = field(default=0, metadata={"help": "random seed", "check": "seed"})

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
