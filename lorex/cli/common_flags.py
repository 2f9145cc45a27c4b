"""Flags that several commands share, each defined once here."""

from __future__ import annotations

import argparse

from lorex.cli.parsing import positive_int, seed
from lorex.errors import LorexError
from lorex.training.checkpoint import CheckpointOptions, work_directory


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """``--device``; ``lorex.cli.app.main`` turns it into a ``torch.device`` before the command
    runs (under torchrun, this process's own GPU)."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def add_seed_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--seed", type=seed, default=0, help=help)


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=100,
        help="save the whole training state under OUT.parts/ every N optimiser steps (100)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint under OUT.parts/ left by a stopped run; the result "
        "is bit-identical to an uninterrupted run on the CPU",
    )
    p.add_argument(
        "--no-checkpoint", action="store_true", help="do not write checkpoints (no resume)"
    )


def checkpoint_options(args: argparse.Namespace, out: str) -> CheckpointOptions | None:
    if args.no_checkpoint:
        if args.resume:
            raise LorexError("--resume and --no-checkpoint exclude each other")
        return None
    return CheckpointOptions(work_directory(out), args.checkpoint_every, args.resume)
