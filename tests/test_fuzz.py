"""Property-based tests: no input, however malformed, may end in anything but a LorexError.

* ``config.json`` (and a LoRA expert's ``adapter_config.json``): arbitrary bytes, arbitrary JSON,
  and valid configs with fields deleted or replaced by arbitrary JSON values. Loading succeeds or
  raises ``LorexError``; ``lorex info`` returns 0 or 2.
* The command line: argv drawn from the real subcommand and option names plus random text and
  numbers. ``main`` returns an int or exits with 0 or 2. Every path it is given is missing and
  the built-in datasets, the demo and the benches are stubbed, so nothing long ever starts.
* The re-ID file-name parser: arbitrary text parses or raises ``LorexError``; a name formatted
  from numbers parses back to them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorex.adapters import lora
from lorex.adapters.lora import LoraConfig
from lorex.backbones import build_backbone
from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.cli import build_parser, main
from lorex.data.market1501 import parse_name
from lorex.errors import LorexError
from lorex.merging.sources import ModelSource
from lorex.models import LorexModel, load_model
from lorex.models.store import OPTIONAL_FIELDS, REQUIRED_FIELDS, save_model

TINY = dict(type="vit", img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2)
try:
    import transformers

    HF_TINY = {
        "type": "hf",
        "model_type": "vit",
        "hf_config": transformers.ViTConfig(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=16,
            patch_size=8,
        ).to_dict(),
        "image_size": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
except ImportError:  # the optional extra
    HF_TINY = None
# An empty "classes" list (a fuzzed head) makes torch warn while it builds the zero-size head.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies ----------------------------------------------------------------------------------

# Numbers a config may hold, edge cases included; huge ones must be refused before any allocation.
numbers = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, 2**31, 10**9, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# A field name: a real one (so the value is checked, not just the name), or any text.
MODEL_FIELDS = sorted(REQUIRED_FIELDS | OPTIONAL_FIELDS)
VIT_FIELDS = sorted(ViTConfig.__dataclass_fields__) + ["type"]
HF_FIELDS = ["model_type", "hf_config", "image_size"]
HF_CONFIG_FIELDS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "patch_size"]
LORA_FIELDS = sorted(LoraConfig.__dataclass_fields__) + ["peft_type", "rank_pattern", "use_dora"]


_DELETE = object()


def _edits(fields: list[str]):
    """Edits of one JSON object: (field, value) sets the field, (field, _DELETE) removes it."""
    name = st.sampled_from(fields) | st.text(max_size=10)
    return st.lists(st.tuples(name, st.just(_DELETE) | json_values), min_size=1, max_size=4)


def _apply(obj: dict, edits) -> dict:
    for key, value in edits:
        if value is _DELETE:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


# --- model directories ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A full model, a LoRA expert (a delta on the full one) and, with transformers installed, a
    model with a Hugging Face ViT backbone; saved once."""
    root = tmp_path_factory.mktemp("fuzz-models")
    torch.manual_seed(0)
    base = LorexModel(VisionTransformer(ViTConfig.from_dict(TINY)), TINY)
    base.add_head("task", ["a", "b"])
    save_model(base, root / "base")
    expert = LorexModel(VisionTransformer(ViTConfig.from_dict(TINY)), TINY)
    expert.add_head("task", ["a", "b"])
    expert.load_state_dict(base.state_dict())
    lora.add_adapter(expert.backbone, LoraConfig(r=2, lora_alpha=4))
    save_model(expert, root / "lora", weights="delta", base_dir=root / "base")
    if HF_TINY is not None:  # a Hugging Face ViT backbone, saved the lorex way
        hf = LorexModel(build_backbone(HF_TINY), HF_TINY)
        hf.add_head("task", ["a", "b"])
        save_model(hf, root / "hf")
    return root


@contextlib.contextmanager
def _copy_of(models: Path, name: str):
    """A scratch copy of the saved models (a LoRA expert finds its base as ../base)."""
    with tempfile.TemporaryDirectory(dir=models) as scratch:
        for sub in dict.fromkeys(("base", "lora", name)):
            shutil.copytree(models / sub, Path(scratch) / sub)
        yield Path(scratch) / name


def _run(argv: list[str]) -> tuple[int | str | None, str]:
    """``main(argv)``'s return value or exit code, and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def _load_everything(model: Path) -> None:
    """load_model, a merge's ModelSource and ``lorex info``: each succeeds or is a LorexError."""
    for load in (load_model, lambda p: ModelSource(p).keys()):
        with contextlib.suppress(LorexError):
            load(model)
    code, err = _run(["info", str(model)])
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert code == 0 or len(err.splitlines()) == 1, err


def test_the_unedited_models_load(models):
    """The control: every fuzzed directory starts from one that loads and runs."""
    for name in ("base", "lora", "hf"):
        if (models / name).is_dir():
            model = load_model(models / name)
            assert model(torch.rand(2, 3, 16, 16)).shape == (2, 2)
            assert _run(["info", str(models / name)])[0] == 0


@FUZZ
@given(payload=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_json_any_bytes(models, payload):
    with _copy_of(models, "base") as model:
        (model / "config.json").write_bytes(payload)
        _load_everything(model)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(MODEL_FIELDS) | st.text(max_size=8), json_values))
def test_config_json_any_object(models, config):
    with _copy_of(models, "base") as model:
        (model / "config.json").write_text(json.dumps(config))
        _load_everything(model)


@FUZZ
@given(
    which=st.sampled_from(["base", "lora"] + (["hf"] if HF_TINY else [])),
    top=_edits(MODEL_FIELDS) | st.just([]),
    backbone=_edits(VIT_FIELDS + HF_FIELDS) | st.just([]),
    hf_config=_edits(HF_CONFIG_FIELDS) | st.just([]),
    head=_edits(["task", "classes", "kind"]) | st.just([]),
    adapter=_edits(["name", "path", "state", "weight", "sha256", "config"]) | st.just([]),
)
def test_config_json_edited_fields(models, which, top, backbone, hf_config, head, adapter):
    with _copy_of(models, which) as model:
        config = json.loads((model / "config.json").read_text())
        if "hf_config" in config["backbone"]:
            _apply(config["backbone"]["hf_config"], hf_config)
        _apply(config["backbone"], backbone)
        _apply(next(iter(config["heads"].values())), head)
        if "adapters" in config:
            _apply(config["adapters"][0], adapter)
        _apply(config, top)
        (model / "config.json").write_text(json.dumps(config))
        _load_everything(model)


@FUZZ
@given(
    edits=_edits(LORA_FIELDS),
    raw=st.none() | st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_adapter_config_json(models, edits, raw):
    with _copy_of(models, "lora") as model:
        path = model / "adapter" / "adapter_config.json"
        if raw is None:
            path.write_text(json.dumps(_apply(json.loads(path.read_text()), edits)))
        else:
            path.write_bytes(raw)
        _load_everything(model)
        with contextlib.suppress(LorexError):
            LoraConfig.from_peft(_apply({"r": 2}, edits))


# --- the command line ----------------------------------------------------------------------------


def _leaf_commands() -> dict[tuple[str, ...], list[argparse.Action]]:
    """Each runnable subcommand path of the real parser, with its arguments."""
    leaves = {}

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, (*prefix, name))
        if not subs:
            leaves[prefix] = [a for a in parser._actions if a.dest != "help"]

    walk(build_parser(), ())
    return leaves


LEAVES = _leaf_commands()
OPTIONS = sorted({o for actions in LEAVES.values() for a in actions for o in a.option_strings})
# Text as argv can hold it: no NUL; undecodable bytes arrive as lone surrogates (surrogateescape).
argv_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    | st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)]),
    max_size=12,
)
odd_numbers = st.sampled_from(["0", "-1", "1e309", "nan", "-inf", "", "-", "auto", "2**70"])


def _parses(action: argparse.Action, text: str) -> bool:
    if action.type in (None, str, Path):
        return False
    try:
        action.type(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    return True


def _value(action: argparse.Action, missing: Path):
    """A value for one argument: often plausible (a choice, a small number, a missing path),
    sometimes not."""
    path = st.sampled_from(["a", "b/c", "a.parts"]).map(lambda name: str(missing / name))
    if action.choices:
        plausible = st.sampled_from([str(c) for c in action.choices])
    elif _parses(action, "0.5"):
        plausible = st.floats(-2, 2).map(str) | st.integers(-3, 100).map(str)
    elif _parses(action, "1"):
        plausible = st.integers(-3, 100).map(str)
    else:
        plausible = path
    # Mostly plausible, so that most examples get past argparse into lorex's own checks.
    return st.integers(0, 9).flatmap(
        lambda n: plausible if n < 8 else st.one_of(path, argv_text, odd_numbers)
    )


def _argv(missing: Path):
    """A real subcommand, its arguments (each present or not, each value plausible or not) in any
    order, a stray token now and then; every path given is under ``missing``."""

    @st.composite
    def build(draw):
        command = draw(st.sampled_from(sorted(LEAVES)))
        argv, options = list(command), []
        for action in LEAVES[command]:
            if not action.option_strings:  # positional
                n = draw(st.integers(1, 3)) if action.nargs in ("+", "*") else 1
                argv += [draw(_value(action, missing)) for _ in range(n)]
                continue
            if not draw(st.booleans()) and not (action.required and draw(st.integers(0, 9))):
                continue
            flag = draw(st.sampled_from(action.option_strings))
            if action.nargs == 0:
                options.append([flag])
            else:
                many = action.nargs in ("+", "*")
                n = draw(st.integers(1, 3)) if many else 1
                options.append([flag, *(draw(_value(action, missing)) for _ in range(n))])
        options = draw(st.permutations(options))
        argv += [token for option in options for token in option]
        stray = st.sampled_from(OPTIONS) | argv_text | odd_numbers
        for _ in range(max(0, draw(st.integers(-4, 2)))):
            argv.insert(draw(st.integers(0, len(argv))), draw(stray))
        return argv

    return build()


def _refuse(*args, **kwargs):
    raise LorexError("stubbed out by the fuzz test")


# Whatever would start real work: built-in datasets (generated on first use), demo and benches.
STUBS = [
    "lorex.data.registry._load_builtin",
    "lorex.data.paired._load_builtin",
    "lorex.data.reid_synth.make_reid_domain",
    "lorex.experiments.demo.run_demo",
    "lorex.experiments.losa_bench.run_bench",
    "lorex.experiments.sage_bench.run_sage_bench",
    "lorex.experiments.cross_modal_bench.run_cross_modal_bench",
]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """An empty working directory with the long-running parts stubbed; cwd and env restored."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    with contextlib.ExitStack() as stack:
        for target in STUBS:
            stack.enter_context(mock.patch(target, _refuse))
        os.chdir(root)
        try:
            # Run every command once now, so no example pays for its imports against the deadline.
            for command, actions in LEAVES.items():
                required = [a for a in actions if a.required or not a.option_strings]
                argv = list(command)
                for a in required:
                    value = str(a.choices[0]) if a.choices else str(root / "missing" / "a")
                    argv += [*a.option_strings[:1], value]
                _run(argv)
            yield root
        finally:
            os.chdir(old_cwd)
            os.environ.clear()
            os.environ.update(old_env)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_cli_never_crashes(sandbox, data):
    argv = data.draw(_argv(sandbox / "missing"), label="argv")
    env = dict(os.environ)
    try:
        code, err = _run(argv)
    finally:
        os.environ.clear()
        os.environ.update(env)  # --cache-dir sets LOREX_CACHE_DIR for the process
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert not list(sandbox.iterdir())  # nothing written, not even a temporary entry


# --- re-ID file names ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=300, deadline=None)
@given(
    name=st.text(max_size=40)
    | st.from_regex(r"\A-?\d{1,12}_c\d{1,4}(s\d_\d{1,7}_\d{2})?(\.[a-z]{3})?\Z")
    | st.integers(0, 10**5).map(lambda n: "9" * n + "_c1s1.jpg")
)
def test_reid_name_parser_any_text(name):
    try:
        pid, cam = parse_name(Path(name))
    except LorexError:
        return
    assert isinstance(pid, int) and isinstance(cam, int) and pid >= -1 and cam >= 0


@settings(FUZZ, max_examples=200)
@given(
    pid=st.integers(-1, 10**8),
    cam=st.integers(0, 999),
    seq=st.integers(1, 9),
    frame=st.integers(0, 10**7 - 1),
    box=st.integers(0, 99),
    style=st.sampled_from(["market", "duke", "lorex"]),
    suffix=st.sampled_from([".jpg", ".png", ".JPG", ".jpeg"]),
)
def test_reid_name_round_trip(pid, cam, seq, frame, box, style, suffix):
    person = "-1" if pid < 0 else f"{pid:04d}"
    stem = {
        "market": f"{person}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}",  # 0002_c1s1_000451_03
        "duke": f"{person}_c{cam + 1}_f{frame:07d}",  # 0001_c2_f0046182
        "lorex": f"{person}_c{cam + 1}s1_{frame:06d}_00",  # write_market1501's names
    }[style]
    assert parse_name(Path("some/folder") / (stem + suffix)) == (pid, cam)
