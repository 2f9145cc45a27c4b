"""The ``lorex`` command line. Every user error prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lorex.cli import adapt, bench, data, merge, models, train
from lorex.cli.parsing import Parser, one_line
from lorex.errors import LorexError
from lorex.training import distributed
from lorex.training.expert_jobs import resolve_device
from lorex.version import __version__

#: Each subcommand's parser, in the order ``lorex --help`` lists them.
SUBCOMMANDS = (
    data.add_data,
    train.add_pretrain,
    train.add_train,
    train.add_train_experts,
    models.add_eval,
    models.add_info,
    merge.add_merge_adapter,
    merge.add_merge,
    bench.add_bench,
    adapt.add_adapt,
    models.add_import_timm,
    bench.add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lorex", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lorex {__version__}")
    parser.add_argument(
        "--cache-dir", help="where generated datasets are cached ($LOREX_CACHE_DIR)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _prepare(args: argparse.Namespace) -> None:
    """Under ``torchrun``, join the process group for the commands that scale out (their
    parsers set ``scales_out``) and refuse the others; then parse ``--device``, once for every
    command, into this process's device. Only rank 0 writes and reports: stdout is silenced on
    the others."""
    under_torchrun = distributed.launched_by_torchrun()
    if under_torchrun and not getattr(args, "scales_out", False):
        what = f"{args.command} {getattr(args, 'what', '') or ''}".strip()
        raise LorexError(
            f"lorex {what} runs in one process; launch it without torchrun (docs/scaling.md)"
        )
    if getattr(args, "device", None) is None:  # a command that runs nothing on a device
        return
    args.device = resolve_device(args.device)
    if under_torchrun:
        args.device = distributed.local_device(args.device)
        if not distributed.init(args.device).main:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["LOREX_CACHE_DIR"] = str(args.cache_dir)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        _prepare(args)
        return args.func(args)
    except LorexError as exc:
        print(f"lorex {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorex: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorex data list | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        distributed.leave()


if __name__ == "__main__":
    sys.exit(main())
