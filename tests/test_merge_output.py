"""What a merge writes beside the maths: output dtype, shards and their index, the base's
tokenizer and generation files, the model card, and the refusals that keep inputs safe."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorex.cli import main
from lorex.errors import LorexError
from lorex.merging import merge_models, method_from_name
from lorex.merging.output import model_card_text, parse_size, plan_shards
from tests.tiny_hf import TINY_LLAMA

SCALE = 0.5
TOKENIZER_FILES = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"model_max_length": 64}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>"}',
    "vocab.txt": b"a\nb\nc\n",
    "merges.txt": b"#version: 0.2\na b\n",
    "chat_template.jinja": b"{{ messages }}",
}


def task_arithmetic():
    return method_from_name("task-arithmetic", scale=SCALE)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM base with tokenizer files, and two experts near it."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(**TINY_LLAMA, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    for name, data in TOKENIZER_FILES.items():
        (root / "base" / name).write_bytes(data)
    (root / "base" / "notes.txt").write_text("not a file tools load")
    experts = []
    for i in range(2):
        expert = transformers.LlamaForCausalLM(config).eval()
        expert.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        expert.save_pretrained(root / f"e{i}", safe_serialization=True)
        experts.append(root / f"e{i}")
    return root / "base", experts


def reference(base: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    """Task arithmetic by hand on the tensors loaded directly, in float32."""
    theta0 = load_file(base / "model.safetensors")
    thetas = [load_file(e / "model.safetensors") for e in experts]
    return {k: v + SCALE * sum(t[k].float() - v.float() for t in thetas) for k, v in theta0.items()}


def all_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in dict.fromkeys(index["weight_map"].values()):
        tensors.update(load_file(folder / file))
    return tensors


def test_out_dtype_is_the_float32_merge_cast_and_loads(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, experts = llama
    merge_models(task_arithmetic(), base, experts, tmp_path / "f32", progress=False)
    merge_models(
        task_arithmetic(), base, experts, tmp_path / "bf16", progress=False, out_dtype="bfloat16"
    )
    exact = load_file(tmp_path / "f32" / "model.safetensors")
    expected = reference(base, experts)
    cast = load_file(tmp_path / "bf16" / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(exact[key], value, rtol=0, atol=1e-6)
        assert cast[key].dtype == torch.bfloat16
        assert torch.equal(cast[key], exact[key].to(torch.bfloat16)), key
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    for key, param in model.state_dict().items():
        assert torch.equal(param.to(torch.bfloat16), cast[key]), key


def test_integer_tensors_keep_their_dtype(tmp_path):
    weights = {"fc.weight": torch.randn(3, 4), "position_ids": torch.arange(6).view(1, 6)}
    for name, shift in (("base", 0.0), ("e0", 1.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
        save_file(
            {k: v + shift if v.is_floating_point() else v for k, v in weights.items()},
            folder / "model.safetensors",
        )
    merge_models(
        task_arithmetic(), tmp_path / "base", [tmp_path / "e0"], tmp_path / "m", out_dtype="float16"
    )
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged["position_ids"].dtype == torch.int64
    assert torch.equal(merged["position_ids"], weights["position_ids"])
    assert torch.equal(merged["fc.weight"], (weights["fc.weight"] + SCALE).half())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "float16" and config["model_type"] == "vit"
    with pytest.raises(LorexError, match="out_dtype: expected one of float32, float16, bfloat16"):
        merge_models(
            task_arithmetic(),
            tmp_path / "base",
            [tmp_path / "e0"],
            tmp_path / "x",
            out_dtype="int8",
        )
    assert not (tmp_path / "x").exists()


def test_sizes_read_as_transformers_reads_them():
    hub = pytest.importorskip("transformers.utils.hub")
    for text in ("2GB", "500MB", "7KB", "1MiB", "3GiB", "12KiB"):
        assert parse_size(text) == hub.convert_file_size_to_int(text), text
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(1234) == 1234
    for bad in ("5B", "2Gb", "lots", "0", "-1MB", ""):
        with pytest.raises(LorexError, match="max_shard_size"):
            parse_size(bad)


def test_shards_are_planned_in_order_with_a_limit():
    specs = [(f"t{i}", torch.float32, (100,)) for i in range(5)]  # 400 bytes each
    specs.insert(2, ("big", torch.float32, (1000,)))  # larger than the limit: a shard of its own
    shards = plan_shards(specs, 1000)
    assert [[name for name, _, _ in shard] for shard in shards] == [
        ["t0", "t1"],
        ["big"],
        ["t2", "t3"],
        ["t4"],
    ]
    assert plan_shards(specs, None) == [specs]


def test_sharded_output_is_the_single_file_output_split(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, experts = llama
    merge_models(task_arithmetic(), base, experts, tmp_path / "one", progress=False)
    rec = merge_models(
        task_arithmetic(), base, experts, tmp_path / "many", progress=False, max_shard_size="20KB"
    )
    one = load_file(tmp_path / "one" / "model.safetensors")
    sizes = {k: v.numel() * v.element_size() for k, v in one.items()}
    order = list(load_file(base / "model.safetensors"))  # the base's order, as read back sorted
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and rec["output"]["files"] == files
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "many" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert sorted(index["weight_map"]) == sorted(order)
    for file in files:
        shard = load_file(tmp_path / "many" / file)
        assert sum(sizes[k] for k in shard) <= 20_000 or len(shard) == 1
        assert all(index["weight_map"][k] == file for k in shard)
    split = all_shards(tmp_path / "many")
    assert split.keys() == one.keys()
    for key, value in one.items():
        assert torch.equal(split[key], value), key
    models = [transformers.LlamaForCausalLM.from_pretrained(tmp_path / n) for n in ("one", "many")]
    expected = reference(base, experts)
    for key, param in models[1].state_dict().items():
        torch.testing.assert_close(param, expected[key], rtol=0, atol=1e-6)
    ids = torch.arange(10).view(1, 10)
    assert torch.equal(models[0](ids).logits, models[1](ids).logits)


def test_tokenizer_and_generation_files_are_copied_byte_for_byte(llama, tmp_path):
    base, experts = llama
    rec = merge_models(task_arithmetic(), base, experts, tmp_path / "m", progress=False)
    copied = [*TOKENIZER_FILES, "generation_config.json"]
    assert sorted(rec["copied_files"]) == sorted(copied)
    for name in copied:
        assert (tmp_path / "m" / name).read_bytes() == (base / name).read_bytes(), name
    assert not (tmp_path / "m" / "notes.txt").exists()
    merge_models(
        task_arithmetic(), base, experts, tmp_path / "bare", progress=False, copy_files=False
    )
    assert not any((tmp_path / "bare" / name).exists() for name in copied)


def test_model_card_names_the_method_sources_and_recipe(llama, tmp_path):
    yaml = pytest.importorskip("yaml")
    base, experts = llama
    recipe = "merge_method: task_arithmetic\nparameters:\n  scale: 0.5\n"
    rec = merge_models(
        task_arithmetic(), base, experts, tmp_path / "m", progress=False, recipe_text=recipe
    )
    text = (tmp_path / "m" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == [str(base), *map(str, experts)]
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "lorex", "task-arithmetic"]
    assert "**task-arithmetic**" in body and "| `scale` | `0.5` |" in body
    for source in [rec["base"], *rec["experts"]]:
        assert f"`{source['path']}` | `{source['sha256']}`" in body
    assert f"```yaml\n{recipe}```" in body
    merge_models(task_arithmetic(), base, experts, tmp_path / "bare", model_card=False)
    assert not (tmp_path / "bare" / "README.md").exists()


def test_model_card_lists_per_model_weights_and_lorex_library():
    record = {
        "method": "ties",
        "settings": {"density": 0.2},
        "base": {"path": "runs/base", "sha256": "aa"},
        "experts": [{"path": "runs/a", "sha256": "bb"}, {"path": "runs/b", "sha256": "cc"}],
        "weights": [0.25, 2.0],
        "lorex_version": "0",
    }
    text = model_card_text(record, "lorex")
    assert "library_name: lorex" in text
    assert "| expert | `runs/a` | `bb` | 0.25 |" in text
    assert "| expert | `runs/b` | `cc` | 2 |" in text
    assert "## Recipe" not in text


def _existing_out(tmp_path: Path) -> tuple[Path, bytes]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_bytes(b"earlier output")
    return out, b"earlier output"


def _assert_untouched(out: Path, data: bytes) -> None:
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")) == []
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_bytes() == data


@pytest.mark.parametrize(
    "where, needle",
    [
        (lambda base, experts: base, "would replace the base"),
        (lambda base, experts: experts[1].parent / "x" / ".." / experts[1].name, "replace expert"),
        (lambda base, experts: base / "merged", "would be inside the base"),
        (lambda base, experts: base.parent, "replace the folder holding the base"),
    ],
)
def test_out_that_would_destroy_an_input_is_refused(llama, where, needle):
    base, experts = llama
    out = where(base, experts)
    before = {p: p.read_bytes() for p in base.parent.rglob("*") if p.is_file()}
    with pytest.raises(LorexError, match=needle) as exc:
        merge_models(task_arithmetic(), base, experts, out, progress=False)
    assert "\n" not in str(exc.value) and str(out) in str(exc.value)
    assert {p: p.read_bytes() for p in base.parent.rglob("*") if p.is_file()} == before


def _folder(path: Path, tensors: dict[str, torch.Tensor], shards: dict[str, list[str]] | None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    if shards is None:
        save_file(tensors, path / "model.safetensors")
        return
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


WEIGHTS = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
SHARDS = {"a.safetensors": ["fc.weight"], "b.safetensors": ["fc.bias"]}


def test_shard_index_naming_a_missing_file_is_refused(tmp_path):
    _folder(tmp_path / "base", WEIGHTS, None)
    _folder(tmp_path / "e0", WEIGHTS, SHARDS)
    (tmp_path / "e0" / "b.safetensors").unlink()
    out, data = _existing_out(tmp_path)
    with pytest.raises(LorexError) as exc:
        merge_models(task_arithmetic(), tmp_path / "base", [tmp_path / "e0"], out)
    message = str(exc.value)
    assert message == (
        f"{tmp_path / 'e0' / 'model.safetensors.index.json'}: tensor 'fc.bias' is in "
        "'b.safetensors', which is missing"
    )
    _assert_untouched(out, data)


def test_shard_index_without_weight_map_is_refused(tmp_path):
    _folder(tmp_path / "base", WEIGHTS, None)
    _folder(tmp_path / "e0", WEIGHTS, SHARDS)
    (tmp_path / "e0" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    out, data = _existing_out(tmp_path)
    with pytest.raises(LorexError, match=r"model.safetensors.index.json: no 'weight_map'$"):
        merge_models(task_arithmetic(), tmp_path / "base", [tmp_path / "e0"], out)
    _assert_untouched(out, data)


def test_expert_with_an_integer_tensor_where_the_base_is_float_is_refused(tmp_path):
    _folder(tmp_path / "base", WEIGHTS, None)
    _folder(tmp_path / "e0", {**WEIGHTS, "fc.weight": torch.ones(2, 3, dtype=torch.int8)}, None)
    out, data = _existing_out(tmp_path)
    with pytest.raises(LorexError) as exc:
        merge_models(task_arithmetic(), tmp_path / "base", [tmp_path / "e0"], out)
    assert str(exc.value) == (
        f"expert {tmp_path / 'e0'}: tensor 'fc.weight' is torch.int8 (2, 3), the base's is "
        "torch.float32 (2, 3)"
    )
    _assert_untouched(out, data)


def test_float8_expert_is_refused_naming_file_and_tensor(tmp_path):
    _folder(tmp_path / "base", WEIGHTS, None)
    fp8 = {**WEIGHTS, "fc.weight": torch.ones(2, 3).to(torch.float8_e4m3fn)}
    _folder(tmp_path / "e0", fp8, None)
    out, data = _existing_out(tmp_path)
    with pytest.raises(LorexError) as exc:
        merge_models(task_arithmetic(), tmp_path / "base", [tmp_path / "e0"], out)
    message = str(exc.value)
    assert message.startswith(
        f"{tmp_path / 'e0' / 'model.safetensors'}: tensor 'fc.weight' is F8_E4M3, which lorex "
        "cannot read or merge"
    )
    assert "\n" not in message
    _assert_untouched(out, data)


def cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return (code, *capsys.readouterr())


def test_cli_output_flags_and_their_refusals(llama, tmp_path, capsys):
    base, experts = llama
    common = ["merge", "--method", "average", "--base", base, "--experts", *experts]
    code, _, err = cli(capsys, *common, "--out", tmp_path / "m", "--max-shard-size", "5B")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "5B" in err
    assert not (tmp_path / "m").exists()
    code, _, err = cli(capsys, *common, "--out", base)
    assert code == 2 and err.strip().splitlines() == [
        f"lorex merge: error: {base}: the output would replace the base {base}; "
        "choose another --out"
    ]
    args = ["--out-dtype", "float16", "--max-shard-size", "30KB", "--no-copy-files"]
    code, out, _ = cli(capsys, *common, "--out", tmp_path / "m", *args, "--no-model-card")
    assert code == 0, out
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["output"]["dtype"] == "float16" and record["output"]["max_shard_size"] == 30_000
    assert len(record["output"]["files"]) > 1
    assert not (tmp_path / "m" / "README.md").exists()
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    assert all(v.dtype == torch.float16 for v in all_shards(tmp_path / "m").values())


def test_info_describes_hugging_face_folders_without_loading_them(llama, tmp_path, capsys):
    base, experts = llama
    tensors = load_file(base / "model.safetensors")
    params = sum(v.numel() for v in tensors.values())
    code, out, err = cli(capsys, "info", base)
    assert code == 0, err
    assert "type       llama ['LlamaForCausalLM']" in out
    assert f"parameters {params:,} in {len(tensors)} tensors" in out
    size = (base / "model.safetensors").stat().st_size
    assert f"files      1 shard, {size:,} bytes (model.safetensors)" in out
    assert f"F32 {len(tensors)} tensors ({params:,} parameters)" in out
    assert "tokenizer  tokenizer.json, tokenizer_config.json" in out
    assert "generation generation_config.json" in out
    merge_models(
        task_arithmetic(),
        base,
        experts,
        tmp_path / "m",
        progress=False,
        out_dtype="bfloat16",
        max_shard_size="20KB",
        copy_files=False,
    )
    code, out, err = cli(capsys, "info", tmp_path / "m")
    assert code == 0, err
    files = sorted((tmp_path / "m").glob("model-*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    assert f"files      {len(files)} shards, {total:,} bytes" in out
    assert f"parameters {params:,} in {len(tensors)} tensors" in out
    assert f"BF16 {len(tensors)} tensors ({params:,} parameters)" in out
    assert "tokenizer  none" in out and "generation none" in out
    assert f"merged     task-arithmetic {{'scale': 0.5}} from base {base}" in out
    assert f"experts    {experts[0]}, {experts[1]}" in out
    assert "output     dtype bfloat16" in out


def test_info_describes_a_peft_adapter(llama, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, _ = llama
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    code, out, err = cli(capsys, "info", tmp_path / "adapter")
    assert code == 0, err
    assert "(PEFT LORA)" in out
    line = next(x for x in out.splitlines() if x.startswith("lora "))
    assert "r=4 alpha=8" in line and "q_proj" in line and "v_proj" in line
    assert f"base model {base}" in out
    params = sum(v.numel() for v in tensors.values())
    assert f"parameters {params:,} in {len(tensors)} tensors" in out
