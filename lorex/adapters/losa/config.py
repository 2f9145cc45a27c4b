"""LoSA settings. The paper publishes no code: every open choice is a field here (docs/losa.md)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.errors import LorexError

POOLS = ("backbone", "token", "avg")


@dataclass
class LosaConfig:
    #: Rank of the channel-mixing MLP (D -> r -> D).
    rank_channel: int = 16
    #: Rank of the token-mixing MLP over the tokens of one image or frame (N -> r -> N).
    rank_token: int = 8
    #: Rank of the temporal mixing over the frames of a clip (T -> r -> T); capped at T.
    #: 0 leaves clips without temporal mixing (the ablation in docs/losa.md).
    rank_temporal: int = 2
    #: Width of the side stream. 0 keeps the backbone's width D (the paper's reconstruction);
    #: 0 < width < D projects every tap down to ``width`` with one shared learned map and the
    #: refinement back up with another (LST-style), so each mixer moves D/width times less data.
    width: int = 0
    #: Backbone blocks whose outputs feed the side network (0-based); empty means every block.
    layers: list[int] = field(default_factory=list)
    #: How the refined last tokens become features: the backbone's own pooling ("backbone":
    #: its final norm and class token or mean), or the class token / token mean after that norm.
    pool: str = "backbone"
    #: Frames per clip (1 for images). Set from the training data; > 1 adds temporal mixing.
    frames: int = 1

    def __post_init__(self) -> None:
        for name in ("rank_channel", "rank_token", "rank_temporal", "width", "frames"):
            value = getattr(self, name)
            least = 0 if name in ("rank_temporal", "width") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise LorexError(
                    f"{name}: must be a whole number of at least {least}, got {value!r}"
                )
        if not isinstance(self.layers, list) or not all(
            isinstance(i, int) and i >= 0 for i in self.layers
        ):
            raise LorexError(f"layers: must be a list of block indices >= 0, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise LorexError(f"layers: repeated block index in {self.layers}")
        if self.pool not in POOLS:
            raise LorexError(f"pool: must be one of {', '.join(POOLS)}, got {self.pool!r}")

    def tapped(self, depth: int) -> list[int]:
        """The tapped block indices for a backbone of ``depth`` blocks, in order."""
        layers = sorted(self.layers) if self.layers else list(range(depth))
        if layers[-1] >= depth:
            raise LorexError(
                f"layers: block {layers[-1]} does not exist (the backbone has {depth})"
            )
        return layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "losa config") -> LosaConfig:
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise LorexError(f"{source}: unknown field '{key}'{hint}")
        return cls(**data)
