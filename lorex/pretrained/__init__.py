"""Bases shipped with lorex as package data, so that ``lorex demo --quick`` and the quick benches
start from a trained model instead of spending minutes pretraining one.

Each folder is an ordinary lorex model directory plus ``recipe.json``: the settings it was trained
with (a stage reuses it only when its own settings are exactly these) and the command that
reproduces it bit for bit on the CPU (``tests/test_shipped_bases.py``, marked slow, runs it).
Only the quick settings at seed 0 are shipped; any other setting trains its own base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lorex.io import atomic_directory, read_json

ROOT = Path(__file__).parent
RECIPE = "recipe.json"


def _canonical(value: Any) -> Any:
    """JSON's view of ``value`` (tuples become lists), so a recipe compares as it is stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def shipped_names() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / RECIPE).is_file())


def recipe_of(name: str) -> dict[str, Any]:
    """``{"recipe": settings, "command": how to reproduce it, ...}`` of a shipped base."""
    return read_json(ROOT / name / RECIPE)


def find_shipped(name: str, recipe: dict[str, Any]) -> Path | None:
    """The shipped model ``name`` if it was made with exactly ``recipe``, else None."""
    path = ROOT / name
    if not (path / RECIPE).is_file():
        return None
    return path if recipe_of(name)["recipe"] == _canonical(recipe) else None


def install_shipped(source: Path, target: Path) -> None:
    """Copy the files of a shipped model (not its recipe) into ``target``, atomically."""
    with atomic_directory(target) as tmp:
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name != RECIPE:
                shutil.copy2(file, tmp / file.name)
