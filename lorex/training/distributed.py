"""Data parallelism on ``torch.distributed``: one process per device, launched by ``torchrun``.

Why this shape: every rank holds the whole (uint8) dataset and draws the same global data order
from the same seed, then takes its own slice of each *global* batch. ``--batch-size`` is thus
the global batch at any number of processes, the per-rank losses are scaled so that DDP's
gradient average equals the single-process mean, and the weights stay identical on every rank
(within float tolerance of a single process). Only rank 0 writes files and logs.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op and a
run is the plain single-process run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lorex.errors import LorexError

log = logging.getLogger("lorex")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> World:
    """Join the process group ``torchrun`` describes (gloo on the CPU, nccl on CUDA), once."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":  # nccl's collectives and barriers use the current device
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if not current().main:  # only rank 0 logs
            logging.getLogger("lorex").setLevel(logging.WARNING)
    return current()


_solo = False


def current() -> World:
    """This process's place in the group; a single process inside ``solo()``."""
    if not _solo and dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def group() -> World:
    """The whole group, even inside ``solo()`` (who does which independent job)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Run independent single-process work on each rank (one expert per rank): no gradient or
    data is shared, and each rank writes its own outputs."""
    global _solo
    previous, _solo = _solo, True
    try:
        yield
    finally:
        _solo = previous


def local_device(device: torch.device) -> torch.device:
    """On CUDA each rank takes its own GPU (``LOCAL_RANK``); on the CPU the device is shared."""
    if device.type == "cuda" and launched_by_torchrun() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_slice(n: int, world: World) -> slice:
    """Rank ``world.rank``'s contiguous part of ``n`` items (sizes differ by at most one)."""
    start = n * world.rank // world.size
    return slice(start, n * (world.rank + 1) // world.size)


def shard_groups(batch: np.ndarray, group: int, world: World) -> tuple[np.ndarray, slice]:
    """Rank's part of a P x K batch and where it sits: whole identities (groups of K), so that
    triplets stay within a rank; P need not split evenly, but every rank needs two (a triplet
    needs a negative)."""
    p = len(batch) // group
    if world.distributed and p < 2 * world.size:
        raise LorexError(
            f"--batch-size: {p} identities per batch cannot give {world.size} processes two each"
        )
    ids = shard_slice(p, world)
    rows = slice(ids.start * group, ids.stop * group)
    return batch[rows], rows


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The sum over ranks of a few numbers (per-epoch loss sums, counts) for logging."""
    world = current()
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's ``shard_slice`` rows, concatenated in rank order on every rank."""
    world = current()
    if not world.distributed:
        return local
    sizes = [shard_slice(n, World(r, world.size)) for r in range(world.size)]
    width = max(s.stop - s.start for s in sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: s.stop - s.start] for p, s in zip(parts, sizes, strict=True)])


_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


def broadcast_array(array: np.ndarray | None, device: torch.device) -> np.ndarray:
    """Rank 0's array (float32/64, int32/64; up to 6 dimensions) on every rank; the other ranks
    pass ``None``. Sent as a shape header and raw numbers, never pickled."""
    world = current()
    if not world.distributed:
        assert array is not None
        return array
    header = torch.zeros(8, dtype=torch.int64, device=device)
    if world.main:
        data = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        header[0], header[1] = _DTYPES.index(data.dtype), data.ndim
        header[2 : 2 + data.ndim] = torch.tensor(data.shape)
    dist.broadcast(header, src=0)
    if not world.main:
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        data = torch.empty(tuple(header[2 : 2 + ndim].tolist()), dtype=dtype, device=device)
    dist.broadcast(data, src=0)
    return data.cpu().numpy()


def leave() -> None:
    """Leave the process group (at the end of a command), if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()
