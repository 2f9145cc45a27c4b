"""The demo's settings: what each stage trains, at the quick and the full size.

The benches start from the quick demo's base (``stages.ensure_base(QUICK, ...)``), so these
settings also decide the base every quick bench shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorex.data import DIGIT_DOMAINS

# DOGE and WUDI take seconds per merge on the quick experts (benchmarks/results/merge): the
# quick demo's merge table leaves them to `lorex bench merge`.
QUICK_MERGES = ("average", "task-arithmetic", "ties", "dare", "dare-ties", "iso-c", "tsv-m")


@dataclass(frozen=True)
class DemoSettings:
    """The defaults are the full demo's (all training data, 12 pretraining epochs)."""

    preset: str = "vit-micro"
    pretrain_samples: int | None = None
    pretrain_epochs: int = 12
    pretrain_lr: float = 5e-4
    pretrain_augment: bool = True
    expert_samples: int | None = None
    expert_epochs: int = 10
    full_lr: float = 1e-3
    linear_lr: float = 5e-3
    linear_epochs: int = 40
    test_samples: int | None = None
    lora_lr: float = 5e-3  # rank 8 on every block's qkv, proj, fc1, fc2 (docs/lora.md)
    lora_epochs: int | None = None  # default: expert_epochs
    lora_alpha: float | None = None  # default: the rank (scaling 1)
    lora_targets: str | None = None  # default: the backbone's own (default_targets)
    losa_lr: float = 5e-3  # the side network's zero up-projections take large steps (docs/losa.md)
    batch_size: int = 64
    merge_kinds: tuple[str, ...] = ("full",)  # which experts the merge table merges
    merge_methods: tuple[str, ...] | None = None  # labels from METHOD_ORDER; None: all of them
    # Also fine-tune each domain's backbone under its linear probe's frozen head ("frozen-head"
    # experts, the way Task Arithmetic's experts are made): they merge better (docs/merging.md).
    frozen_head_experts: bool = False
    # And frozen-head experts fine-tuned at this smaller step ("frozen-head-small-lr"): they stay
    # closer to the base and merge better still (docs/merging.md). None: not trained.
    small_lr: float | None = None
    domains: tuple[str, ...] = tuple(DIGIT_DOMAINS)
    # A small SAGE-reID run (two re-ID source experts adapted to reid/a; docs/sage.md).
    reid: bool = True
    # A small cross-modal transfer (RGB source of sensor k1 -> k2 depth; docs/cross_modal.md).
    cross_modal: bool = True


FULL = DemoSettings()
# Sized for a short tour, under 5 minutes on 2 cores from an empty cache with data generation
# (benchmarks/results/demo_quick.md): the base is the one shipped with lorex (lorex.pretrained).
QUICK = DemoSettings(
    pretrain_epochs=5,
    pretrain_augment=False,
    expert_samples=2000,
    expert_epochs=5,
    linear_epochs=30,
    merge_methods=QUICK_MERGES,
)
