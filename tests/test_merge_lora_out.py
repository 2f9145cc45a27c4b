"""LoRA in, LoRA out (``lorex merge --out-rank``): the adapter against the dense merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorex.adapters import lora
from lorex.cli import main
from lorex.errors import LorexError
from lorex.io import read_json
from lorex.merging import merge_models, merge_to_lora, method_from_name
from lorex.merging.lora_out import low_rank_factors
from lorex.models import load_model
from lorex.models.store import save_model
from tests.test_merging import TINY, _fresh, backbone_state, make_experts

# Two LoRA experts on the tiny ViT: rank 2 on every block's qkv and fc1, rank 3 on proj and fc2
# plus the patch convolution (a conv LoRA), so their targets overlap only in part.
ADAPTERS = {
    "a": lora.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc1"]),
    "b": lora.LoraConfig(
        r=3, lora_alpha=3, target_modules=r"(blocks\.\d+\.(attn\.proj|mlp\.fc2)|patch_embed\.proj)"
    ),
}


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_zoo")
    base_dir, full = make_experts(root, n_full=1, with_lora=False)
    backbone = {k: v for k, v in load_model(base_dir).state_dict().items() if "backbone." in k}
    experts = []
    for i, (name, config) in enumerate(ADAPTERS.items()):
        model = _fresh(TINY)
        model.load_state_dict(backbone, strict=False)
        model.add_head(name, ["x", "y"])
        lora.add_adapter(model.backbone, config)
        g = torch.Generator().manual_seed(11 + i)
        with torch.no_grad():
            for layer in lora.lora_layers(model.backbone).values():
                b = layer.lora_B["default"].weight
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
        save_model(model, root / name, weights="delta", base_dir=base_dir)
        experts.append(root / name)
    return base_dir, experts, full[0]


def relative_error(out: Path, dense: Path, base: Path) -> float:
    """||W_lora - W_dense|| / ||W_dense - W_0|| over the backbone, by the ordinary load path."""
    got, want, theta0 = backbone_state(out), backbone_state(dense), backbone_state(base)
    num = sum(float((got[k] - want[k]).double().square().sum()) for k in want)
    den = sum(float((want[k] - theta0[k]).double().square().sum()) for k in want)
    return (num / den) ** 0.5


def test_full_rank_task_arithmetic_adapter_is_the_dense_merge(lora_zoo, tmp_path):
    base, experts, _ = lora_zoo
    method = method_from_name("task-arithmetic", scale=0.5)
    dense = tmp_path / "dense"
    merge_models(method, base, experts, dense)
    # rank 2 + 3 covers every update exactly: a sum of a rank-2 and a rank-3 matrix
    record = merge_to_lora(method, base, experts, tmp_path / "lora", rank=5)
    assert record["lora_out"]["relative_error"] < 1e-6
    assert relative_error(tmp_path / "lora", dense, base) < 1e-5
    model = load_model(tmp_path / "lora")
    assert model.tasks == ["a", "b"]  # both experts' heads come along
    (entry,) = read_json(tmp_path / "lora" / "config.json")["adapters"]
    assert entry["config"]["r"] == 5 and entry["config"]["lora_alpha"] == 5
    # the patch convolution's update is a conv LoRA, as the experts' was
    conv = lora.lora_layers(model.backbone)["patch_embed.proj"]
    assert conv.lora_A["default"].weight.ndim == 4


@pytest.mark.parametrize("method_name", ["ties", "average", "iso-c"])
def test_truncated_adapter_reports_its_true_error(lora_zoo, tmp_path, method_name):
    base, experts, _ = lora_zoo
    method = method_from_name(method_name)
    dense = tmp_path / "dense"
    merge_models(method, base, experts, dense)
    record = merge_to_lora(method, base, experts, tmp_path / "lora", rank=1)
    reported = record["lora_out"]["relative_error"]
    measured = relative_error(tmp_path / "lora", dense, base)
    assert reported > 1e-3  # rank 1 cannot hold these updates: the error is real
    assert measured == pytest.approx(reported, rel=1e-4)


def test_factors_are_the_best_rank_r_approximation():
    """Eckart-Young, checked with NumPy's SVD: the error is the dropped singular values' energy,
    B @ A is the truncated SVD, and a rank above the matrix's pads with zeros."""
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(7, 5, generator=g)
    for rank in (1, 3, 5, 6):
        a, b, error, norm = low_rank_factors(delta, rank)
        assert a.shape == (rank, 5) and b.shape == (7, rank)
        u, s, vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
        k = min(rank, 5)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        np.testing.assert_allclose((b @ a).double().numpy(), best, atol=1e-5)
        assert error == pytest.approx(float(np.sqrt((s[k:] ** 2).sum())), abs=1e-5)
        assert norm == pytest.approx(float(np.linalg.norm(s)), rel=1e-6)
    conv = torch.randn(4, 3, 2, 2, generator=g)
    a, b, _, _ = low_rank_factors(conv, 12)
    assert a.shape == (12, 3, 2, 2) and b.shape == (4, 12, 1, 1)
    torch.testing.assert_close(
        (b.flatten(1) @ a.flatten(1)).view(conv.shape), conv, atol=1e-5, rtol=0
    )


def test_full_experts_and_untargeted_changes_are_refused(lora_zoo, tmp_path):
    base, experts, full = lora_zoo
    method = method_from_name("task-arithmetic")
    with pytest.raises(LorexError, match=r"a full model; --out-rank merges LoRA experts only"):
        merge_to_lora(method, base, [*experts, full], tmp_path / "x", rank=2)
    # an adapter that trained biases changes tensors no LoRA factor can carry
    model = load_model(experts[0])
    for layer in lora.lora_layers(model.backbone).values():
        layer.base_layer.bias.data.add_(0.1)
    lora.adapter_configs(model.backbone)["default"].bias = "lora_only"
    save_model(model, tmp_path / "biased", weights="delta", base_dir=base)
    with pytest.raises(LorexError, match=r"changes '.*bias', which no expert's LoRA adapts"):
        merge_to_lora(method, base, [experts[1], tmp_path / "biased"], tmp_path / "x", rank=2)
    assert not (tmp_path / "x").exists()


def test_cli_out_rank(lora_zoo, tmp_path, capsys):
    base, experts, _ = lora_zoo
    out = tmp_path / "merged"
    args = ["merge", "--method", "ties", "--base", str(base), "--experts", *map(str, experts)]
    assert main([*args, "--out", str(out), "--out-rank", "4"]) == 0
    assert "one rank-4 adapter" in capsys.readouterr().out
    assert read_json(out / "merge.json")["lora_out"]["rank"] == 4
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "bad"), "--out-rank", "0"])
    assert exit_info.value.code == 2
    assert "--out-rank: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --- a Hugging Face base: PEFT adapters in, a PEFT adapter out ----------------------------------
#: Adapters that change nothing but LoRA pairs (an adapter cannot carry other changes).
OUT_RANK_ADAPTERS = {
    "llama": None,  # tests.test_merge_peft's: one on the embedding, which PEFT keeps transposed
    "vit": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(
            r=2, lora_alpha=4, target_modules=["k_proj", "mlp.fc1", "patch_embeddings.projection"]
        ),
    ],
}


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_peft_adapters_merge_into_an_adapter_peft_loads(tmp_path, kind):
    """Two PEFT adapters of a tiny Llama or ViT merge into one adapter; PEFT loads it on the
    plain model and gives the dense merge's outputs (full rank) or the reported error
    (truncated)."""
    peft = pytest.importorskip("peft")
    from tests.test_merge_peft import ADAPTERS, load_plain, make_adapter, save_base

    base = save_base(kind, tmp_path / "base")
    experts = [tmp_path / "a0", tmp_path / "a1"]
    options = OUT_RANK_ADAPTERS[kind] or ADAPTERS[kind]
    for i, (folder, option) in enumerate(zip(experts, options, strict=True)):
        make_adapter(kind, base, folder, seed=10 + i, **option)
    w0 = load_plain(kind, base).state_dict()

    def outputs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            if kind == "llama":
                return model(torch.arange(24).view(2, 12) % 64).logits
            pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            return model(pixel_values=pixels).last_hidden_state

    for name, rank in (("task-arithmetic", 6), ("ties", 2)):
        method = method_from_name(name)
        merge_models(method, base, experts, tmp_path / f"dense-{name}")
        record = merge_to_lora(method, base, experts, tmp_path / f"lora-{name}", rank=rank)
        config = read_json(tmp_path / f"lora-{name}" / "adapter_config.json")
        assert config["r"] == rank and config["base_model_name_or_path"] == str(base)
        dense = load_plain(kind, tmp_path / f"dense-{name}")
        got = peft.PeftModel.from_pretrained(load_plain(kind, base), str(tmp_path / f"lora-{name}"))
        got = got.merge_and_unload().eval()
        want_w, got_w = dense.state_dict(), got.state_dict()
        assert set(got_w) == set(want_w)
        num = sum(float((got_w[k] - want_w[k]).double().square().sum()) for k in want_w)
        den = sum(float((want_w[k] - w0[k]).double().square().sum()) for k in want_w)
        measured = (num / den) ** 0.5
        if rank == 6:  # 4 + 2: the sum of the experts' ranks holds task arithmetic exactly
            assert record["lora_out"]["relative_error"] < 1e-6 and measured < 1e-5
            torch.testing.assert_close(outputs(got), outputs(dense), atol=1e-5, rtol=0)
        else:
            assert measured == pytest.approx(record["lora_out"]["relative_error"], rel=1e-3)
