"""LoRA settings, and their round trip through PEFT's ``adapter_config.json``."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.errors import LorexError
from lorex.settings_field import setting

# Every block's attention and MLP projections of the built-in (timm-named) ViT; a regex, as PEFT
# full-matches a string target, so `patch_embed.proj` is not caught by a bare "proj".
VIT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
BIAS_MODES = ("none", "all", "lora_only")
#: Fields of PEFT's ``adapter_config.json`` that lorex does not read (or reads only to refuse).
PEFT_FIELDS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "fan_in_fan_out",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "use_dora",
    "layer_replication",
    "runtime_config",
    "exclude_modules",
    "lora_bias",
    "eva_config",
    "corda_config",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "qalora_group_size",
}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def default_targets(backbone: object) -> str:
    """The same placement (attention projections and both MLP layers, every block) in the
    backbone's own module names: a backbone may say them in ``lora_targets``; else ViT's."""
    return getattr(backbone, "lora_targets", VIT_TARGETS)


#: PEFT's ``lora_alpha`` when an ``adapter_config.json`` leaves it out.
PEFT_DEFAULT_ALPHA = 8.0
#: The rank option, one definition for every command that trains LoRA updates (``--rank``).
RANK_OPTION = {"flag": "--rank", "help": "LoRA rank r of the updates"}


@dataclass
class LoraConfig:
    """PEFT's LoRA fields that lorex reads; each field's ``help`` is its command-line flag's."""

    r: int = field(default=8, metadata=RANK_OPTION)
    #: None: alpha = r (scaling 1), resolved here so every caller gets the same default.
    lora_alpha: float | None = setting(None, "scaling alpha (default: r)", flag="--alpha")
    lora_dropout: float = setting(0.0, "dropout before A")
    target_modules: str | list[str] = field(
        default_factory=lambda: VIT_TARGETS,
        metadata={
            "flag": "--targets",
            "help": "module names (suffix match) or one regex; default: every block's attention "
            "projections and MLP layers (qkv, proj, fc1, fc2 in the built-in ViT)",
        },
    )
    bias: str = setting(
        "none", "which biases train with the adapter", flag="--lora-bias", choices=BIAS_MODES
    )
    use_rslora: bool = setting(
        False, "scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r", cli=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise LorexError(f"rank: must be a whole number of at least 1, got {self.r!r}")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.r)
        if not _is_number(self.lora_alpha) or not 0 < self.lora_alpha < math.inf:
            raise LorexError(f"alpha: must be positive, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise LorexError(f"dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise LorexError(f"bias: must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise LorexError(f"use_rslora: must be true or false, got {self.use_rslora!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except (re.error, RecursionError, OverflowError) as exc:
                raise LorexError(f"targets: not a valid regex ({exc})") from None
        elif not isinstance(self.target_modules, list) or not all(
            isinstance(t, str) for t in self.target_modules
        ):
            raise LorexError(
                f"targets: a regex or a list of module names, got {self.target_modules!r}"
            )
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
        for key in sorted(set(data) - known - PEFT_FIELDS):
            # PEFT writes (and will add) fields lorex ignores; a near miss of a field lorex
            # reads, with that field absent, is a typo that would silently fall back to the
            # default, so it is an error (PEFT's own 'use_bdlora' sits beside 'use_rslora').
            close = difflib.get_close_matches(key, known - set(data), n=1, cutoff=0.8)
            if close:
                raise LorexError(f"{source}: unknown field '{key}'; did you mean '{close[0]}'?")
        if "r" not in data:
            close = difflib.get_close_matches("r", list(data), n=1)
            raise LorexError(
                f"{source}: missing field 'r'" + (f" (found '{close[0]}')" if close else "")
            )
        kwargs = {k: data[k] for k in known if k in data and data[k] is not None}
        kwargs.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)  # PEFT's, not lorex's alpha = r
        if isinstance(kwargs.get("target_modules"), list | tuple | set):
            kwargs["target_modules"] = list(kwargs["target_modules"])
        return cls(**kwargs)
