"""Resumable training: one atomic checkpoint file that holds everything a loop needs to go on.

A run killed at any moment (SIGKILL included) and resumed with ``--resume`` ends with the same
weights, bit for bit, as a run that was never stopped, on the CPU. For that the checkpoint holds
the model state, the optimiser and scheduler, every random number generator (torch's global one,
CUDA's, NumPy's, Python's and the loop's own ``torch.Generator`` objects) and the loop's position,
including the data order of the current epoch. It is one safetensors file: tensors as tensors,
everything else as JSON in its metadata. It is written to a temporary file, fsynced and renamed,
so a kill during a write leaves the previous checkpoint whole. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from lorex.errors import LorexError
from lorex.io import save_tensors
from lorex.training import distributed

log = logging.getLogger("lorex")

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = 1


@dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often a loop checkpoints. ``directory=None`` turns checkpoints off."""

    directory: Path | None = None
    every: int = 100  # optimiser steps between checkpoints
    resume: bool = False

    def __post_init__(self) -> None:
        if self.every < 1:
            raise LorexError(f"--checkpoint-every: must be at least 1, got {self.every}")

    def sub(self, name: str) -> CheckpointOptions:
        """The options for one stage of a multi-stage run (its own file in a sub-directory)."""
        if self.directory is None:
            return self
        return CheckpointOptions(self.directory / name, self.every, self.resume)

    def at(self, directory: Path) -> CheckpointOptions:
        """The same options with checkpoints in ``directory`` (a pipeline's work directory)."""
        return CheckpointOptions(directory, self.every, self.resume)


def work_directory(out: str | Path) -> Path:
    """Where a run keeps its checkpoint: ``OUT.parts/`` beside the output, never inside it
    (the output appears only when it is complete)."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


# ---------------------------------------------------------------- random number generators


def _global_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, meta


def _set_global_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().view(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------- optimiser and scheduler


def _optimizer_state(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}/{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    prefix: str,
) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split("/", 1)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in meta["plain"].items():
        per_param.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    for saved, current in zip(groups, optimizer.param_groups, strict=True):
        for name, value in current.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(name), list):
                saved[name] = tuple(saved[name])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Save and restore one training loop's state.

    ``fingerprint`` is what must not change between the first run and its resumption (settings,
    data, starting weights); resuming a checkpoint made with another fingerprint is refused.
    ``generators`` are the loop's own ``torch.Generator`` objects, by name; ``optimizer`` may be
    several, by name (a GAN's two).
    """

    def __init__(
        self,
        options: CheckpointOptions | None,
        fingerprint: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer],
        scheduler: Any = None,
        generators: dict[str, torch.Generator] | None = None,
    ):
        self.options = options or CheckpointOptions()
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.model = model
        self.optimizers = optimizer if isinstance(optimizer, dict) else {"main": optimizer}
        self.scheduler = scheduler
        self.generators = generators or {}

    @property
    def path(self) -> Path | None:
        d = self.options.directory
        return None if d is None else d / CHECKPOINT_FILE

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.options.every == 0

    def save(
        self, step: int, position: dict[str, Any], arrays: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the checkpoint for the state after optimiser step ``step`` (atomically; under
        torchrun rank 0 writes, the state being the same on every rank)."""
        if self.path is None or not distributed.current().main:
            return
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        optim_meta = {}
        for name, optimizer in self.optimizers.items():
            optim_tensors, optim_meta[name] = _optimizer_state(optimizer, f"optim/{name}/")
            tensors.update(optim_tensors)
        rng_tensors, rng_meta = _global_rng_state()
        tensors.update(rng_tensors)
        for name, generator in self.generators.items():
            tensors[f"generator/{name}"] = generator.get_state()
        for name, array in (arrays or {}).items():
            tensors[f"array/{name}"] = torch.as_tensor(array)
        meta = {
            "format": FORMAT,
            "step": step,
            "fingerprint": self.fingerprint,
            "position": position,
            "optimizer": optim_meta,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_meta,
        }
        save_tensors(self.path, tensors, metadata={"lorex_checkpoint": json.dumps(meta)})

    def restore(
        self, before_load: Callable[[dict[str, Any], dict[str, torch.Tensor]], None] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]] | None:
        """With ``resume`` and a checkpoint on disk: load it into the model, optimiser, scheduler
        and generators and return ``(step, position, arrays)``; otherwise ``None``.

        ``before_load(position, arrays)`` runs before the model state is loaded, for a loop whose
        model changes shape as it trains (a classifier rebuilt for each clustering)."""
        path = self.path
        if path is None or not path.exists():
            if self.options.resume:
                log.info("--resume: no checkpoint at %s, starting from the beginning", path)
            return None
        if not self.options.resume:
            log.warning("%s: an earlier run's checkpoint; starting over (--resume continues)", path)
            return None
        tensors, meta = _read(path)
        self._check_fingerprint(meta, path)
        arrays = {k[len("array/") :]: v for k, v in tensors.items() if k.startswith("array/")}
        if before_load is not None:
            before_load(meta["position"], arrays)
        model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            name = (missing or unexpected)[0]
            raise LorexError(f"{path}: the checkpoint does not fit the model (tensor '{name}')")
        for name, optimizer in self.optimizers.items():
            _load_optimizer_state(optimizer, tensors, meta["optimizer"][name], f"optim/{name}/")
        if self.scheduler is not None and meta["scheduler"] is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        _set_global_rng_state(tensors, meta["rng"])
        for name, generator in self.generators.items():
            generator.set_state(tensors[f"generator/{name}"])
        log.info("resumed from %s at step %d", path, meta["step"])
        return meta["step"], meta["position"], arrays

    def _check_fingerprint(self, meta: dict[str, Any], path: Path) -> None:
        saved = meta.get("fingerprint", {})
        for key in sorted(set(saved) | set(self.fingerprint)):
            if saved.get(key) != self.fingerprint.get(key):
                raise LorexError(
                    f"{path}: made with another '{key}' ({saved.get(key)!r}, now "
                    f"{self.fingerprint.get(key)!r}); use the same options, or run without "
                    "--resume to start over"
                )

    def discard(self) -> None:
        """Remove the checkpoint once the run's output is safely written (rank 0's job)."""
        if self.path is not None and distributed.current().main:
            self.path.unlink(missing_ok=True)
            remove_if_empty(self.path.parent)


def remove_if_empty(directory: Path) -> None:
    """Remove ``directory`` if empty, then its parents while they are empty and are lorex's own
    (``checkpoints/`` or an ``OUT.parts/`` work directory); never a user's folder."""
    first = True
    while directory.is_dir() and not any(directory.iterdir()):
        if not (first or directory.name == "checkpoints" or directory.name.endswith(".parts")):
            break
        directory.rmdir()
        if directory.name.endswith(".parts"):
            break
        directory, first = directory.parent, False


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get("lorex_checkpoint")
            if text is None:
                raise ValueError("a safetensors file without lorex's checkpoint header")
            meta = json.loads(text)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorexError(f"{path}: not a valid lorex checkpoint ({msg})") from None
    if meta.get("format") != FORMAT:
        raise LorexError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return tensors, meta
