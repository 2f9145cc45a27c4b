"""Stamps: a model directory records the settings that made it, so a rerun can reuse it.

A stage (a pipeline step that writes one model directory) writes ``stage.json`` last, after
its model is in place. A later run with the same settings finds the same record there and
skips the stage; a killed run leaves no record, so the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lorex.io import read_json
from lorex.models.store import is_model_dir

STAGE_FILE = "stage.json"


def stamp(**settings: Any) -> str:
    """A hash of ``settings`` (JSON, sorted keys): equal settings give equal stamps."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def stage_record(path: Path) -> dict[str, Any] | None:
    """What a finished stage in ``path`` recorded about how it was made; None when ``path`` is
    not a model directory with such a record (never made, or stopped before the end)."""
    record = Path(path) / STAGE_FILE
    if not (is_model_dir(path) and record.is_file()):
        return None
    return read_json(record)


def reusable(path: Path, value: str) -> bool:
    """``path`` holds a finished stage whose record carries the stamp ``value``."""
    record = stage_record(path)
    return record is not None and record.get("stamp") == value
