"""LoSA settings. The paper publishes no code: every open choice is a field here (docs/losa.md)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from lorex.errors import LorexError
from lorex.settings_field import setting

POOLS = ("backbone", "token", "avg")


@dataclass
class LosaConfig:
    """Each field's ``help`` is its ``lorex train --method losa`` flag's."""

    #: Channel-mixing MLP: D -> r -> D.
    rank_channel: int = setting(16, "rank of the channel mixing")
    #: Token-mixing MLP over the tokens of one image or frame: N -> r -> N.
    rank_token: int = setting(8, "rank of the token mixing")
    #: Temporal mixing over the frames of a clip (T -> r -> T), capped at T. 0 leaves clips
    #: without temporal mixing (the ablation in docs/losa.md).
    rank_temporal: int = setting(2, "rank of the temporal mixing of clips; 0: none")
    #: 0 keeps the backbone's width D (the paper's reconstruction); 0 < width < D projects every
    #: tap down to ``width`` with one shared learned map and the refinement back up with another
    #: (LST-style), so each mixer moves D/width times less data.
    width: int = setting(
        0,
        "width of the side stream; 0: the backbone's, smaller: projected, cheaper",
        flag="--losa-width",
    )
    layers: list[int] = field(
        default_factory=list,
        metadata={
            "flag": "--losa-layers",
            "help": "tapped block indices, 0-based (default: every block)",
        },
    )
    #: "backbone": the backbone's final norm and class token or mean; "token" / "avg": the class
    #: token / token mean after that norm.
    pool: str = setting(
        "backbone",
        "pooling of the refined tokens; backbone: the backbone's own",
        flag="--losa-pool",
        choices=POOLS,
    )
    #: Set from the training data, not by hand; > 1 adds temporal mixing.
    frames: int = setting(1, "frames per clip (1: images)", cli=False)

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
