"""Settings of a gated mixture of LoRA experts (SAGE-reID stages 3-5), and their JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.errors import LorexError

#: ``published``: SAGE's gate, one vector over all tokens x output channels per layer.
#: ``light``: the same score pooled over tokens, one vector over output channels per layer.
GATE_KINDS = ("published", "light")


@dataclass
class GateConfig:
    """K LoRA experts of rank ``r`` on the layers ``target_modules``, mixed per sample by a gate.

    ``tokens`` is the sequence length the published gate's vectors are sized for (SAGE
    hard-codes 129); the light gate does not need it. ``eps`` guards the per-token norm.
    """

    experts: list[str]
    r: int
    scaling: float
    target_modules: list[str] = field(default_factory=list)
    kind: str = "light"
    tokens: int | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not isinstance(self.experts, list) or len(self.experts) < 2:
            raise LorexError(f"gate: needs at least 2 experts, got {self.experts!r}")
        if len(set(self.experts)) != len(self.experts):
            raise LorexError(f"gate: expert names must differ, got {self.experts}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise LorexError(f"gate: rank r must be a whole number >= 1, got {self.r!r}")
        if not isinstance(self.scaling, int | float) or not self.scaling > 0:
            raise LorexError(f"gate: scaling must be positive, got {self.scaling!r}")
        if self.kind not in GATE_KINDS:
            raise LorexError(
                f"gate: kind must be one of {', '.join(GATE_KINDS)}, got {self.kind!r}"
            )
        if self.kind == "published" and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise LorexError("gate: the published gate needs the token count ('tokens')")
        if not self.eps > 0:
            raise LorexError(f"gate: eps must be positive, got {self.eps!r}")

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_description(cls, data: Any, source: str = "config.json") -> GateConfig:
        if not isinstance(data, dict):
            raise LorexError(f"{source}: field 'gate' must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise LorexError(f"{source}: unknown gate field '{unknown[0]}'")
        missing = [k for k in ("experts", "r", "scaling", "target_modules") if k not in data]
        if missing:
            raise LorexError(f"{source}: gate field '{missing[0]}' is missing")
        try:
            return cls(**data)
        except LorexError as exc:
            raise LorexError(f"{source}: {exc}") from None
