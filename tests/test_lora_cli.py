"""`lorex train --method lora`, its PEFT-format adapter, provenance, and merge-adapter."""

import json

import pytest
import torch

import lorex
from lorex.adapters import lora
from lorex.cli import main


def _train_lora(base, out, max_samples, *extra):
    return [
        "train",
        "--base",
        str(base),
        "--data",
        "digits/optdigits",
        "--method",
        "lora",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--max-samples",
        max_samples,
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_expert(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "expert"
    argv = _train_lora(tiny_base, out, "100", "--rank", "4")
    assert main(argv) == 0
    return out


def test_lora_expert_saves_adapter_head_and_provenance(lora_expert, tiny_base):
    assert sorted(p.name for p in (lora_expert / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    head_only = lorex.io.load_tensors(lora_expert / "model.safetensors")
    assert all(k.startswith("heads.") for k in head_only)
    config = json.loads((lora_expert / "config.json").read_text())
    (entry,) = config["adapters"]
    assert entry["name"] == "default" and entry["state"] == "active" and entry["config"]["r"] == 4
    assert len(entry["sha256"]) == 64 and config["weights"] == "delta"
    metrics = json.loads((lora_expert / "metrics.json").read_text())
    base_params = sum(p.numel() for p in lorex.load_model(tiny_base).backbone.parameters())
    assert metrics["trainable_params"] < 0.2 * base_params
    model = lorex.load_model(lora_expert)
    assert set(lora.active_adapters(model.backbone)) == {"default"}
    # The adapter really changed the backbone: B was trained away from zero.
    with lora.disable_adapters(model.backbone):
        bare = model.backbone(torch.rand(1, 3, 32, 32) * 0 + 0.5)
    assert not torch.allclose(bare, model.backbone(torch.rand(1, 3, 32, 32) * 0 + 0.5))


def test_peft_reads_the_trained_adapter_on_the_base_backbone(lora_expert, tiny_base):
    peft = pytest.importorskip("peft")
    x = torch.rand(3, 3, 32, 32)
    theirs = peft.PeftModel.from_pretrained(
        lorex.load_model(tiny_base).backbone, str(lora_expert / "adapter")
    ).eval()
    torch.testing.assert_close(
        theirs(x), lorex.load_model(lora_expert).backbone(x), rtol=1e-5, atol=1e-5
    )


def test_merge_adapter_gives_a_plain_model_with_the_same_outputs(lora_expert, tmp_path, capsys):
    assert main(["merge-adapter", str(lora_expert), "--out", str(tmp_path / "merged")]) == 0
    merged = lorex.load_model(tmp_path / "merged")
    assert lora.lora_layers(merged.backbone) == {}
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(merged(x), lorex.load_model(lora_expert)(x), rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["weights"] == "full" and config["made_by"]["folded"] == ["default"]
    assert main(["info", str(lora_expert)]) == 0
    assert "adapter    default [active] r=4" in capsys.readouterr().out


def test_a_changed_adapter_file_is_refused(lora_expert, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(lora_expert, copy)
    config = json.loads((copy / "config.json").read_text())
    config["base"]["path"] = str((lora_expert / config["base"]["path"]).resolve())
    (copy / "config.json").write_text(json.dumps(config))
    tensors = lorex.io.load_tensors(copy / "adapter" / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    lorex.io.save_tensors(copy / "adapter" / "adapter_model.safetensors", tensors)
    with pytest.raises(lorex.errors.LorexError, match="hash mismatch"):
        lorex.load_model(copy)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--rank", "0"], "rank"),
        (["--targets", "nope"], "match no nn.Linear"),
        (["--lora-dropout", "1.5"], "dropout"),
    ],
)
def test_bad_lora_options_are_one_line_errors(tiny_base, tmp_path, capsys, extra, needle):
    argv = _train_lora(tiny_base, tmp_path / "x", "20", *extra)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "x").exists()
