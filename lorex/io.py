"""Safe, atomic file I/O: safetensors and JSON only, never pickle.

Outputs are built beside their target and renamed into place, so a killed run never leaves a
half-written file or model directory that looks complete. A temporary entry is named after its
target, host and process (``.NAME.HOST-PID-XXXX.partial`` / ``.tmp``); the next write of the same
target removes those whose process is gone, so a killed run leaves nothing behind for long.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save

from lorex.errors import LorexError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions instead.
_UMASK = _current_umask()
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _temp_prefix(target: Path) -> str:
    """``.NAME.HOST-PID-``: a temporary entry names its owner, so a later run sees it is stale."""
    return f".{target.name}.{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or cannot tell: treat as alive
        return True
    return True


def _remove_stale(target: Path, suffix: str) -> None:
    """Remove the temporaries beside ``target`` that runs on this host left when killed (their
    process is gone). A previous directory moved aside (``-old``) while the target is missing is
    put back: the run was killed between the two renames of the non-Linux fallback."""
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}\.{re.escape(_HOST)}-(\d+)-([a-z0-9_]+){re.escape(suffix)}$"
    )
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if found is None or int(found[1]) == os.getpid() or _pid_alive(int(found[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if found[2] == "old" and not target.exists():
                os.replace(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


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
    _remove_stale(path, ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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
        _sort_metadata(tmp)


def _sort_metadata(path: str) -> None:
    """Rewrite the header with ``__metadata__``'s keys sorted, in place and at the same length.

    safetensors writes the metadata from a Rust hash map, whose order changes from process to
    process: without this, two runs that train the same weights would write different bytes."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        text = _sorted_header(fh.read(size))
        if text is not None:
            fh.seek(8)
            fh.write(text)


def _sorted_header(raw: bytes) -> bytes | None:
    """The header ``raw`` with its metadata keys sorted and padded to the same length; None when
    there is nothing to sort (or it would not fit: an unsorted header is still valid)."""
    header = json.loads(raw, object_pairs_hook=dict)
    if len(header.get("__metadata__") or {}) < 2:
        return None
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (len(raw) - len(text))
    return text if len(text) == len(raw) else None


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """A safetensors file's bytes, metadata keys sorted as ``save_tensors`` writes them (for files
    written with others in one atomic directory)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = safetensors_save(clean, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    text = _sorted_header(data[8 : 8 + size])
    return data if text is None else data[:8] + text + data[8 + size :]


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

    On failure the temporary directory is removed and an existing ``target`` is left untouched;
    a SIGKILL leaves the temporary directory (clearly named ``.partial``), which the next
    ``atomic_directory`` for the same target removes. An existing target is swapped out in one
    step, so at no moment is there no ``target``.
    """
    target = Path(target)
    _remove_stale(target, ".partial")
    if target.exists() and not target.is_dir():
        raise LorexError(f"{target}: exists and is not a directory")
    if target.exists() and not overwrite:
        raise LorexError(f"{target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".partial", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    path, at = ctypes.c_char_p, ctypes.c_int
    renameat2.argtypes = (at, path, at, path, ctypes.c_uint)
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target``, replacing a previous one."""
    if not target.exists():
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the previous output
    else:  # two renames; a kill between them is undone by the next run (_remove_stale)
        old = target.with_name(f"{_temp_prefix(target)}old.partial")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, so a merge never holds the whole output.

    The header (names, dtypes, shapes, offsets) is known before any data: it is written first and
    each tensor's bytes follow in the declared order. The file is built beside ``path`` and
    renamed into place by ``close()``; ``abort()`` (or an exception inside ``with``) removes it.
    """

    def __init__(
        self,
        path: str | Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._specs = list(specs)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in self._specs:
            if dtype not in _ST_DTYPES:
                raise LorexError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            size = torch.empty((), dtype=dtype).element_size()
            for dim in shape:
                size *= dim
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self._context = _atomic_file(self.path)
        self._tmp = self._context.__enter__()
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._fh.write(len(blob).to_bytes(8, "little") + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self._specs[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"tensor {self._next} must be '{expected}' {dtype} {tuple(shape)}, got '{name}' "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous()
        self._fh.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._specs):
            self.abort()
            raise ValueError(
                f"{self.path}: only {self._next} of {len(self._specs)} tensors written"
            )
        self._fh.close()
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        self._fh.close()
        with contextlib.suppress(Exception):
            self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_ST_FROM_NAME = {name: dtype for dtype, name in _ST_DTYPES.items()}


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets; ``__metadata__``) and
    where its data starts, read without touching the data; a one-line error names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise LorexError(f"{path}: file not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise LorexError(f"{path}: not a valid safetensors file ({exc})") from None
    return header, 8 + n


class SafetensorsReader:
    """Read one tensor at a time from a safetensors file with plain reads, not a memory map.

    ``safe_open`` maps the file: every page a merge touches stays resident in this process until
    the file is closed, so reading N experts tensor by tensor still ends with N models in RSS.
    Here each tensor is read into its own buffer and freed with it. The header is checked against
    the file size, so a truncated or corrupt file is a one-line error naming it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, self._data_start = read_safetensors_header(self.path)
        size = self.path.stat().st_size
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if isinstance(info, dict) and isinstance(info.get("dtype"), str):
                if info["dtype"] not in _ST_FROM_NAME:
                    raise LorexError(
                        f"{self.path}: tensor '{name}' is {info['dtype']}, which lorex cannot "
                        "read or merge (it reads F64, F32, F16, BF16, integer and BOOL tensors; "
                        "float8 and packed quantised types must be dequantised first)"
                    )
            try:
                dtype = _ST_FROM_NAME[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = info["data_offsets"]
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
                    raise TypeError("offsets must be whole numbers")
            except (KeyError, TypeError, ValueError):
                raise LorexError(f"{self.path}: bad header entry for '{name}'") from None
            expected = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                expected *= d
            if end - begin != expected or begin < 0 or self._data_start + end > size:
                raise LorexError(f"{self.path}: tensor '{name}' does not fit the file")
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + begin)
            if fh.readinto(buffer) != len(buffer):
                raise LorexError(f"{self.path}: tensor '{name}' is truncated")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
