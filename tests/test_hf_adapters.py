"""lorex LoRA adapters of a Hugging Face base in the tools people load them with: PEFT on the
plain transformers model, and ``from_pretrained`` of what ``lorex merge-adapter`` writes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorex.adapters import lora  # noqa: E402
from lorex.cli import main  # noqa: E402
from lorex.io import load_tensors, save_tensors  # noqa: E402
from lorex.merging import MERGE_METHODS, merge_models  # noqa: E402
from lorex.models import load_model, save_model  # noqa: E402
from tests.tiny_hf import TINY_VIT  # noqa: E402

VIT = TINY_VIT
MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


def save_base(folder: Path) -> Path:
    """A tiny ViTModel (with its pooler) and a preprocessor config with its own mean and std."""
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**VIT)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(MEAN), "image_std": list(STD)})
    )
    return folder


def normalised(x: torch.Tensor) -> torch.Tensor:
    """The pixel values lorex's backbone computes from [0, 1] images, written out here."""
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def make_expert(base: Path, out: Path, head: bool = True) -> None:
    """A lorex LoRA expert of ``base`` through lorex's API, B random (a trained-sized update)."""
    model = load_model(base)
    if head:
        model.add_head("shapes", ["a", "b", "c"])
        with torch.no_grad():
            model.heads["shapes"].weight.normal_(std=0.5)
    config = lora.LoraConfig(r=2, lora_alpha=4, target_modules=lora.default_targets(model.backbone))
    lora.add_adapter(model.backbone, config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in lora.lora_layers(model.backbone).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    save_model(model, out, weights="delta", base_dir=base)


@pytest.fixture
def expert(tmp_path):
    base = save_base(tmp_path / "base")
    make_expert(base, tmp_path / "expert")
    return base, tmp_path / "expert"


def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_peft_loads_every_lora_weight_on_the_plain_model(expert):
    base, folder = expert
    adapter = folder / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)  # as given, not relative
    saved = load_tensors(adapter / "adapter_model.safetensors")
    plain = transformers.ViTModel.from_pretrained(str(base)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reports missing or unexpected keys as a warning
        theirs = peft.PeftModel.from_pretrained(plain, str(adapter)).eval()
    loaded = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if ".lora_" in n}
    assert len(saved) == len(loaded) == 2 * 6 * VIT["num_hidden_layers"]
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    x = images()
    with torch.no_grad():
        features = load_model(folder).backbone(x)
        theirs_cls = theirs(pixel_values=normalised(x)).last_hidden_state[:, 0]
    assert float((theirs_cls - features).abs().max()) <= 1e-5


def _to_old_style(folder: Path) -> None:
    """The file lorex wrote before ``peft_root``: keys with the wrapper's ``model.`` prefix and a
    regex target that spells it out."""
    adapter = folder / "adapter"
    file = adapter / "adapter_model.safetensors"
    tensors = load_tensors(file)
    prefix = "base_model.model."
    save_tensors(file, {prefix + "model." + k[len(prefix) :]: v for k, v in tensors.items()})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.layers\.\d+\.(attention\.\w_proj|mlp\.fc\d)"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model_config = json.loads((folder / "config.json").read_text())
    for entry in model_config["adapters"]:
        entry["sha256"] = None
        entry["config"] = config
    (folder / "config.json").write_text(json.dumps(model_config))


def test_old_adapters_with_the_wrapper_prefix_still_load_and_merge(expert, tmp_path):
    base, folder = expert
    x = images()
    with torch.no_grad():
        new = load_model(folder)(x)
    method = MERGE_METHODS["task-arithmetic"](MERGE_METHODS["task-arithmetic"].Options(scale=1.0))
    merge_models(method, base, [folder], tmp_path / "new", progress=False)
    _to_old_style(folder)
    old = load_model(folder)
    assert len(lora.lora_layers(old.backbone)) == 6 * VIT["num_hidden_layers"]
    with torch.no_grad():
        torch.testing.assert_close(old(x), new, rtol=0, atol=1e-6)
    merge_models(method, base, [folder], tmp_path / "old", progress=False)
    a = load_tensors(tmp_path / "new" / "model.safetensors")
    b = load_tensors(tmp_path / "old" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_adapter_on_an_hf_base_writes_an_hf_folder(expert, tmp_path, capsys):
    base, folder = expert
    out = tmp_path / "merged"
    assert main(["merge-adapter", str(folder), "--out", str(out)]) == 0
    assert "lorex_heads.json" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )
    pre = (out / "preprocessor_config.json").read_text()
    assert pre == (base / "preprocessor_config.json").read_text()
    theirs, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model = load_model(folder)
    lora.merge_and_unload(model.backbone)  # lorex's folded model
    x = images()
    with torch.no_grad():
        features = model.backbone(x)
        theirs_cls = theirs.eval()(pixel_values=normalised(x)).last_hidden_state[:, 0]
        assert float((theirs_cls - features).abs().max()) <= 1e-5
        # The pooler lorex does not use is the base's, unchanged.
        plain = transformers.ViTModel.from_pretrained(str(base))
        assert torch.equal(theirs.pooler.dense.weight, plain.pooler.dense.weight)
        # lorex reads the folder back with its head from the sidecar.
        again = load_model(out)
        assert again.tasks == ["shapes"]
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-5)
