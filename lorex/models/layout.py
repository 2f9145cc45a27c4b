"""The files of a model directory, its format version and the content hash that pins a base."""

from __future__ import annotations

import hashlib
from pathlib import Path

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def base_path(model_dir: Path, base: dict) -> Path:
    """Where a delta model's ``base`` entry points (stored relative to the model directory)."""
    p = Path(base["path"])
    return p if p.is_absolute() else (model_dir / p)
