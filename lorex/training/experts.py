"""``lorex train-experts``: one expert per source from one base, spread over torchrun's ranks.

Each expert is an ordinary single-process ``train`` run: rank r trains sources r, r + N, ...
with the same seed and settings it would use alone, so the experts equal those trained one by
one (on the same thread count). Without torchrun the sources run one after another.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorex.errors import LorexError
from lorex.io import read_json, write_json
from lorex.training import distributed
from lorex.training.checkpoint import CheckpointOptions, work_directory
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import train_expert
from lorex.training.methods import TrainingMethod
from lorex.version import __version__

log = logging.getLogger("lorex")


def expert_names(sources: Sequence[str]) -> list[str]:
    """``digits/mnist`` -> ``mnist``, a folder -> its name; they must differ."""
    names = [Path(str(s).rstrip("/")).name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise LorexError(f"--sources: two sources are both named '{name}'")
    return names


def train_experts(
    base: str | Path,
    sources: Sequence[str],
    method: TrainingMethod,
    out: str | Path,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    checkpoint_every: int | None = 100,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``OUT/NAME`` for every source and write ``OUT/experts.json`` (rank 0, at the end)."""
    out = Path(out)
    names = expert_names(sources)
    world = distributed.group()
    mine = list(range(world.rank, len(sources), world.size))
    if world.distributed and len(sources) < world.size:
        log.warning("%d sources on %d processes: some ranks idle", len(sources), world.size)
    for i in mine:
        target = out / names[i]
        ckpt = None
        if checkpoint_every is not None:
            ckpt = CheckpointOptions(work_directory(target), checkpoint_every, resume)
        with distributed.solo():
            train_expert(
                base,
                sources[i],
                copy.deepcopy(method),
                target,
                cfg,
                device,
                progress,
                checkpoint=ckpt,
            )
    distributed.barrier()
    experts = {}
    for name, source in zip(names, sources, strict=True):
        metrics = read_json(out / name / "metrics.json")
        experts[name] = {"source": str(source), "accuracy": metrics["accuracy"]}
    summary = {
        "base": str(base),
        "method": method.name,
        "config": cfg.to_dict(),
        "processes": world.size,
        "experts": experts,
        "lorex_version": __version__,
    }
    if world.main:
        write_json(out / "experts.json", summary)
    return summary
