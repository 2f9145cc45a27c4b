"""Safe, atomic file I/O: safetensors and JSON only, never pickle.

Outputs are built beside their target and renamed into place, so a killed run never leaves a
half-written file or model directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorex.errors import LorexError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions instead.
_UMASK = _current_umask()


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LorexError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorexError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LorexError(f"{path}: expected a JSON object at the top level")
    return data


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file in the same directory, fsync, rename)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(Path(path), text.encode("utf-8"))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; fsync and rename it into place on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with _atomic_file(path) as tmp:
        Path(tmp).write_bytes(payload)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """Save tensors as safetensors atomically; shared or non-contiguous storage is copied."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with _atomic_file(Path(path)) as tmp:
        save_file(clean, tmp, metadata=metadata)


def check_tensors_match(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Same keys and shapes as ``expected``, or a LorexError naming the first offending tensor."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise LorexError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise LorexError(f"{source}: unexpected tensor '{unexpected[0]}'")
    for k, v in given.items():
        if v.shape != expected[k].shape:
            raise LorexError(
                f"{source}: tensor '{k}' has shape {tuple(v.shape)}, expected "
                f"{tuple(expected[k].shape)}"
            )


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is a one-line LorexError."""
    path = Path(path)
    if not path.is_file():
        raise LorexError(f"{path}: file not found")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorexError(f"{path}: not a valid safetensors file ({msg})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LorexError(f"{path}: tensor '{name}' contains NaN or Inf")
    return tensors


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place on success.

    On failure the temporary directory is removed and an existing ``target`` is left untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LorexError(f"{target}: exists and is not a directory")
    if target.exists() and not overwrite:
        raise LorexError(f"{target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
