"""PEFT LoRA adapter folders (and lorex LoRA experts of a Hugging Face base) as merge experts.

The adapters are made by PEFT itself; the reference is PEFT's own ``merge_and_unload`` of each
adapter, merged by plain loops written out here, and the merged folder is loaded back with
transformers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorex.adapters import lora  # noqa: E402
from lorex.cli import main  # noqa: E402
from lorex.errors import LorexError  # noqa: E402
from lorex.io import load_tensors, save_tensors  # noqa: E402
from lorex.merging import MERGE_METHODS, merge_models  # noqa: E402
from lorex.models import load_model, save_model  # noqa: E402
from tests.tiny_hf import TINY_LLAMA, TINY_VIT  # noqa: E402

LLAMA = dict(TINY_LLAMA, tie_word_embeddings=False)
VIT = TINY_VIT
TOL = 1e-5


# --- building blocks ---------------------------------------------------------------------------
def save_base(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(**VIT))  # with its pooler
    model.float().save_pretrained(folder, safe_serialization=True)
    return folder


def load_plain(kind: str, folder: Path) -> torch.nn.Module:
    cls = transformers.AutoModelForCausalLM if kind == "llama" else transformers.AutoModel
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def randomise(peft_model: torch.nn.Module, seed: int) -> None:
    """Trained-sized values in everything the adapter trains (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_adapter(kind: str, base: Path, out: Path, seed: int, **options) -> dict:
    """A PEFT adapter of ``base`` in ``out``; returns its dense weights from PEFT's own merge."""
    model = load_plain(kind, base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**options))
    randomise(peft_model, seed)
    peft_model.save_pretrained(str(out))
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


ADAPTERS = {
    "llama": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "embed_tokens", "up_proj"]),
    ],
    "vit": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["k_proj", "mlp.fc1", "patch_embeddings.projection"],
            bias="lora_only",
            modules_to_save=["pooler"],
        ),
    ],
}


@pytest.fixture(scope="module", params=["llama", "vit"])
def zoo(request, tmp_path_factory):
    """A base, two PEFT adapters of it, and the dense weights of base and adapters."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    base = save_base(kind, root / "base")
    w0 = {k: v.clone() for k, v in load_plain(kind, base).state_dict().items()}
    experts, dense = [], []
    for i, options in enumerate(ADAPTERS[kind]):
        experts.append(root / f"adapter{i}")
        dense.append(make_adapter(kind, base, experts[-1], seed=10 + i, **options))
    return kind, base, experts, w0, dense


# --- the dense reference, written plainly -------------------------------------------------------
def task_arithmetic(w0, dense, scale):
    return {k: w0[k] + scale * sum(d[k] - w0[k] for d in dense) for k in w0}


def ties(w0, dense, density, scale=1.0):
    """Global top-k per task over the whole concatenated task vector, elected sign (the sum's;
    the whole model's majority where it is 0), mean of the agreeing entries."""
    keys = sorted(k for k in w0 if w0[k].is_floating_point())
    taus = [torch.cat([(d[k] - w0[k]).flatten() for k in keys]) for d in dense]
    trimmed = []
    for tau in taus:
        k = len(tau) - int(len(tau) * density)
        threshold = tau.abs().kthvalue(k).values if k > 0 else 0.0
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    total = stacked.sum(0)
    majority = torch.sign(torch.sign(total).sum())
    sign = torch.where(total == 0, majority, torch.sign(total))
    agree = (stacked != 0) & (torch.sign(stacked) == sign)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, at = {}, 0
    for k in keys:
        n = w0[k].numel()
        out[k] = w0[k] + scale * merged[at : at + n].view(w0[k].shape)
        at += n
    return out


def outputs(kind: str, model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(3)
    with torch.no_grad():
        if kind == "llama":
            return model(input_ids=torch.randint(0, 64, (2, 7))).logits
        return model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state


def reference_outputs(kind: str, base: Path, state: dict) -> torch.Tensor:
    model = load_plain(kind, base)
    model.load_state_dict(state)
    return outputs(kind, model)


def load_merged(kind: str, folder: Path) -> torch.nn.Module:
    """``from_pretrained`` of the merged folder, which must fill every weight."""
    cls = transformers.AutoModelForCausalLM if kind == "llama" else transformers.AutoModel
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


# --- merges ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_merged_peft_adapters_load_and_match_the_dense_reference(zoo, method, tmp_path):
    kind, base, experts, w0, dense = zoo
    if method == "ties":
        merger = MERGE_METHODS["ties"](MERGE_METHODS["ties"].Options(density=0.5))
        reference = ties(w0, dense, density=0.5)
    else:
        merger = MERGE_METHODS[method](MERGE_METHODS[method].Options(scale=0.7))
        reference = task_arithmetic(w0, dense, scale=0.7)
    record = merge_models(merger, base, experts, tmp_path / "out", progress=False)
    merged = load_merged(kind, tmp_path / "out")
    state = merged.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=TOL, msg=key)
    diff = (outputs(kind, merged) - reference_outputs(kind, base, reference)).abs().max()
    assert float(diff) <= TOL
    assert [e["path"] for e in record["experts"]] == [str(e) for e in experts]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )


def test_the_cli_merges_peft_folders(zoo, tmp_path, capsys):
    kind, base, experts, w0, dense = zoo
    out = tmp_path / "cli"
    argv = ["merge", "--method", "task-arithmetic", "--scale", "0.4", "--base", str(base)]
    argv += ["--experts", *map(str, experts), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    reference = task_arithmetic(w0, dense, scale=0.4)
    diff = (outputs(kind, load_merged(kind, out)) - reference_outputs(kind, base, reference)).abs()
    assert float(diff.max()) <= TOL


@pytest.mark.slow
def test_every_method_merges_peft_experts(zoo, tmp_path):
    """The experts are ordinary tensors to every method (block methods find ``layers.N.``)."""
    kind, base, experts, w0, _ = zoo
    if kind != "llama":
        pytest.skip("one architecture is enough to run every method")
    for name, cls in sorted(MERGE_METHODS.items()):
        options = {"steps": 3} if "steps" in cls.Options.__dataclass_fields__ else {}
        record = merge_models(cls(cls.Options(**options)), base, experts, tmp_path / name, False)
        assert record["merged_tensors"] > 0, name
        merged = load_merged(kind, tmp_path / name).state_dict()
        changed = [k for k in w0 if not torch.equal(merged[k], w0[k])]
        assert changed, f"{name} left the base unchanged"


def test_rslora_adapter_merges_with_its_own_scaling(tmp_path):
    base = save_base("llama", tmp_path / "base")
    w0 = load_plain("llama", base).state_dict()
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    dense = make_adapter("llama", base, tmp_path / "rs", seed=5, **options)
    method = MERGE_METHODS["task-arithmetic"](MERGE_METHODS["task-arithmetic"].Options(scale=1.0))
    merge_models(method, base, [tmp_path / "rs"], tmp_path / "out", progress=False)
    merged = load_merged("llama", tmp_path / "out")
    key = "model.layers.0.self_attn.q_proj.weight"
    # alpha / sqrt(r) = 4 here, twice alpha / r: a wrong scaling is far outside the tolerance.
    assert float((dense[key] - w0[key]).abs().max()) > 100 * TOL
    torch.testing.assert_close(merged.state_dict()[key], dense[key], rtol=0, atol=TOL)
    diff = outputs("llama", merged) - reference_outputs("llama", base, dense)
    assert float(diff.abs().max()) <= TOL


def lorex_expert_of_hf_base(base: Path, out: Path) -> None:
    """A lorex LoRA expert (with a head) of an HF ViT folder, B random."""
    model = load_model(base)
    model.add_head("shapes", ["a", "b", "c"])
    lora.add_adapter(model.backbone, lora.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora.lora_layers(model.backbone).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    save_model(model, out, weights="delta", base_dir=base)


def test_lorex_lora_expert_of_an_hf_base_mixes_with_a_peft_expert(tmp_path):
    base = save_base("vit", tmp_path / "base")
    w0 = load_plain("vit", base).state_dict()
    peft_dense = make_adapter("vit", base, tmp_path / "peft", seed=2, **ADAPTERS["vit"][0])
    lorex_expert_of_hf_base(base, tmp_path / "lorex")
    # Its dense weights, independently of lorex's merge: PEFT folds the lorex adapter file.
    plain = load_plain("vit", base)
    with_lorex = peft.PeftModel.from_pretrained(plain, str(tmp_path / "lorex" / "adapter"))
    lorex_dense = with_lorex.merge_and_unload().state_dict()
    method = MERGE_METHODS["task-arithmetic"](MERGE_METHODS["task-arithmetic"].Options(scale=1.0))
    experts = [tmp_path / "lorex", tmp_path / "peft"]
    record = merge_models(method, base, experts, tmp_path / "out", progress=False)
    assert record["heads_not_written"] == {str(tmp_path / "lorex"): ["shapes"]}
    reference = task_arithmetic(w0, [lorex_dense, peft_dense], scale=1.0)
    merged = load_merged("vit", tmp_path / "out")
    diff = outputs("vit", merged) - reference_outputs("vit", base, reference)
    assert float(diff.abs().max()) <= TOL


def test_lorex_expert_of_another_hf_base_is_refused(tmp_path):
    base = save_base("vit", tmp_path / "base")
    other = tmp_path / "other"
    torch.manual_seed(1)
    transformers.ViTModel(transformers.ViTConfig(**VIT)).save_pretrained(other)
    lorex_expert_of_hf_base(other, tmp_path / "lorex")
    method = MERGE_METHODS["task-arithmetic"]()
    with pytest.raises(LorexError, match="fine-tuned from .*other, not from this base"):
        merge_models(method, base, [tmp_path / "lorex"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- bad input -----------------------------------------------------------------------------------
def _edit_weights(folder: Path, edit) -> None:
    file = folder / "adapter_model.safetensors"
    tensors = load_tensors(file)
    edit(tensors)
    save_tensors(file, tensors)


def _edit_config(folder: Path, **fields) -> None:
    file = folder / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))


def _refused(base: Path, expert: Path, out: Path, match: str) -> None:
    method = MERGE_METHODS["task-arithmetic"]()
    with pytest.raises(LorexError, match=match) as err:
        merge_models(method, base, [expert], out, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.fixture
def llama_adapter(tmp_path):
    base = save_base("llama", tmp_path / "base")
    make_adapter("llama", base, tmp_path / "adapter", seed=1, **ADAPTERS["llama"][0])
    return base, tmp_path / "adapter"


def test_peft_folder_of_another_architecture_is_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    vit = save_base("vit", tmp_path / "vit")
    _refused(vit, adapter, tmp_path / "named", "base_model_name_or_path .* other weights")
    _edit_config(adapter, base_model_name_or_path=None)  # nothing names its base: its modules
    _refused(vit, adapter, tmp_path / "out", r"adapter_model.safetensors: adapts 'model\.layers")


def test_peft_folder_with_shapes_of_another_base_is_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(adapter, lambda t: t.update({key: torch.ones(4, 48)}))
    _refused(base, adapter, tmp_path / "out", r"'model\.layers\.0\.self_attn\.q_proj' has A")


def test_peft_folder_naming_a_base_with_other_weights_is_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    other = tmp_path / "other"
    torch.manual_seed(9)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(other)
    _edit_config(adapter, base_model_name_or_path=str(other))
    _refused(base, adapter, tmp_path / "out", "base_model_name_or_path .* other weights")
    shutil.copytree(base, tmp_path / "copy")  # the same weights elsewhere are fine
    _edit_config(adapter, base_model_name_or_path=str(tmp_path / "copy"))
    merge_models(MERGE_METHODS["average"](), base, [adapter], tmp_path / "ok", progress=False)


def test_conflicting_modules_to_save_are_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    head = "base_model.model.lm_head.weight"
    _edit_weights(adapter, lambda t: t.update({head: torch.ones(65, 32)}))
    _refused(base, adapter, tmp_path / "a", r"saved module tensor 'base_model\.model\.lm_head")
    _edit_weights(adapter, lambda t: t.pop(head))
    _edit_weights(adapter, lambda t: t.update({"base_model.model.score.weight": torch.ones(2, 32)}))
    _refused(base, adapter, tmp_path / "b", "'base_model.model.score.weight' .* not in the base")


def test_non_lora_peft_type_is_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    _edit_config(adapter, peft_type="IA3")
    _refused(base, adapter, tmp_path / "out", "adapter_config.json: peft_type 'IA3' is not LORA")


def test_adapters_that_are_no_fixed_update_are_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    _edit_config(adapter, trainable_token_indices=[1, 2])
    _refused(base, adapter, tmp_path / "out", "'trainable_token_indices' adapters are not")


def test_bad_peft_folder_through_the_cli_is_one_line(llama_adapter, tmp_path, capsys):
    base, adapter = llama_adapter
    _edit_config(adapter, peft_type="IA3")
    argv = ["merge", "--method", "average", "--base", str(base), "--experts", str(adapter)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "peft_type" in err
    assert not (tmp_path / "out").exists()


def test_peft_adapter_of_a_lorex_base_mixes_with_a_full_lorex_expert(tmp_path):
    """PEFT on a lorex backbone names modules as the backbone does; they merge under `backbone.`."""
    from lorex.backbones.vit import VisionTransformer, ViTConfig
    from lorex.models import LorexModel

    config = dict(type="vit", img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
    torch.manual_seed(0)
    base = LorexModel(VisionTransformer(ViTConfig.from_dict(config)), config)
    base.add_head("pretrain", ["a", "b"])
    save_model(base, tmp_path / "base")
    full = load_model(tmp_path / "base")
    del full.heads["pretrain"], full.head_info["pretrain"]
    full.add_head("full", ["x", "y"])
    with torch.no_grad():
        for p in full.backbone.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    save_model(full, tmp_path / "full")
    backbone = load_model(tmp_path / "base").backbone
    peft_model = peft.get_peft_model(backbone, peft.LoraConfig(r=2, target_modules=["qkv", "fc2"]))
    randomise(peft_model, seed=8)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    w0 = load_model(tmp_path / "base").backbone.state_dict()
    dense = [full.backbone.state_dict(), peft_model.merge_and_unload().state_dict()]
    method = MERGE_METHODS["task-arithmetic"](MERGE_METHODS["task-arithmetic"].Options(scale=0.5))
    experts = [tmp_path / "full", tmp_path / "peft"]
    merge_models(method, tmp_path / "base", experts, tmp_path / "out", progress=False)
    merged = load_model(tmp_path / "out")
    assert merged.tasks == ["full"]  # the PEFT expert brings no head
    reference = task_arithmetic(w0, dense, scale=0.5)
    got = merged.backbone.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=TOL, msg=key)
