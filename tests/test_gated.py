"""The gated mixture of LoRA experts against the explicit per-expert weighted sum."""

import pytest
import torch
from torch import nn

from lorex.adapters.gated import (
    GateConfig,
    GatedLoraLinear,
    attach_gate,
    gate_parameters,
    gated_layers,
    load_experts,
    mark_gate_trainable,
    record_gate_weights,
    reset_gate,
)
from lorex.backbones import build_backbone, preset_config
from lorex.errors import LorexError
from lorex.models import LorexModel, load_model, save_model


def _explicit(layer: GatedLoraLinear, x: torch.Tensor):
    """SAGE's gate written out: one expert at a time, delta built in full (brief, stage 4)."""
    k = layer.num_experts
    deltas = [layer.scaling * (x @ layer.lora_A[i].T @ layer.lora_B[i].T) for i in range(k)]
    logits = []
    for d in deltas:
        omega = d / (d.norm(dim=-1, keepdim=True) + layer.eps)  # (B, N, out)
        if layer.kind == "published":
            logits.append(omega.flatten(1) @ layer.gate.flatten())  # over N * out
        else:
            logits.append((omega @ layer.gate).mean(1))
    w = torch.softmax(torch.stack(logits, 1) / layer.tau, dim=1)
    y = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for i in range(k):
        y = y + w[:, i, None, None] * deltas[i]
    return y, w


def _layer(k: int, kind: str, seed: int = 0, tokens: int = 5, i: int = 6, o: int = 7, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(i, o).double()
    layer = GatedLoraLinear(base, k, r, scaling=4.0, kind=kind, tokens=tokens)
    with torch.no_grad():
        base.weight.copy_(torch.randn(o, i, generator=g, dtype=torch.float64))
        base.bias.copy_(torch.randn(o, generator=g, dtype=torch.float64))
        for e in range(k):
            layer.set_expert(
                e,
                torch.randn(r, i, generator=g, dtype=torch.float64),
                torch.randn(o, r, generator=g, dtype=torch.float64),
            )
        layer.gate.copy_(torch.randn(layer.gate.shape, generator=g, dtype=torch.float64))
        layer.tau.fill_(0.7)
    return layer, torch.randn(4, tokens, i, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["published", "light"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_gate_output_equals_the_explicit_weighted_sum(k, kind):
    layer, x = _layer(k, kind, seed=k)
    y_ref, w_ref = _explicit(layer, x)
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.mix_weights(x), w_ref, rtol=1e-10, atol=1e-12)
    assert w_ref.shape == (4, k) and not torch.allclose(w_ref, torch.full_like(w_ref, 1 / k))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_gate_gradient_equals_the_explicit_one(k):
    layer, x = _layer(k, "light", seed=10 + k)
    mark_gate_trainable(layer)
    layer(x).square().sum().backward()
    fast = [p.grad.clone() for p in (layer.gate, layer.tau)]
    layer.zero_grad()
    _explicit(layer, x)[0].square().sum().backward()
    for got, want in zip(fast, (layer.gate.grad, layer.tau.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["published", "light"])
def test_inference_cache_follows_every_change_of_the_parameters(kind):
    """Under no_grad the parameter-only products are reused; an optimiser step on the gate, a
    new expert or a cast must each rebuild them (the explicit sum is the reference)."""
    layer, x = _layer(3, kind, seed=21)
    mark_gate_trainable(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _explicit(layer, x)[0], rtol=1e-10, atol=1e-10)
    cached = layer._cache[1][0]
    with torch.no_grad():
        layer(x)
    assert layer._cache[1][0] is cached  # reused while nothing changed
    layer(x).square().sum().backward()
    torch.optim.SGD([layer.gate], lr=0.5).step()
    layer.set_expert(1, torch.randn(3, 6, dtype=torch.float64), layer.lora_B[1].clone())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _explicit(layer, x)[0], rtol=1e-10, atol=1e-10)
    layer.float()
    with torch.no_grad():
        got, want = layer(x.float()), _explicit(layer, x.float())[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_zero_gate_is_the_uniform_mix():
    layer, x = _layer(3, "published")
    reset_gate(layer)
    uniform = layer.base_layer(x) + sum(
        layer.scaling * (x @ layer.lora_A[i].T @ layer.lora_B[i].T) / 3 for i in range(3)
    )
    torch.testing.assert_close(layer(x), uniform, rtol=1e-10, atol=1e-10)


def test_light_gate_is_the_published_gate_with_a_token_constant_vector():
    """Pooling over tokens = the published gate with g[n] = g_light / N on every token."""
    light, x = _layer(3, "light", seed=4)
    published = GatedLoraLinear(light.base_layer, 3, 3, 4.0, "published", tokens=5).double()
    with torch.no_grad():
        published.lora_A.copy_(light.lora_A)
        published.lora_B.copy_(light.lora_B)
        published.gate.copy_(light.gate.expand(5, -1) / 5)
        published.tau.copy_(light.tau)
    torch.testing.assert_close(published(x), light(x), rtol=1e-10, atol=1e-10)


def test_flat_input_and_wrong_token_count():
    layer, x = _layer(2, "light")
    flat = x[:, 0]
    torch.testing.assert_close(layer(flat), layer(flat[:, None])[:, 0])
    published, x = _layer(2, "published", tokens=5)
    with pytest.raises(LorexError, match="sized for 5 tokens"):
        published(x[:, :4])


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = preset_config("vit-micro")
    model = LorexModel(build_backbone(cfg), cfg)
    model.add_head("t", ["a", "b"], kind="bnneck")
    return model


def _targets(model):
    return [n for n, m in model.backbone.named_modules() if n.endswith(("qkv", "fc2"))]


def _random_experts(model, k, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(k):
        out[f"e{e}"] = {
            p: (
                torch.randn(r, m.in_features, generator=g) * 0.1,
                torch.randn(m.out_features, r, generator=g) * 0.1,
            )
            for p, m in model.backbone.named_modules()
            if p in _targets(model)
        }
    return out


@pytest.mark.parametrize("kind", ["published", "light"])
def test_gated_model_round_trips_through_a_model_directory(tmp_path, kind):
    model = _model()
    tokens = model.backbone.pos_embed.shape[1]  # patches + class token
    config = GateConfig(
        experts=["e0", "e1", "e2"],
        r=4,
        scaling=8.0,
        target_modules=_targets(model),
        kind=kind,
        tokens=tokens,
    )
    experts = _random_experts(model, 3)
    attach_gate(model.backbone, config)
    load_experts(model.backbone, experts)
    with torch.no_grad():
        for p in gate_parameters(model.backbone):
            p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    with record_gate_weights(model.backbone) as records:
        want = model.embedding(x)
    assert set(records) == set(gated_layers(model.backbone))
    assert all(len(v) == 1 and v[0].shape == (3, 3) for v in records.values())
    assert all(layer.recorder is None for layer in gated_layers(model.backbone).values())
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.backbone.gate_config == config
    torch.testing.assert_close(again.embedding(x), want)


def test_gate_refuses_bad_settings():
    with pytest.raises(LorexError, match="at least 2 experts"):
        GateConfig(experts=["a"], r=4, scaling=1.0)
    with pytest.raises(LorexError, match="token count"):
        GateConfig(experts=["a", "b"], r=4, scaling=1.0, kind="published")
    with pytest.raises(LorexError, match="unknown gate field 'rank'"):
        GateConfig.from_description(
            {"experts": ["a", "b"], "r": 1, "scaling": 1.0, "target_modules": [], "rank": 2}
        )
    model = _model()
    with pytest.raises(LorexError, match="not nn.Linear"):
        attach_gate(
            model.backbone,
            GateConfig(experts=["a", "b"], r=2, scaling=1.0, target_modules=["blocks.0.norm1"]),
        )
    config = GateConfig(experts=["a", "b"], r=2, scaling=1.0, target_modules=_targets(model))
    experts = {"a": _random_experts(model, 1, r=2)["e0"], "b": {}}
    attach_gate(model.backbone, config)
    with pytest.raises(LorexError, match="expert 'b' has no LoRA weights"):
        load_experts(model.backbone, experts)


@pytest.mark.parametrize("out", [7, 2])
def test_gate_with_a_silent_expert_and_fewer_outputs_than_ranks(out):
    """An expert whose B is zero (a layer it never changed) has delta = 0, so omega = 0 and no
    NaN; with out < r the QR factor is (out, r). Values and gradients against the explicit sum."""
    layer, x = _layer(3, "light", seed=30, o=out)
    with torch.no_grad():
        layer.lora_B[1].zero_()
    mark_gate_trainable(layer)
    y = layer(x)
    torch.testing.assert_close(y, _explicit(layer, x)[0], rtol=1e-10, atol=1e-10)
    y.square().sum().backward()
    fast = [p.grad.clone() for p in (layer.gate, layer.tau)]
    layer.zero_grad()
    _explicit(layer, x)[0].square().sum().backward()
    for got, want in zip(fast, (layer.gate.grad, layer.tau.grad), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["published", "light"])
def test_gate_on_cuda_matches_the_explicit_sum_through_training_steps(kind):
    """On CUDA (QR and the inference cache run there too): values and gradients of both paths
    against the explicit sum, over a few optimiser steps. Ran on an H100 (worst gap 2.8e-14,
    benchmarks/results/gpu/README.md); CI has no GPU and skips it."""
    dev = torch.device("cuda")
    for k in (2, 3, 5):
        layer, x = _layer(k, kind, seed=k)
        layer, x = layer.to(dev), x.to(dev)
        with torch.no_grad():
            layer.lora_B[1].zero_()
        mark_gate_trainable(layer)
        opt = torch.optim.Adam([layer.gate, layer.tau], lr=0.05)
        for _ in range(3):
            y = layer(x)
            torch.testing.assert_close(y, _explicit(layer, x)[0], rtol=1e-10, atol=1e-10)
            opt.zero_grad()
            y.square().sum().backward()
            fast = [p.grad.clone() for p in (layer.gate, layer.tau)]
            opt.zero_grad()
            _explicit(layer, x)[0].square().sum().backward()
            for got, want in zip(fast, (layer.gate.grad, layer.tau.grad), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
            opt.step()
            with torch.no_grad():
                got, want = layer(x), _explicit(layer, x)[0]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
