"""LoRA maths against explicit matrices, adapter management, and PEFT's file format both ways."""

import copy

import pytest
import torch
from torch import nn

from lorex.adapters import lora
from lorex.adapters.lora import LoraConfig
from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.errors import LorexError

SMALL = ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def _vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(SMALL).eval()


def _randomise_adapter(module, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(module).values():
            if name in layer.scaling:
                layer.lora_B[name].weight.copy_(
                    torch.randn(layer.lora_B[name].weight.shape, generator=g)
                )


@pytest.mark.parametrize("path", ["low-rank", "folded"])
def test_layer_matches_explicit_matrix(path):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoraLinear(copy.deepcopy(base))
    layer.add_adapter("a", r=3, scaling=2.0)
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    layer.active = {"a": 1.0}
    x = torch.randn(2, 4, 6)
    w = base.weight + 2.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    expected = torch.stack(  # row by row, no batching
        [torch.stack([w @ x[i, j] + base.bias for j in range(4)]) for i in range(2)]
    )
    # The folded path (update added to the weight per call) runs only when no gradient is needed.
    with torch.set_grad_enabled(path == "low-rank"):
        assert layer._fold_per_call(x, layer._live()) == (path == "folded")
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_folding_is_skipped_for_dropout_and_tiny_batches():
    layer = lora.LoraLinear(nn.Linear(6, 5))
    layer.add_adapter("a", r=3, scaling=1.0, dropout=0.5)
    layer.active = {"a": 1.0}
    with torch.no_grad():
        assert not layer.train()._fold_per_call(torch.randn(8, 6), layer._live())
        assert layer.eval()._fold_per_call(torch.randn(8, 6), layer._live())
        assert not layer._fold_per_call(torch.randn(2, 6), layer._live())  # rows < r


def test_default_init_is_a_no_op_and_targets_only_block_linears():
    model = _vit()
    x = torch.rand(2, 3, 32, 32)
    before = model(x)
    paths = lora.add_adapter(model, LoraConfig(r=4))
    assert paths == sorted(
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert "patch_embed.proj" not in paths
    torch.testing.assert_close(model(x), before)  # B starts at zero
    bound = 1 / 48**0.5  # kaiming_uniform(a=sqrt 5) on fan_in 48
    a = lora.lora_layers(model)["blocks.0.attn.qkv"].lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound


def test_merge_unmerge_restores_weights():
    model = _vit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapter(model, LoraConfig(r=4, lora_alpha=16))
    _randomise_adapter(model, "default", 1)
    x = torch.rand(3, 3, 32, 32)
    unmerged = model(x)
    lora.merge_adapter(model, "default")
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
    lora.unmerge_adapters(model)
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(
                v, original[k.replace(".base_layer.", ".")], rtol=0, atol=1e-6
            )


def test_weighted_set_equals_explicit_weighted_sum_and_disable_gives_bare_backbone():
    model = _vit()
    bare = copy.deepcopy(model)
    lora.add_adapter(model, LoraConfig(r=2), "a")
    lora.add_adapter(model, LoraConfig(r=3, lora_alpha=6), "b")
    _randomise_adapter(model, "a", 1)
    _randomise_adapter(model, "b", 2)
    layer = lora.lora_layers(model)["blocks.1.mlp.fc1"]
    x = torch.randn(5, 48)
    lora.set_weighted_adapters(model, {"a": 0.7, "b": -0.4})
    w = layer.base_layer.weight + 0.7 * layer.delta_weight("a") + (-0.4) * layer.delta_weight("b")
    torch.testing.assert_close(layer(x), x @ w.T + layer.base_layer.bias, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # folded path
        torch.testing.assert_close(layer(x), x @ w.T + layer.base_layer.bias, rtol=1e-5, atol=1e-5)
    assert lora.active_adapters(model) == {"a": 0.7, "b": -0.4}
    images = torch.rand(2, 3, 32, 32)
    lora.merge_adapter(model, "a")
    with lora.disable_adapters(model):
        torch.testing.assert_close(model(images), bare(images), rtol=1e-5, atol=1e-5)
    assert lora.lora_layers(model)["blocks.0.attn.qkv"].merged == ["a"]  # re-merged on exit
    lora.unmerge_adapters(model)
    lora.delete_adapter(model, "b")
    assert "b" not in lora.adapter_configs(model) and "b" not in layer.lora_A
    with pytest.raises(LorexError, match="no adapter named 'b'"):
        lora.set_adapter(model, "b")


def test_frozen_base_receives_no_gradient():
    model = _vit()
    lora.add_adapter(model, LoraConfig(r=4))
    _randomise_adapter(model, "default", 3)
    lora.mark_trainable(model, "default")
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_bias_modes():
    for mode, expect in (("none", 0), ("lora_only", 8), ("all", 1 + 2 * 6 + 1)):
        model = _vit()
        lora.add_adapter(model, LoraConfig(r=2, bias=mode))
        lora.mark_trainable(model, "default")
        biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
        assert len(biases) == expect, (mode, biases)


def test_bad_config_and_targets():
    with pytest.raises(LorexError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(LorexError, match="match no nn.Linear"):
        lora.add_adapter(_vit(), LoraConfig(target_modules=["nope"]))


def test_save_load_round_trip(tmp_path):
    model = _vit()
    lora.add_adapter(model, LoraConfig(r=4, lora_alpha=8, bias="lora_only"))
    _randomise_adapter(model, "default", 4)
    x = torch.rand(2, 3, 32, 32)
    lora.save_adapter(model, "default", tmp_path / "adapter")
    fresh = _vit()
    lora.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(x), model(x))


def test_mismatched_adapter_names_the_key(tmp_path):
    def vit(dim, depth):
        return VisionTransformer(
            ViTConfig(img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=3)
        )

    wide, deep = vit(96, 2), vit(48, 3)
    for model, name in ((wide, "wide"), (deep, "deep")):
        lora.add_adapter(model, LoraConfig(r=4))
        lora.save_adapter(model, "default", tmp_path / name)
    target = _vit()
    with pytest.raises(
        LorexError, match=r"'base_model\.model\.blocks\.0\.attn\.proj\.lora_A\.weight' has shape"
    ):
        lora.load_adapter(target, tmp_path / "wide")
    with pytest.raises(
        LorexError, match=r"'base_model\.model\.blocks\.2\..*' does not fit this backbone"
    ):
        lora.load_adapter(target, tmp_path / "deep")
    assert lora.adapter_configs(target) == {}  # a failed load leaves no half-made adapter
    assert lora.lora_layers(target) == {}  # and the layers are plain nn.Linear again
    assert set(target.state_dict()) == set(_vit().state_dict())


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def test_peft_loads_a_lorex_adapter(tmp_path, peft):
    model = _vit()
    lora.add_adapter(model, LoraConfig(r=4, lora_alpha=12, bias="none"))
    _randomise_adapter(model, "default", 5)
    lora.save_adapter(model, "default", tmp_path / "adapter")
    x = torch.rand(2, 3, 32, 32)
    peft_model = peft.PeftModel.from_pretrained(_vit(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-5)


def test_lorex_loads_a_peft_adapter(tmp_path, peft):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "fc2"], init_lora_weights=False
    )
    peft_model = peft.get_peft_model(_vit(), config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    mine = _vit()
    paths = lora.load_adapter(mine, tmp_path / "adapter")
    assert paths == [
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc2",
        "blocks.1.attn.qkv",
        "blocks.1.mlp.fc2",
    ]
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(mine(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_deleting_a_merged_adapter_keeps_the_others_merged():
    model = _vit()
    only_a = _vit()
    for m, names in ((model, ("a", "b")), (only_a, ("a",))):
        for i, n in enumerate(names):
            torch.manual_seed(10 + i)  # the same A matrices in both models
            lora.add_adapter(m, LoraConfig(r=2), n)
            _randomise_adapter(m, n, i + 1)
            lora.merge_adapter(m, n)
    lora.delete_adapter(model, "b")
    assert lora.lora_layers(model)["blocks.0.attn.qkv"].merged == ["a"]
    for k, v in only_a.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)


def _conv_layer(seed=0, **conv):
    torch.manual_seed(seed)
    base = nn.Conv2d(3, 5, kernel_size=3, **conv)
    layer = lora.LoraConv2d(copy.deepcopy(base))
    layer.add_adapter("a", r=2, scaling=1.5)
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    layer.active = {"a": 1.0}
    return base, layer


@pytest.mark.parametrize("path", ["low-rank", "folded"])
@pytest.mark.parametrize("conv", [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2}])
def test_conv_layer_matches_explicit_kernel(path, conv):
    base, layer = _conv_layer(**conv)
    x = torch.randn(2, 3, 9, 9)
    a = layer.lora_A["a"].weight.flatten(1)  # (r, in*k*k)
    b = layer.lora_B["a"].weight.flatten(1)  # (out, r)
    kernel = base.weight + 1.5 * (b @ a).view(base.weight.shape)
    expected = torch.nn.functional.conv2d(x, kernel, base.bias, **conv)
    with torch.set_grad_enabled(path == "low-rank"):
        assert layer._fold_per_call(x, layer._live()) == (path == "folded")
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert layer._rows(x) == expected.shape[0] * expected.shape[2] * expected.shape[3]


def test_conv_merge_unmerge_and_unsupported_convs():
    base, layer = _conv_layer(padding=1)
    x = torch.randn(1, 3, 8, 8)
    before = layer(x)
    layer.merge(["a"])
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-6)
    for bad in (
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(3, 4, 3, padding="same"),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    ):
        with pytest.raises(LorexError, match="groups=1 and numeric zero padding"):
            lora.LoraConv2d(bad)


def test_patch_embedding_can_take_a_conv_adapter(tmp_path):
    model = _vit()
    paths = lora.add_adapter(model, LoraConfig(r=2, target_modules=["patch_embed.proj", "qkv"]))
    assert paths == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "patch_embed.proj"]
    assert isinstance(lora.lora_layers(model)["patch_embed.proj"], lora.LoraConv2d)
    _randomise_adapter(model, "default", 6)
    lora.save_adapter(model, "default", tmp_path / "adapter")
    fresh = _vit()
    lora.load_adapter(fresh, tmp_path / "adapter")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_peft_round_trips_conv_targets_and_bias_modes(tmp_path, peft, bias):
    """Both directions, with the patch-embedding convolution and each bias mode."""
    targets = ["patch_embed.proj", "qkv", "fc1"]
    g = torch.Generator().manual_seed(7)

    def perturb_biases(model):  # trained biases differ from the base's
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") and ".lora_" not in name and p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))

    mine = _vit()
    lora.add_adapter(mine, LoraConfig(r=2, lora_alpha=4, target_modules=targets, bias=bias))
    _randomise_adapter(mine, "default", 8)
    lora.mark_trainable(mine, "default")
    perturb_biases(mine)
    lora.save_adapter(mine, "default", tmp_path / "lorex")
    x = torch.rand(2, 3, 32, 32)
    theirs = peft.PeftModel.from_pretrained(_vit(), str(tmp_path / "lorex")).eval()
    torch.testing.assert_close(theirs(x), mine(x), rtol=1e-5, atol=1e-5)

    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, bias=bias, init_lora_weights=False
    )
    theirs = peft.get_peft_model(_vit(), config).eval()
    perturb_biases(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = _vit()
    lora.load_adapter(loaded, tmp_path / "peft")
    assert isinstance(lora.lora_layers(loaded)["patch_embed.proj"], lora.LoraConv2d)
    torch.testing.assert_close(loaded(x), theirs(x), rtol=1e-5, atol=1e-5)
