"""The flags generated from config dataclasses: every field says what it is, every flag shows it,
every subcommand's --help renders, and a flag left out leaves the config's own default."""

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from lorex.adaptation.cross_modal import CrossModalConfig
from lorex.adaptation.sage import SageConfig
from lorex.cli import build_parser, main
from lorex.cli.config_flags import add_config_flags, config_from_args, flag_specs
from lorex.cli.merge import MERGE_FLAG_METADATA
from lorex.merging import MERGE_METHODS
from lorex.training.methods import TRAINING_METHODS

METHOD_CONFIGS = [m.Config for m in TRAINING_METHODS.values() if m.Config is not None]
MERGE_OPTIONS = [m.Options for m in MERGE_METHODS.values()]
#: Each subcommand whose flags are generated, with the configs they come from.
GENERATED = {
    ("train",): METHOD_CONFIGS,
    ("train-experts",): METHOD_CONFIGS,
    ("adapt", "reid"): [SageConfig],
    ("adapt", "classify"): [SageConfig],
    ("adapt", "cross-modal"): [CrossModalConfig],
    ("merge",): MERGE_OPTIONS,
}
# The merge options get their help on another branch (issue 25); until then only their flags
# are checked. Once any merge field has help, every field of every config must.
MERGE_HELP_LANDED = any(
    f.metadata.get("help") for cls in MERGE_OPTIONS for f in dataclasses.fields(cls)
)
CONFIGS = [*METHOD_CONFIGS, SageConfig, CrossModalConfig]
CONFIGS += [cls for cls in MERGE_OPTIONS if MERGE_HELP_LANDED]


def _leaves(parser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*path, name))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_carries_its_help(config):
    missing = [f.name for f in dataclasses.fields(config) if not f.metadata.get("help")]
    assert not missing, f"{config.__name__}: fields without metadata['help']: {missing}"


def test_generated_flags_show_their_fields_help():
    leaves = dict(_leaves(build_parser()))
    for path, configs in GENERATED.items():
        actions = {a.dest: a for a in leaves[path]._actions}
        for config in configs:
            for spec in flag_specs(config, MERGE_FLAG_METADATA if path == ("merge",) else None):
                action = actions[spec.dest]
                assert action.help, f"lorex {' '.join(path)} {spec.flag}: no help"
                assert spec.meta.get("help", "").replace("%", "%%") in action.help, spec.flag


def test_every_subcommand_renders_its_help(capsys):
    for path, parser in _leaves(build_parser()):
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: lorex {' '.join(path)}"), path
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in out, (path, flag)


def test_flags_left_out_keep_the_configs_defaults():
    """A generated flag defaults to "not given": the dataclass's default is the only one."""
    parser = build_parser()
    base = ["--sources", "a", "b", "--target", "t", "--out", "o"]
    assert config_from_args(SageConfig, parser.parse_args(["adapt", "reid", *base])) == SageConfig()
    args = parser.parse_args(["adapt", "reid", *base, "--rank", "4", "--no-gate-camera"])
    assert config_from_args(SageConfig, args) == SageConfig(rank=4, gate_camera=False)
    argv = ["adapt", "cross-modal", "--source", "s", "--target", "t", "--ti", "x", "--out", "o"]
    assert config_from_args(CrossModalConfig, parser.parse_args(argv)) == CrossModalConfig()


def test_a_new_field_becomes_a_flag_from_its_type_and_metadata():
    @dataclass
    class Config:
        width: int = field(default=4, metadata={"help": "how wide", "check": "positive"})
        pool: str = field(default="avg", metadata={"help": "how", "choices": ("avg", "max")})
        layers: list[int] = field(default_factory=list, metadata={"help": "which"})
        on: bool = field(default=True, metadata={"help": "whether"})
        hidden: int = field(default=1, metadata={"cli": False})

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Config)
    args = parser.parse_args(["--width", "2", "--layers", "0", "3", "--no-on"])
    assert config_from_args(Config, args) == Config(width=2, layers=[0, 3], on=False)
    assert "--hidden" not in parser.format_help() and "how wide (4)" in parser.format_help()
    for bad in (["--width", "0"], ["--pool", "sum"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
