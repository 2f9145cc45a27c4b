"""Training methods behind one interface, looked up by name (``--method``).

A method decides which parameters train and what a trained model saves. Later methods (LoRA, LoSA)
register here with their own options, and the training loop and CLI pick them up unchanged.
"""

from __future__ import annotations

import abc
import argparse
from dataclasses import replace
from typing import Any, ClassVar

from torch import nn

from lorex.adapters.lora import (
    LoraConfig,
    adapter_configs,
    add_adapter,
    default_targets,
    mark_trainable,
)
from lorex.adapters.losa import LosaConfig, attach_losa
from lorex.data import ImageDataset
from lorex.models import LorexModel

METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    METHODS[cls.name] = cls
    return cls


class TrainingMethod(abc.ABC):
    name: ClassVar[str]
    #: The backbone does not change, so its features can be computed once and cached.
    frozen_backbone: ClassVar[bool] = False
    #: What the saved model directory holds: every tensor, or only what differs from the base.
    saves: ClassVar[str] = "full"
    #: The learning rate ``lorex train`` uses when ``--lr`` is not given.
    default_lr: ClassVar[float] = 1e-3

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own CLI options (none by default)."""
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingMethod:
        return cls()

    def options(self) -> dict[str, Any]:
        """The method's settings, recorded in the model's provenance."""
        return {}

    def fit_to_data(self, data: ImageDataset) -> None:
        """Adjust to the training data before ``prepare`` (LoSA reads the frames per clip)."""
        return None

    @abc.abstractmethod
    def prepare(self, model: LorexModel) -> None:
        """Set ``requires_grad`` (or inject modules) before training."""


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@register_method
class LinearProbe(TrainingMethod):
    """Train only the task head on frozen backbone features."""

    name = "linear"
    frozen_backbone = True
    saves = "delta"
    default_lr = 5e-3  # a single linear layer on fixed features tolerates a large step

    def prepare(self, model: LorexModel) -> None:
        model.requires_grad_(False)
        model.heads[model.active_head].requires_grad_(True)


@register_method
class FullFinetune(TrainingMethod):
    """Train every backbone parameter and the head."""

    name = "full"

    def prepare(self, model: LorexModel) -> None:
        model.requires_grad_(True)
        for key, head in model.heads.items():
            head.requires_grad_(key == model.active_head)


@register_method
class Lora(TrainingMethod):
    """Train low-rank updates of the chosen layers and the head; the backbone stays frozen."""

    name = "lora"
    saves = "delta"  # the head in model.safetensors, the adapter in PEFT's format under adapter/
    # Low-rank updates from a zero B take larger steps than full fine-tuning: on the quick demo's
    # base, 5 epochs on 3,000 images, 5e-3 beat 2e-3 on all four digit domains (docs/lora.md).
    default_lr = 5e-3

    def __init__(self, config: LoraConfig | None = None, backbone_targets: bool | None = None):
        """``backbone_targets`` (default: when no config is given) replaces the config's targets
        with the backbone's own default placement (``default_targets``) once the model is known,
        so the same command trains the built-in ViT and a Hugging Face one."""
        self.config = config or LoraConfig()
        self.backbone_targets = config is None if backbone_targets is None else backbone_targets

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("LoRA (--method lora)")
        group.add_argument("--rank", type=int, default=8, help="rank r of the updates (8)")
        group.add_argument("--alpha", type=float, default=None, help="scaling alpha (default: r)")
        group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout before A (0)")
        group.add_argument(
            "--targets",
            nargs="+",
            default=None,
            help="module names (suffix match) or one regex; default: every block's attention "
            "projections and MLP layers (qkv, proj, fc1, fc2 in the built-in ViT)",
        )
        group.add_argument(
            "--lora-bias",
            choices=("none", "all", "lora_only"),
            default="none",
            help="which biases train with the adapter (none)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingMethod:
        targets: str | list[str] | None = None
        if args.targets:
            targets = (
                args.targets[0]
                if len(args.targets) == 1 and _is_regex(args.targets[0])
                else list(args.targets)
            )
        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha if args.alpha is not None else float(args.rank),
            lora_dropout=args.lora_dropout,
            bias=args.lora_bias,
            **({"target_modules": targets} if targets else {}),
        )
        return cls(config, backbone_targets=targets is None)

    def options(self) -> dict[str, Any]:
        return self.config.to_peft()

    def prepare(self, model: LorexModel) -> None:
        if self.backbone_targets:
            self.config = replace(self.config, target_modules=default_targets(model.backbone))
        if "default" not in adapter_configs(model.backbone):
            add_adapter(model.backbone, self.config, "default")
        mark_trainable(model.backbone, "default")
        for key, head in model.heads.items():
            head.requires_grad_(key == model.active_head)


@register_method
class Losa(TrainingMethod):
    """Train a low-rank side network on the frozen backbone's block tokens, and the head.

    No gradient flows through the backbone (it runs under ``no_grad``), so training keeps none of
    its activations; with no augmentation its outputs are cached and each epoch costs only the
    side network (docs/losa.md).
    """

    name = "losa"
    frozen_backbone = True
    saves = "delta"  # the side network and the head; the backbone stays the base's
    # Like LoRA, zero-initialised up-projections take large steps (docs/losa.md).
    default_lr = 5e-3

    def __init__(self, config: LosaConfig | None = None):
        self.config = config or LosaConfig()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("LoSA (--method losa)")
        group.add_argument(
            "--rank-channel", type=int, default=16, help="rank of the channel mixing (16)"
        )
        group.add_argument("--rank-token", type=int, default=8, help="rank of the token mixing (8)")
        group.add_argument(
            "--rank-temporal",
            type=int,
            default=2,
            help="rank of the temporal mixing of clips (2; 0: none)",
        )
        group.add_argument(
            "--losa-width",
            type=int,
            default=0,
            help="width of the side stream (0: the backbone's; smaller: projected, cheaper)",
        )
        group.add_argument(
            "--losa-layers",
            type=int,
            nargs="+",
            default=None,
            help="tapped block indices, 0-based (default: every block)",
        )
        group.add_argument(
            "--losa-pool",
            choices=("backbone", "token", "avg"),
            default="backbone",
            help="pooling of the refined tokens (backbone: the backbone's own)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingMethod:
        return cls(
            LosaConfig(
                rank_channel=args.rank_channel,
                rank_token=args.rank_token,
                rank_temporal=args.rank_temporal,
                width=args.losa_width,
                layers=list(args.losa_layers or []),
                pool=args.losa_pool,
            )
        )

    def options(self) -> dict[str, Any]:
        return self.config.to_dict()

    def fit_to_data(self, data: ImageDataset) -> None:
        self.config = replace(self.config, frames=data.frames)

    def prepare(self, model: LorexModel) -> None:
        if model.side is None:
            attach_losa(model, self.config)
        model.requires_grad_(False)
        model.side.requires_grad_(True)
        model.heads[model.active_head].requires_grad_(True)


def _is_regex(text: str) -> bool:
    return any(c in text for c in "\\^$*+?[](){}|")
