"""The ``lorex`` command line: ``app`` builds the parser from one module per group of
subcommands (data, train, models, merge, adapt, bench); ``config_flags`` makes their settings'
flags from the config dataclasses."""

from lorex.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
