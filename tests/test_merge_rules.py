"""Block-wise merges find the blocks of any checkpoint, every method's defaults are
scale-equivariant, and merge.json records the rule each tensor got."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.cli import main
from lorex.data.dataset import ImageDataset
from lorex.errors import LorexError
from lorex.merging import MERGE_METHODS, merge_models, method_from_name
from lorex.merging.blocks import BlockMatcher, find_block_stacks
from lorex.models import LorexModel
from lorex.models.store import save_model

TINY = dict(type="vit", img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
BLOCKWISE = ("doge", "wudi")
SCALES = (0.01, 0.1, 10.0, 100.0)  # experts base + c * tau_i


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- blocks from structure ------------------------------------------------------------------------
def _block(prefix: str, names: list[str]) -> list[str]:
    return [f"{prefix}{n}" for n in names]


GPT2_BLOCK = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight"]
FAMILIES = {
    "gpt2": ("transformer.h.", ["transformer.wte.weight", "transformer.ln_f.weight"]),
    "open_clip": ("visual.transformer.resblocks.", ["visual.proj", "visual.conv1.weight"]),
    "t5": ("encoder.block.", ["shared.weight", "encoder.final_layer_norm.weight"]),
    "timm": ("blocks.", ["patch_embed.proj.weight", "head.weight"]),
    "hf-llama": ("model.layers.", ["model.embed_tokens.weight", "lm_head.weight"]),
    "hf-bert": ("encoder.layer.", ["embeddings.word_embeddings.weight", "pooler.dense.weight"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stacks_are_found_from_structure_in_every_family(family):
    prefix, outside = FAMILIES[family]
    keys = list(outside)
    for i in range(3):
        keys += _block(f"{prefix}{i}.", GPT2_BLOCK)
    assert find_block_stacks(keys) == [prefix]
    matcher = BlockMatcher(keys)
    assert all(k in matcher for k in keys if k.startswith(prefix))
    assert not any(k in matcher for k in outside)


def test_a_block_with_an_extra_tensor_still_counts_and_inner_lists_do_not():
    """T5: block 0 has one more tensor; each block's own numbered sub-layers differ in kind."""
    keys = []
    for i in range(3):
        keys += [
            f"encoder.block.{i}.layer.0.SelfAttention.q.weight",
            f"encoder.block.{i}.layer.1.DenseReluDense.wi.weight",
        ]
    keys.append("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    assert find_block_stacks(keys) == ["encoder.block."]
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in BlockMatcher(
        keys
    )


def test_plain_layer_lists_and_single_blocks_are_not_stacks():
    mlp = ["0.weight", "0.bias", "2.weight", "2.bias"]  # nn.Sequential of Linear layers
    assert find_block_stacks(mlp) == []
    assert find_block_stacks(_block("blocks.0.", GPT2_BLOCK)) == []  # nothing repeats
    assert "0.weight" not in BlockMatcher(mlp)


def test_a_regex_overrides_the_detection():
    keys = ["net.a.fc.weight", "net.b.fc.weight", "head.weight"]
    assert find_block_stacks(keys) == []
    matcher = BlockMatcher(keys, r"^net\.")
    assert "net.a.fc.weight" in matcher and "head.weight" not in matcher
    with pytest.raises(LorexError, match="blocks: .* not a regular expression"):
        BlockMatcher(keys, "net.(")


# --- a tiny GPT-2, its blocks renamed -------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_zoo(tmp_path_factory):
    """A tiny GPT-2 base and three experts, each saved under three block names: ``h.N`` (as
    transformers writes it), ``resblocks.N`` (open_clip's) and ``layers.N``."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2, n_inner=32
    )
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    models = {"base": base.state_dict()}
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        models[f"e{i}"] = {
            k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.state_dict().items()
        }
    base.save_pretrained(root / "hf-base")
    names = {
        "h": "transformer.h.",
        "resblocks": "transformer.resblocks.",
        "layers": "transformer.layers.",
    }
    kept = set(load_file(root / "hf-base" / "model.safetensors"))  # tied weights are left out
    dirs = {}
    for label, prefix in names.items():
        for name, sd in models.items():
            folder = root / label / name
            folder.mkdir(parents=True)
            tensors = {
                k.replace("transformer.h.", prefix): v.contiguous()
                for k, v in sd.items()
                if k in kept
            }
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            (folder / "config.json").write_text((root / "hf-base" / "config.json").read_text())
        dirs[label] = (root / label / "base", [root / label / f"e{i}" for i in range(3)])
    return dirs


@pytest.mark.parametrize("method", BLOCKWISE)
def test_gpt2_merges_the_same_whatever_its_blocks_are_called(gpt2_zoo, tmp_path, method):
    outputs = {}
    for label, (base, experts) in gpt2_zoo.items():
        options = {"steps": 20}
        rec = merge_models(method_from_name(method, **options), base, experts, tmp_path / label)
        outputs[label] = load_file(tmp_path / label / "model.safetensors")
        prefix = {"h": "h", "resblocks": "resblocks", "layers": "layers"}[label]
        assert rec["blocks"] == [f"transformer.{prefix}."]
        assert len(rec["rules"][method]) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    reference = outputs["layers"]
    for label in ("h", "resblocks"):
        renamed = {
            k.replace(f"transformer.{label}.", "transformer.layers."): v
            for k, v in outputs[label].items()
        }
        assert renamed.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(renamed[key], value), (label, key)
    base = load_file(gpt2_zoo["layers"][0] / "model.safetensors")
    changed = [k for k in reference if not torch.equal(reference[k], base[k])]
    assert "transformer.layers.0.attn.c_attn.weight" in changed


def test_blocks_option_names_the_same_blocks_and_a_regex_matching_nothing_stops(gpt2_zoo, tmp_path):
    base, experts = gpt2_zoo["h"]
    found = merge_models(method_from_name("wudi", steps=5), base, experts, tmp_path / "a")
    given = merge_models(
        method_from_name("wudi", steps=5, blocks=r"^transformer\.h\.\d+\."),
        base,
        experts,
        tmp_path / "b",
    )
    assert given["rules"] == found["rules"] and given["blocks"] == r"^transformer\.h\.\d+\."
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LorexError, match="wudi: no tensor gets its own rule.*--blocks 'nothing'"):
        merge_models(method_from_name("wudi", blocks="nothing"), base, experts, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# --- no silent substitution -----------------------------------------------------------------------
def _hf_folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "test-net"}))
    return path


MLP = {"0.weight": (16, 8), "0.bias": (16,), "2.weight": (4, 16), "2.bias": (4,)}
RESNET = {
    "conv1.weight": (4, 3, 3, 3),
    **{f"layer1.{i}.conv{j}.weight": (4, 4, 3, 3) for i in range(2) for j in (1, 2)},
    **{f"layer1.{i}.bn{j}.weight": (4,) for i in range(2) for j in (1, 2)},
    "fc.weight": (10, 4),
    "fc.bias": (10,),
}


@pytest.mark.parametrize("net", ["mlp", "resnet"])
@pytest.mark.parametrize("method", BLOCKWISE)
def test_a_checkpoint_without_block_matrices_is_refused_and_nothing_is_written(
    tmp_path, capsys, net, method
):
    shapes = MLP if net == "mlp" else RESNET
    g = torch.Generator().manual_seed(0)
    base = _hf_folder(
        tmp_path / "base", {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    )
    experts = [
        _hf_folder(tmp_path / f"e{i}", {k: torch.randn(s, generator=g) for k, s in shapes.items()})
        for i in range(2)
    ]
    out = tmp_path / "merged"
    code, stdout, err = run(
        capsys, "merge", "--method", method, "--base", base, "--experts", *experts, "--out", out
    )
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1
    assert f"{method}: no tensor gets its own rule" in err
    looked_for = {  # the MLP has no blocks; the ResNet's blocks hold no 2-D weight
        "mlp": "2-D weights inside repeated, numbered blocks (none found; --blocks REGEX",
        "resnet": "2-D weights inside blocks layer1.N;",
    }
    assert looked_for[net] in err
    assert next(iter(sorted(shapes))) in err  # a few of the keys it saw
    assert not out.exists()


# --- rules in merge.json --------------------------------------------------------------------------
def _lorex_zoo(root: Path, c: float = 1.0, zero_base: bool = False, n: int = 3):
    """A lorex base (two blocks) and ``n`` full experts ``base + c * tau_i``."""
    config = dict(TINY)
    torch.manual_seed(0)
    base = LorexModel(VisionTransformer(ViTConfig.from_dict(config)), config)
    if zero_base:
        with torch.no_grad():
            for p in base.backbone.parameters():
                p.zero_()
    save_model(base, root / "base")
    experts = []
    for i in range(n):
        model = LorexModel(VisionTransformer(ViTConfig.from_dict(config)), config)
        model.load_state_dict(base.state_dict())
        model.add_head(f"t{i}", ["x", "y"])
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.backbone.parameters():
                p.add_(c * 0.02 * torch.randn(p.shape, generator=g))
        save_model(model, root / f"t{i}")
        experts.append(root / f"t{i}")
    return root / "base", experts


@pytest.fixture(scope="module")
def vit_zoo(tmp_path_factory):
    return _lorex_zoo(tmp_path_factory.mktemp("vit"))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merge_json_gives_every_tensor_exactly_one_rule(vit_zoo, tmp_path, method):
    base, experts = vit_zoo
    options = {"steps": 3} if method in BLOCKWISE else {}
    merge_models(method_from_name(method, **options), base, experts, tmp_path / "m", progress=False)
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    written = list(load_file(tmp_path / "m" / "model.safetensors"))
    listed = [k for keys in record["rules"].values() for k in keys]
    assert sorted(listed) == sorted(written)  # each written tensor once, nothing else
    assert record["rules"]["copied_from_expert"] == [
        f"heads.t{i}.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    matrices = {
        k for k in written if ".blocks." in k and k.endswith("weight") and k.count(".") == 5
    }
    assert len(matrices) == 2 * 4
    own = set(record["rules"][method])
    if method in BLOCKWISE:
        assert own == {k for k in matrices if "norm" not in k}
        other = "kept_from_base" if method == "doge" else "mean_task_vector"
        assert (
            set(record["rules"][other]) == {k for k in written if k.startswith("backbone.")} - own
        )
    elif method in ("iso-c", "iso-cts", "tsv-m"):
        assert own == {
            k
            for k in written
            if k.startswith("backbone.")
            and load_file(tmp_path / "m" / "model.safetensors")[k].ndim == 2
        }
        assert "mean_task_vector" in record["rules"]
    else:
        assert own == {k for k in written if k.startswith("backbone.")}
    assert record["merged_tensors"] == sum(
        len(v)
        for r, v in record["rules"].items()
        if r not in ("kept_from_base", "copied_from_expert")
    )


def test_cli_prints_the_count_per_rule(vit_zoo, tmp_path, capsys):
    base, experts = vit_zoo
    code, out, err = run(
        capsys,
        "merge",
        "--method",
        "wudi",
        "--steps",
        "2",
        "--base",
        base,
        "--experts",
        *experts,
        "--out",
        tmp_path / "m",
    )
    assert code == 0, err
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    counts = ", ".join(f"{r} {len(k)}" for r, k in record["rules"].items())
    assert f"tensors per rule: {counts}" in out and "wudi 8" in out


def test_auto_steps_resolve_to_the_relative_step_times_the_rms_and_are_recorded(vit_zoo, tmp_path):
    from lorex.merging.methods import doge, wudi

    base, experts = vit_zoo
    base_sd = load_file(base / "model.safetensors")
    expert_sds = [load_file(e / "model.safetensors") for e in experts]
    for name, default in (("wudi", wudi.LR_RELATIVE), ("doge", doge.LR_RELATIVE)):
        rec = merge_models(method_from_name(name, steps=2), base, experts, tmp_path / name)
        assert rec["settings"]["lr"] == "auto" and rec["settings"]["lr_relative"] == default
        assert set(rec["lr_resolved"]) == set(rec["rules"][name])
        for key, lr in rec["lr_resolved"].items():
            taus = torch.stack([e[key] - base_sd[key] for e in expert_sds])
            assert lr == pytest.approx(default * float(taus.square().mean().sqrt()), rel=1e-5)


def test_wudi_takes_each_matrix_norms_once(vit_zoo, tmp_path, monkeypatch):
    from lorex.merging.methods import wudi

    calls = []
    real = wudi.inverse_square_norms
    monkeypatch.setattr(wudi, "inverse_square_norms", lambda t: calls.append(1) or real(t))
    rec = merge_models(method_from_name("wudi", steps=7), *vit_zoo, tmp_path / "m")
    assert len(calls) == len(rec["rules"]["wudi"])  # once per matrix, not once per step


# --- scale equivariance ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled_zoos(tmp_path_factory):
    """Experts ``base + c * tau_i`` for c = 1, 0.1, 10, on a zero base: no method reads the
    base's values, and a zero base keeps the float32 round-off of storing ``base + c tau`` out of
    the comparison (it would be relative to the base, not to ``c tau``)."""
    root = tmp_path_factory.mktemp("scaled")
    return {c: _lorex_zoo(root / f"c{c}", c, zero_base=True) for c in (1.0, *SCALES)}


def _merged_update(zoo, out: Path, method: str, options: dict) -> torch.Tensor:
    base, experts = zoo
    merge_models(method_from_name(method, **options), base, experts, out, progress=False)
    merged = load_file(out / "model.safetensors")
    keys = sorted(k for k in merged if k.startswith("backbone.") and merged[k].is_floating_point())
    return torch.cat([merged[k].double().flatten() for k in keys])  # the base is zero


def _scale_error(scaled_zoos, tmp_path, method, options, c) -> float:
    one = _merged_update(scaled_zoos[1.0], tmp_path / "one", method, options)
    scaled = _merged_update(scaled_zoos[c], tmp_path / "scaled", method, options)
    assert float(one.norm()) > 0
    return float((scaled - c * one).norm() / (c * one).norm())


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_is_scale_equivariant_at_its_defaults(scaled_zoos, tmp_path, method, c):
    assert _scale_error(scaled_zoos, tmp_path, method, {}, c) < 1e-3


@pytest.mark.parametrize(
    ("method", "paper"), [("doge", {"eta": 0.07, "lr": 1e-4}), ("wudi", {"lr": 1e-5})]
)
def test_the_papers_absolute_settings_are_not_scale_equivariant(
    scaled_zoos, tmp_path, method, paper
):
    """The positive control: the same check fails on absolute step sizes."""
    worst = max(_scale_error(scaled_zoos, tmp_path / str(c), method, paper, c) for c in (0.1, 10.0))
    assert worst > 1e-2


# --- validation data for choices ------------------------------------------------------------------
def test_held_out_is_exactly_what_subset_leaves_out():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    images = np.arange(50, dtype=np.uint8)[:, None, None, None].repeat(3, -1).reshape(50, 1, 1, 3)
    data = ImageDataset(images, labels, ["a", "b", "c"], "toy")
    used = {int(v) for v in data.subset(20, seed=3).images[:, 0, 0, 0]}
    rest = {int(v) for v in data.held_out(20, seed=3).images[:, 0, 0, 0]}
    assert len(used) == 20 and used.isdisjoint(rest) and used | rest == set(range(50))
    assert len(data.held_out(None)) == 0 and len(data.held_out(10, 0)) == 40


def test_cli_refuses_a_bad_blocks_regex_and_blocks_for_other_methods(vit_zoo, tmp_path, capsys):
    base, experts = vit_zoo
    common = ["--base", base, "--experts", *experts, "--out", tmp_path / "m"]
    code, _, err = run(capsys, "merge", "--method", "wudi", "--blocks", "net.(", *common)
    assert code == 2 and "blocks: 'net.(' is not a regular expression" in err
    code, _, err = run(capsys, "merge", "--method", "ties", "--blocks", "x", *common)
    assert code == 2 and "--blocks does not apply to ties" in err
    assert not (tmp_path / "m").exists()


# --- one list of methods, shared maths, options that describe themselves --------------------------
def test_the_method_list_is_the_registry():
    from lorex.merging import METHOD_CLASSES

    assert list(MERGE_METHODS) == [cls.name for cls in METHOD_CLASSES]
    assert all(MERGE_METHODS[cls.name] is cls for cls in METHOD_CLASSES)


def test_every_option_has_help_and_one_name_has_one_help():
    """The CLI builds one flag per option name over every method, from ``metadata["help"]``."""
    from dataclasses import fields

    helps: dict[str, set[str]] = {}
    for cls in MERGE_METHODS.values():
        for f in fields(cls.Options):
            assert f.metadata.get("help"), f"{cls.name}: option '{f.name}' has no help"
            helps.setdefault(f.name, set()).add(f.metadata["help"])
    assert {name: len(h) for name, h in helps.items() if len(h) > 1} == {}


def test_method_modules_import_no_other_method():
    """Shared maths lives in ``lorex.merging.ops``: a method module imports no other method."""
    import ast

    import lorex.merging.methods as methods

    folder = Path(methods.__file__).parent
    for file in folder.glob("*.py"):
        if file.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("lorex.merging.methods"), (file.name, node.module)
