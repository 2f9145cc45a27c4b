"""The bases shipped as package data: found for exactly their recipe, installed whole, and
reproduced bit for bit by the command each recipe.json names (slow)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorex.experiments import sage_bench
from lorex.experiments.settings import FULL, QUICK
from lorex.experiments.stages import SHIPPED_BASE, base_recipe
from lorex.io import _sort_metadata, save_tensors, tensors_bytes
from lorex.models import load_model
from lorex.models.store import file_sha256
from lorex.pretrained import ROOT, find_shipped, install_shipped, recipe_of, shipped_names

REPO = Path(__file__).resolve().parents[1]


def test_each_shipped_base_is_whole_and_matches_its_recorded_hash():
    assert shipped_names() == ["chars-vit-micro", "people-vit-micro"]
    for name in shipped_names():
        recipe = recipe_of(name)
        assert file_sha256(ROOT / name / "model.safetensors") == recipe["sha256"]
        assert recipe["command"].startswith(("lorex pretrain ", "lorex train "))
        load_model(ROOT / name)  # a complete model directory


def test_only_the_quick_seed_0_settings_use_the_shipped_chars_base():
    assert find_shipped(SHIPPED_BASE, base_recipe(QUICK, 0)) == ROOT / SHIPPED_BASE
    assert find_shipped(SHIPPED_BASE, base_recipe(QUICK, 1)) is None
    assert find_shipped(SHIPPED_BASE, base_recipe(FULL, 0)) is None
    assert find_shipped("no-such-base", base_recipe(QUICK, 0)) is None


def test_the_people_base_needs_the_shipped_chars_base_and_its_own_settings(tmp_path):
    chars = ROOT / SHIPPED_BASE
    cfg = sage_bench.people_config(sage_bench.DEMO, 0)
    found = find_shipped(sage_bench.SHIPPED_PEOPLE_BASE, sage_bench.people_recipe(cfg, chars))
    assert found == ROOT / sage_bench.SHIPPED_PEOPLE_BASE
    other = sage_bench.people_config(sage_bench.DEMO, 1)
    assert (
        find_shipped(sage_bench.SHIPPED_PEOPLE_BASE, sage_bench.people_recipe(other, chars)) is None
    )
    # Another chars base (one changed weight) is another recipe.
    changed = tmp_path / "chars"
    install_shipped(chars, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["backbone.cls_token"] = tensors["backbone.cls_token"] + 1
    save_tensors(changed / "model.safetensors", tensors)
    recipe = sage_bench.people_recipe(cfg, changed)
    assert find_shipped(sage_bench.SHIPPED_PEOPLE_BASE, recipe) is None


def test_install_copies_the_model_but_not_the_recipe(tmp_path):
    target = tmp_path / "base"
    install_shipped(ROOT / SHIPPED_BASE, target)
    assert not (target / "recipe.json").exists()
    assert (target / "model.safetensors").read_bytes() == (
        ROOT / SHIPPED_BASE / "model.safetensors"
    ).read_bytes()
    shipped, copied = load_model(ROOT / SHIPPED_BASE), load_model(target)
    for (name, a), (_, b) in zip(
        shipped.state_dict().items(), copied.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 : 8 + int.from_bytes(raw[:8], "little")]


def test_safetensors_metadata_is_written_in_one_order(tmp_path):
    """safetensors writes metadata from a hash map (its order changes per process): lorex sorts
    it, so the same weights always give the same bytes."""
    data = torch.arange(2, dtype=torch.float32).numpy().tobytes()
    header = json.dumps(
        {
            "__metadata__": {"zeta": "1", "alpha": "2", "mid": "3"},
            "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    _sort_metadata(str(path))
    meta = json.loads(_header(path))["__metadata__"]
    assert list(meta) == ["alpha", "mid", "zeta"]
    assert torch.equal(load_file(path)["t"], torch.arange(2, dtype=torch.float32))
    assert len(path.read_bytes()) == 8 + len(header) + len(data)
    # And through save_tensors, whatever order the caller gives.
    save_tensors(tmp_path / "s.safetensors", {"t": torch.ones(3)}, {"b": "1", "a": "2", "c": "3"})
    assert list(json.loads(_header(tmp_path / "s.safetensors"))["__metadata__"]) == ["a", "b", "c"]
    # And as bytes (a file written inside an atomic directory): the same bytes as the file.
    data = tensors_bytes({"t": torch.ones(3)}, {"c": "3", "a": "2", "b": "1"})
    assert data == (tmp_path / "s.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chars-vit-micro", "people-vit-micro"])
def test_the_recorded_command_reproduces_the_shipped_base_bit_for_bit(name, tmp_path):
    recipe = recipe_of(name)
    args = shlex.split(recipe["command"])
    assert args[0] == "lorex"
    args[args.index("--out") + 1] = str(tmp_path / name)
    subprocess.run([sys.executable, "-m", "lorex", *args[1:]], cwd=REPO, check=True)
    made = tmp_path / name / "model.safetensors"
    assert file_sha256(made) == recipe["sha256"]
    shipped = load_file(ROOT / name / "model.safetensors")
    again = load_file(made)
    assert shipped.keys() == again.keys()
    for key, value in shipped.items():
        assert torch.equal(value, again[key]), key


def test_a_finished_demo_stage_is_kept_in_the_cache_for_another_run(tmp_path, monkeypatch):
    """Another output folder with the same stage settings copies the cached stage instead of
    training it; an edit of lorex's code (another fingerprint) trains it again."""
    from lorex.experiments import stages

    made = []

    def make(out):
        def run():
            made.append(out)
            install_shipped(ROOT / SHIPPED_BASE, out)

        return run

    stamp = {"stage": "train", "domain": "x", "method": "full"}
    first, second, third = tmp_path / "a" / "m", tmp_path / "b" / "m", tmp_path / "c" / "m"
    timings: dict[str, float] = {}
    stages.cached_stage(first, stamp, make(first), "stage", timings)
    stages.cached_stage(second, stamp, make(second), "stage", timings)
    assert made == [first] and timings["stage"] == 0.0
    assert json.loads((second / "stage.json").read_text()) == stamp
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    stages.cached_stage(third, {**stamp, "method": "lora"}, make(third), "stage", timings)
    assert made == [first, third]  # other settings: trained
    monkeypatch.setattr(stages, "code_fingerprint", lambda: "edited-code")
    fourth = tmp_path / "d" / "m"
    stages.cached_stage(fourth, stamp, make(fourth), "stage", timings)
    assert made == [first, third, fourth]  # same settings, other code: trained
