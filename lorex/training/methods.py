"""Training methods behind one interface, looked up by name (``lorex train --method``).

A method decides which parameters train and what a trained model saves. A method with settings
names their dataclass (``Config``); the CLI makes its flags from that dataclass's fields, so a
new method registers here and the training loop and CLI pick it up unchanged.
"""

from __future__ import annotations

import abc
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

TRAINING_METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    TRAINING_METHODS[cls.name] = cls
    return cls


class TrainingMethod(abc.ABC):
    name: ClassVar[str]
    #: The backbone does not change, so its features can be computed once and cached.
    frozen_backbone: ClassVar[bool] = False
    #: What the saved model directory holds: every tensor, or only what differs from the base.
    saves: ClassVar[str] = "full"
    #: The learning rate ``lorex train`` uses when ``--lr`` is not given.
    default_lr: ClassVar[float] = 1e-3

    #: The dataclass of the method's settings (its fields are ``lorex train`` flags), or None.
    Config: ClassVar[type | None] = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainingMethod:
        """The method with ``settings`` (fields of ``Config``) over the config's defaults."""
        return cls() if cls.Config is None else cls(cls.Config(**settings))

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
    Config = LoraConfig
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
    def from_settings(cls, settings: dict[str, Any]) -> TrainingMethod:
        """Without ``target_modules``, the backbone's own placement; a list of one name that
        reads as a regex is that regex (PEFT full-matches a string target)."""
        targets = settings.get("target_modules")
        if isinstance(targets, list) and len(targets) == 1 and _is_regex(targets[0]):
            settings = {**settings, "target_modules": targets[0]}
        return cls(LoraConfig(**settings), backbone_targets=not targets)

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
    Config = LosaConfig
    frozen_backbone = True
    saves = "delta"  # the side network and the head; the backbone stays the base's
    # Like LoRA, zero-initialised up-projections take large steps (docs/losa.md).
    default_lr = 5e-3

    def __init__(self, config: LosaConfig | None = None):
        self.config = config or LosaConfig()

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
