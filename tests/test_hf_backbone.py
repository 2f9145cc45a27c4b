"""HFBackbone against the Hugging Face models themselves, on tiny random checkpoints."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorex.backbones import build_backbone  # noqa: E402
from lorex.backbones.hf import HFBackbone, is_hf_directory  # noqa: E402
from lorex.errors import LorexError  # noqa: E402
from tests.tiny_hf import TINY_VIT  # noqa: E402

TINY = TINY_VIT
TOKENS = 1 + (32 // 8) ** 2
# Written out here rather than read from lorex, so the reference is independent.
DEFAULT_NORM = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": (
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    ),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def tiny_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_type == "vit":
        return transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False)
    if model_type == "clip_vision_model":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    return transformers.Dinov2Model(transformers.Dinov2Config(**TINY))


def reference(model: torch.nn.Module, model_type: str, x: torch.Tensor, mean, std) -> torch.Tensor:
    """Pooled features straight from the HF model, normalising here."""
    pixels = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels)
    return out.last_hidden_state[:, 0] if model_type == "vit" else out.pooler_output


def pool_tokens(backbone: HFBackbone, last: torch.Tensor) -> torch.Tensor:
    """Each architecture's final norm and class-token pooling, applied by hand."""
    model = backbone.model
    if backbone.model_type == "vit":
        return model.layernorm(last)[:, 0]
    if backbone.model_type == "clip_vision_model":
        tower = getattr(model, "vision_model", model)  # transformers 4 nests the tower
        return tower.post_layernorm(last[:, 0])
    return model.layernorm(last)[:, 0]


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, size, size)


@pytest.fixture(params=["vit", "clip_vision_model", "dinov2"])
def saved(request, tmp_path: Path) -> tuple[str, torch.nn.Module, Path]:
    model_type = request.param
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    return model_type, model, tmp_path


def test_matches_hf_model(saved):
    model_type, model, path = saved
    backbone = HFBackbone.from_pretrained(path)
    x = images()
    with torch.no_grad():
        got = backbone(x)
    assert backbone.model_type == model_type
    assert backbone.num_features == 32 and backbone.image_size == 32
    assert got.shape == (2, 32)
    expected = reference(model, model_type, x, *DEFAULT_NORM[model_type])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not backbone.training and got.dtype == torch.float32


def test_forward_tokens(saved):
    model_type, _, path = saved
    backbone = HFBackbone.from_pretrained(path)
    x = images()
    with torch.no_grad():
        tokens = backbone.forward_tokens(x)
        pooled = backbone(x)
        again = pool_tokens(backbone, tokens[-1])
    assert len(tokens) == TINY["num_hidden_layers"]
    assert all(t.shape == (2, TOKENS, 32) for t in tokens)
    assert not torch.equal(tokens[0], tokens[1])
    torch.testing.assert_close(again, pooled, atol=1e-5, rtol=1e-5)


def test_pool_and_losa_side_network(saved):
    """``pool`` of the last tokens is ``forward``; so a fresh LoSA side network changes nothing."""
    from lorex.adapters.losa import LosaConfig, attach_losa
    from lorex.models import LorexModel

    _, _, path = saved
    backbone = HFBackbone.from_pretrained(path)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(backbone.pool(backbone.forward_tokens(x)[-1]), backbone(x))
    model = LorexModel(backbone, backbone.to_config())
    model.add_head("t", ["a", "b", "c"])
    torch.nn.init.normal_(model.heads["t"].weight)
    with torch.no_grad():
        probe = model(x)
        attach_losa(model, LosaConfig(rank_channel=4, rank_token=2))
        assert model.side.depth == TINY["num_hidden_layers"] and model.side.tokens == TOKENS
        torch.testing.assert_close(model(x), probe, atol=0, rtol=0)


def test_config_round_trip(saved):
    _, _, path = saved
    backbone = HFBackbone.from_pretrained(path)
    config = json.loads(json.dumps(backbone.to_config()))
    assert config["type"] == "hf"
    torch.manual_seed(2)
    rebuilt = build_backbone(config)
    assert isinstance(rebuilt, HFBackbone)
    assert set(rebuilt.state_dict()) == set(backbone.state_dict())
    assert all(k.startswith("model.") for k in backbone.state_dict())
    rebuilt.load_state_dict(backbone.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), backbone(x))
        for a, b in zip(rebuilt.forward_tokens(x), backbone.forward_tokens(x), strict=True):
            assert torch.equal(a, b)
    assert rebuilt.to_config() == backbone.to_config()


def test_wrong_input_size(saved):
    _, _, path = saved
    backbone = HFBackbone.from_pretrained(path)
    for bad in (images(size=24), images()[:, :1], images()[0]):
        with pytest.raises(LorexError, match=r"expected \(B, 3, 32, 32\)") as info:
            backbone(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(LorexError):
        backbone.forward_tokens(images(size=24))


def test_is_hf_directory(saved, tmp_path_factory):
    _, _, path = saved
    assert is_hf_directory(path)
    empty = tmp_path_factory.mktemp("empty")
    assert not is_hf_directory(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "vit", "lorex_version": "0.1"}))
    assert not is_hf_directory(empty)
    (empty / "config.json").write_text("not json")
    assert not is_hf_directory(empty)


def test_preprocessor_config_sets_normalisation(tmp_path):
    model = tiny_model("vit")
    model.save_pretrained(tmp_path)
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    pre = {"image_mean": list(mean), "image_std": list(std)}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    backbone = HFBackbone.from_pretrained(tmp_path)
    x = images()
    with torch.no_grad():
        got = backbone(x)
    torch.testing.assert_close(got, reference(model, "vit", x, mean, std), atol=1e-5, rtol=1e-5)
    assert backbone.to_config()["mean"] == list(mean)


def test_full_clip_directory_loads_vision_tower(tmp_path):
    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=TINY, projection_dim=16)
    clip = transformers.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    backbone = HFBackbone.from_pretrained(tmp_path)
    assert backbone.model_type == "clip_vision_model"
    x = images()
    with torch.no_grad():
        got = backbone(x)
    expected = reference(clip.vision_model, "clip", x, *DEFAULT_NORM["clip_vision_model"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_incomplete_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("vit").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop(next(k for k in weights if "encoder" in k))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorexError, match="lacks 1 weight"):
        HFBackbone.from_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LorexError, match="supported: vit, clip_vision_model, dinov2"):
        HFBackbone.from_pretrained(tmp_path)
    with pytest.raises(LorexError, match="supported: vit, clip_vision_model, dinov2"):
        HFBackbone.from_config({"type": "hf", "model_type": "bert"})


def test_missing_transformers_is_one_line_error(monkeypatch):
    config = {"type": "hf", "model_type": "vit", "hf_config": {}, "image_size": 32}
    config.update(mean=[0.5] * 3, std=[0.5] * 3)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LorexError, match=r"pip install 'lorex\[hf\]'"):
        HFBackbone.from_config(config)


@pytest.mark.parametrize("model_type", ["vit", "dinov2"])
def test_hf_directory_as_a_base_through_the_cli(model_type, tmp_path, capsys):
    """`lorex train --base HF_DIR` for both methods; the experts reload and agree with training."""
    import lorex
    from lorex.cli import main

    hf_dir = tmp_path / "hf"
    tiny_model(model_type).save_pretrained(hf_dir)
    base = lorex.load_model(hf_dir)
    x = torch.rand(2, 3, 32, 32)
    assert base.backbone(x).shape == (2, 32)
    for method in ("linear", "full"):
        out = tmp_path / method
        argv = [
            "train",
            "--base",
            str(hf_dir),
            "--data",
            "digits/optdigits",
            "--method",
            method,
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-samples",
            "40",
            "--batch-size",
            "20",
        ]
        assert main(argv) == 0, capsys.readouterr().err
        expert = lorex.load_model(out)
        metrics = json.loads((out / "metrics.json").read_text())
        assert expert(x).shape == (2, 10)
        assert main(["eval", "--model", str(out), "--data", "digits/optdigits"]) == 0
        assert f"{metrics['accuracy']:.4f}" in capsys.readouterr().out
    # The linear probe keeps the HF backbone untouched; full fine-tuning changed it.
    probe, full = lorex.load_model(tmp_path / "linear"), lorex.load_model(tmp_path / "full")
    torch.testing.assert_close(probe.backbone(x), base.backbone(x))
    assert not torch.allclose(full.backbone(x), base.backbone(x))


def test_default_lora_targets_and_peft_reads_the_adapter(saved, tmp_path):
    from lorex.adapters import lora

    peft = pytest.importorskip("peft")
    model_type, _, path = saved
    backbone = HFBackbone.from_pretrained(path)
    paths = lora.add_adapter(
        backbone, lora.LoraConfig(r=2, target_modules=lora.default_targets(backbone))
    )
    # In these architectures a transformer layer's linear maps are exactly its four attention
    # projections and two MLP layers, whatever transformers calls them: all of them, nothing else.
    bare = HFBackbone.from_pretrained(path)
    in_layers = [
        n
        for n, m in bare.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(r"\.layers?\.\d+\.", n)
    ]
    assert paths == sorted(in_layers) and len(paths) == 2 * 6, model_type
    with torch.no_grad():
        for layer in lora.lora_layers(backbone).values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)  # trained-sized
    lora.save_adapter(backbone, "default", tmp_path / "adapter")
    # PEFT loads it on the plain transformers model (the file's modules are named from there),
    # every LoRA weight, without a warning about missing or unexpected keys.
    plain = type(tiny_model(model_type)).from_pretrained(
        path, **({"add_pooling_layer": False} if model_type == "vit" else {})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter"))
    mean, std = DEFAULT_NORM[model_type]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            reference(theirs, model_type, x, mean, std), backbone(x), rtol=1e-5, atol=1e-5
        )
