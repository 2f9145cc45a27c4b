"""Which tensors of a checkpoint sit inside its repeated blocks, found from the key structure.

Block-wise methods (DOGE, WUDI) optimise the weight matrices of a network's repeated blocks.
Families name the block list differently: ``blocks.N.`` (lorex, timm), ``layers.N.`` /
``layer.N.`` (Hugging Face), ``h.N.`` (GPT-2, GPT-J, BLOOM, Falcon), ``resblocks.N.``
(open_clip), ``block.N.`` (T5). A list of names misses the next family and silently changes the
merge, so the blocks are found from structure instead: a *stack* is a numbered prefix ``P.N.``
under which at least two indices hold the same set of sub-module paths. A block is a module of
modules, so only suffixes with a dot count: an ``nn.Sequential`` of plain layers (``0.weight``,
``2.weight``) is not a stack. Once a prefix is a stack, every index under it is a block (T5's
first block carries one extra tensor and still counts).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable

from lorex.errors import LorexError

_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def find_block_stacks(keys: Iterable[str]) -> list[str]:
    """The prefixes ``P.`` (``P.N.`` is one block) of every stack among ``keys``, sorted."""
    suffixes: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for key in keys:
        for match in _INDEX.finditer(key):
            rest = key[match.end() :]
            if "." in rest:
                suffixes[key[: match.start(1)]][match.group(1)].add(rest)
    stacks = []
    for prefix, by_index in suffixes.items():
        shapes = Counter(frozenset(names) for names in by_index.values())
        if shapes.most_common(1)[0][1] >= 2:
            stacks.append(prefix)
    return sorted(stacks)


class BlockMatcher:
    """Whether a key lies inside a block: of a stack found in ``keys``, or matching ``pattern``
    (a regular expression searched in the key, ``--blocks``) when one is given."""

    def __init__(self, keys: Iterable[str], pattern: str | None = None):
        self.pattern = pattern
        if pattern is not None:
            self.stacks: list[str] = []
            self._regex = compile_blocks(pattern)
        else:
            self.stacks = find_block_stacks(keys)
            alternatives = "|".join(re.escape(p) for p in self.stacks)
            self._regex = re.compile(rf"^(?:{alternatives})\d+\.") if self.stacks else None

    def __contains__(self, key: str) -> bool:
        return self._regex is not None and self._regex.search(key) is not None

    def describe(self) -> str:
        """What was looked for, for records and errors."""
        if self.pattern is not None:
            return f"keys matching --blocks {self.pattern!r}"
        if not self.stacks:
            return "repeated, numbered blocks (none found; --blocks REGEX names them)"
        return "blocks " + ", ".join(f"{p}N" for p in self.stacks)


def compile_blocks(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise LorexError(f"blocks: {pattern!r} is not a regular expression ({err})") from None
