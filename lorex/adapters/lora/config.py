"""LoRA settings, and their round trip through PEFT's ``adapter_config.json``."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.errors import LorexError

# Every block's attention and MLP projections of the built-in (timm-named) ViT; a regex, as PEFT
# full-matches a string target, so `patch_embed.proj` is not caught by a bare "proj".
VIT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
BIAS_MODES = ("none", "all", "lora_only")


def default_targets(backbone: object) -> str:
    """The same placement (attention projections and both MLP layers, every block) in the
    backbone's own module names: a backbone may say them in ``lora_targets``; else ViT's."""
    return getattr(backbone, "lora_targets", VIT_TARGETS)


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: VIT_TARGETS)
    bias: str = "none"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise LorexError(f"rank: must be a whole number of at least 1, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise LorexError(f"alpha: must be positive, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise LorexError(f"dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise LorexError(f"bias: must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise LorexError(f"targets: not a valid regex ({exc})") from None
        elif not self.target_modules:
            raise LorexError("targets: at least one target module is needed")

    @property
    def scaling(self) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), the factor in front of ``B A x``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, module_name: str) -> bool:
        """PEFT's rule: a string is a full-match regex; a list matches a name or a dotted suffix."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def to_peft(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The fields of PEFT's ``adapter_config.json`` that describe this adapter."""
        d = asdict(self)
        d["target_modules"] = (
            self.target_modules
            if isinstance(self.target_modules, str)
            else sorted(self.target_modules)
        )
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            **d,
        }

    @classmethod
    def from_peft(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        if data.get("peft_type", "LORA") != "LORA":
            raise LorexError(f"{source}: peft_type {data.get('peft_type')!r} is not LORA")
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(key):
                raise LorexError(f"{source}: '{key}' (per-module ranks) is not supported")
        if data.get("fan_in_fan_out"):
            raise LorexError(f"{source}: 'fan_in_fan_out' adapters are not supported")
        for key in ("use_dora", "lora_bias"):
            if data.get(key):
                raise LorexError(f"{source}: '{key}' is not supported by lorex's LoRA")
        known = set(cls.__dataclass_fields__)
        if "r" not in data:
            close = difflib.get_close_matches("r", list(data), n=1)
            raise LorexError(
                f"{source}: missing field 'r'" + (f" (found '{close[0]}')" if close else "")
            )
        kwargs = {k: data[k] for k in known if k in data and data[k] is not None}
        if isinstance(kwargs.get("target_modules"), list | tuple | set):
            kwargs["target_modules"] = list(kwargs["target_modules"])
        return cls(**kwargs)
