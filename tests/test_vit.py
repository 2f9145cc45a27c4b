"""The built-in ViT: timm parameter names, an independent reference forward, timm checkpoint import.

The reference forward below uses raw tensor ops on a plain state dict (no lorex modules, no
``F.layer_norm`` / ``F.gelu`` / ``scaled_dot_product_attention``), so it checks the lorex modules
against the ViT maths rather than against themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lorex
import lorex.backbones
from lorex.backbones import vit
from lorex.backbones.timm_checkpoint import read_checkpoint, split_timm_state
from lorex.backbones.vit import VisionTransformer, ViTConfig, resample_pos_embed
from lorex.cli import main
from lorex.errors import LorexError
from lorex.models.timm_import import import_timm

SMALL = ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
EPS = 1e-6
TOL = 1e-5


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def timm_vit_shapes(
    *, img: int, patch: int, dim: int, depth: int, hidden: int, chans: int = 3
) -> dict[str, tuple[int, ...]]:
    """timm ``VisionTransformer`` (class token, pre-norm, no head) state dict keys and shapes."""
    n = (img // patch) ** 2
    table: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + n, dim),
        "patch_embed.proj.weight": (dim, chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (hidden, dim),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (dim, hidden),
                b + "mlp.fc2.bias": (dim,),
            }
        )
    table["norm.weight"] = (dim,)
    table["norm.bias"] = (dim,)
    return table


def small_shapes() -> dict[str, tuple[int, ...]]:
    return timm_vit_shapes(img=32, patch=8, dim=48, depth=2, hidden=192)


def random_state(
    shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.2
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * std for k, s in shapes.items()}


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)


def _layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w.transpose(0, 1) + b


def _softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def reference_forward(
    state: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int, pool: str = "token"
) -> torch.Tensor:
    """A timm ViT forward in float64 from raw tensors: returns pooled features ``(B, D)``."""
    s = {k: v.double() for k, v in state.items()}
    x = (x.double() - 0.5) / 0.5
    w = s["patch_embed.proj.weight"]
    patch = w.shape[-1]
    t = F.conv2d(x, w, s["patch_embed.proj.bias"], stride=patch)  # (B, D, g, g)
    bsz, dim = t.shape[0], t.shape[1]
    t = t.reshape(bsz, dim, -1).permute(0, 2, 1)  # (B, N, D), row-major patch order
    t = torch.cat([s["cls_token"].expand(bsz, 1, dim), t], dim=1) + s["pos_embed"]
    n = t.shape[1]
    dh = dim // num_heads
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = _layernorm(t, s[p + "norm1.weight"], s[p + "norm1.bias"])
        qkv = _linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])  # (B, N, 3D)
        q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
        heads = []
        for j in range(num_heads):
            sl = slice(j * dh, (j + 1) * dh)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)  # (B, N, N)
            heads.append(_softmax(scores) @ v[..., sl])
        attn = torch.cat(heads, dim=-1)
        assert attn.shape == (bsz, n, dim)
        t = t + _linear(attn, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = _layernorm(t, s[p + "norm2.weight"], s[p + "norm2.bias"])
        h = _gelu(_linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        t = t + _linear(h, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    t = _layernorm(t, s["norm.weight"], s["norm.bias"])
    return t[:, 0] if pool == "token" else t[:, 1:].mean(dim=1)


def model_with(state: dict[str, torch.Tensor], cfg: ViTConfig = SMALL) -> VisionTransformer:
    model = VisionTransformer(cfg).eval()
    model.load_state_dict(state)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=TOL, rtol=TOL)


# --------------------------------------------------------------------------------------------
# 1. timm naming
# --------------------------------------------------------------------------------------------


def test_tiny_patch16_224_state_dict_matches_timm_names_and_shapes():
    expected = timm_vit_shapes(img=224, patch=16, dim=192, depth=12, hidden=768)
    # Spot-check the table itself against timm's published vit_tiny_patch16_224 shapes.
    assert expected["pos_embed"] == (1, 197, 192)
    assert expected["patch_embed.proj.weight"] == (192, 3, 16, 16)
    assert expected["blocks.11.attn.qkv.weight"] == (576, 192)
    assert expected["blocks.0.mlp.fc1.weight"] == (768, 192)
    assert expected["blocks.0.mlp.fc2.weight"] == (192, 768)
    assert len(expected) == 4 + 12 * 12 + 2

    model = VisionTransformer(vit.PRESETS["vit-tiny-patch16-224"])
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert "input_mean" not in state and "input_std" not in state
    # The buffers exist (they normalise the input), they are just not persistent.
    buffers = dict(model.named_buffers())
    assert buffers["input_mean"].shape == (1, 3, 1, 1)
    assert buffers["input_std"].shape == (1, 3, 1, 1)


def test_small_config_state_dict_matches_timm_table():
    state = VisionTransformer(SMALL).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == small_shapes()


# --------------------------------------------------------------------------------------------
# 2. reference forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_forward_matches_independent_reference(pool):
    torch.manual_seed(0)
    state = random_state(small_shapes(), seed=11)
    cfg = dataclasses.replace(SMALL, global_pool=pool)
    model = model_with(state, cfg)
    x = images(batch=3)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32 and out.shape == (3, 48)
    ref = reference_forward(state, x, num_heads=3, pool=pool)
    assert_close(out, ref)
    # The features must depend on the input (a constant output would also be "close" to itself).
    assert not torch.allclose(out[0], out[1])


def test_reference_pools_differ():
    """Guard against the two pooling modes silently doing the same thing."""
    state = random_state(small_shapes(), seed=12)
    x = images(batch=2)
    assert not torch.allclose(
        reference_forward(state, x, 3, "token"), reference_forward(state, x, 3, "avg")
    )


RECT = dataclasses.replace(SMALL, img_size=(64, 32))  # re-ID crops: height x width


def test_rectangular_image_size_matches_reference():
    """``img_size=(H, W)``: an 8x4 token grid, row-major, same timm keys as the square ViT."""
    shapes = {**small_shapes(), "pos_embed": (1, 1 + 8 * 4, 48)}
    state = random_state(shapes, seed=14)
    model = model_with(state, RECT)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert model.patch_embed.grid_size == (8, 4) and model.num_patches == 32
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 64, 32, generator=g)
    with torch.no_grad():
        out = model(x)
    assert_close(out, reference_forward(state, x, num_heads=3))
    _assert_one_line_error(model, torch.rand(2, 3, 32, 64))
    with pytest.raises(LorexError, match=r"\(B, 3, 64, 32\)"):
        model(torch.rand(2, 3, 32, 32))


def test_rectangular_config_round_trips_through_json():
    d = json.loads(json.dumps(RECT.to_dict()))
    assert d["img_size"] == [64, 32]
    assert ViTConfig.from_dict(d) == RECT
    assert ViTConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL  # square: int
    assert SMALL.to_dict()["img_size"] == 32
    with pytest.raises(LorexError, match="multiple of patch_size"):
        VisionTransformer(dataclasses.replace(SMALL, img_size=(64, 30)))


def test_resample_pos_embed_to_rectangular_grid():
    pe = torch.full((1, 1 + 16, 8), 0.5)
    pe[:, 0] = 3.0
    out = resample_pos_embed(pe, (8, 4))
    assert out.shape == (1, 1 + 32, 8)
    torch.testing.assert_close(out[:, 1:], torch.full_like(out[:, 1:], 0.5))
    assert torch.equal(out[:, 0], pe[:, 0])
    back = torch.randn(1, 1 + 32, 8)
    assert torch.equal(resample_pos_embed(back, (8, 4), old_grid=(8, 4)), back)
    assert resample_pos_embed(back, 4, old_grid=(8, 4)).shape == (1, 17, 8)
    with pytest.raises(LorexError, match="not a 4x4 grid"):
        resample_pos_embed(back, 4, old_grid=4)


# --------------------------------------------------------------------------------------------
# 3. forward_tokens
# --------------------------------------------------------------------------------------------


def test_forward_tokens_shapes_and_pool():
    model = model_with(random_state(small_shapes(), seed=13))
    x = images(batch=2)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        pooled = model.pool(tokens[-1])
        out = model(x)
    assert isinstance(tokens, list) and len(tokens) == SMALL.depth
    for t in tokens:
        assert t.shape == (2, 1 + 16, 48)
    torch.testing.assert_close(pooled, out, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(tokens[0], tokens[1])


# --------------------------------------------------------------------------------------------
# 4. wrong input shapes
# --------------------------------------------------------------------------------------------


def _assert_one_line_error(model: VisionTransformer, x: torch.Tensor) -> None:
    with pytest.raises(LorexError) as exc:
        model(x)
    msg = str(exc.value)
    assert msg and "\n" not in msg


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 3, 32, 28), (1, 2, 3, 32, 32)])
def test_wrong_spatial_size_is_one_line_error(shape):
    model = VisionTransformer(SMALL).eval()
    _assert_one_line_error(model, torch.rand(shape))


@pytest.mark.parametrize("shape", [(3, 32, 32), (32, 32), (2, 32, 32), (2, 1, 32, 32)])
def test_non_4d_or_wrong_channel_input_is_one_line_error(shape):
    model = VisionTransformer(SMALL).eval()
    _assert_one_line_error(model, torch.rand(shape))


# --------------------------------------------------------------------------------------------
# 5. resample_pos_embed
# --------------------------------------------------------------------------------------------


def test_resample_pos_embed_identity_when_grid_unchanged():
    pe = torch.randn(1, 1 + 16, 48, generator=torch.Generator().manual_seed(3))
    out = resample_pos_embed(pe, 4)
    assert torch.equal(out, pe)


@pytest.mark.parametrize("new_grid", [2, 7, 14])
def test_resample_pos_embed_new_grid(new_grid):
    pe = torch.randn(1, 1 + 16, 48, generator=torch.Generator().manual_seed(4))
    out = resample_pos_embed(pe, new_grid)
    assert out.shape == (1, 1 + new_grid * new_grid, 48)
    assert out.dtype == pe.dtype
    assert torch.equal(out[:, 0], pe[:, 0])


def test_resample_pos_embed_constant_stays_constant():
    pe = torch.full((1, 1 + 36, 8), 0.75)
    pe[:, 0] = -2.0
    for new_grid in (3, 4, 11):
        out = resample_pos_embed(pe, new_grid)
        torch.testing.assert_close(out[:, 1:], torch.full_like(out[:, 1:], 0.75))
        assert torch.equal(out[:, 0], pe[:, 0])


def test_resample_pos_embed_non_square_grid_is_lorex_error():
    with pytest.raises(LorexError, match="pos_embed"):
        resample_pos_embed(torch.zeros(1, 1 + 15, 8), 4)


# --------------------------------------------------------------------------------------------
# 6. timm checkpoint round trip
# --------------------------------------------------------------------------------------------

PRESET = "test-vit-small-p8"


@pytest.fixture
def small_preset(monkeypatch):
    # lorex.backbones re-exports the very same dict that build_parser and preset_config read.
    assert lorex.backbones.PRESETS is vit.PRESETS
    monkeypatch.setitem(vit.PRESETS, PRESET, SMALL)
    return PRESET


def timm_checkpoint(seed: int = 21, classes: int = 10) -> dict[str, torch.Tensor]:
    shapes = {**small_shapes(), "head.weight": (classes, 48), "head.bias": (classes,)}
    return random_state(shapes, seed=seed)


def test_import_timm_cli_round_trip(tmp_path, small_preset, capsys):
    ckpt = timm_checkpoint()
    path = tmp_path / "ckpt.safetensors"
    save_file(ckpt, str(path))
    out = tmp_path / "imported"
    assert main(["import-timm", str(path), "--preset", small_preset, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    model = lorex.load_model(out)
    assert model.backbone_config["img_size"] == 32
    assert model.classes == [str(i) for i in range(10)]
    body = {k: v for k, v in ckpt.items() if not k.startswith("head.")}
    x = images(batch=3, seed=5)
    with torch.no_grad():
        feats = model.backbone(x)
        logits = model(x)
    ref = reference_forward(body, x, num_heads=3)
    assert_close(feats, ref)
    ref_logits = ref @ ckpt["head.weight"].double().T + ckpt["head.bias"].double()
    assert_close(logits, ref_logits)
    assert logits.shape == (3, 10)


def test_import_timm_without_head_gives_bare_backbone(tmp_path, small_preset):
    ckpt = {k: v for k, v in timm_checkpoint(seed=22).items() if not k.startswith("head.")}
    path = tmp_path / "ckpt.safetensors"
    save_file(ckpt, str(path))
    out = tmp_path / "bare"
    assert main(["import-timm", str(path), "--preset", small_preset, "--out", str(out)]) == 0
    model = lorex.load_model(out)
    assert model.active_head is None
    x = images(batch=2, seed=6)
    with torch.no_grad():
        assert_close(model.backbone(x), reference_forward(ckpt, x, num_heads=3))


def test_pth_checkpoint_reads_same_tensors(tmp_path):
    ckpt = timm_checkpoint(seed=23)
    pth = tmp_path / "ckpt.pth"
    torch.save(ckpt, pth)
    loaded = read_checkpoint(pth)
    assert set(loaded) == set(ckpt)
    for k, v in ckpt.items():
        assert torch.equal(loaded[k], v), k
    # Wrapped in {"state_dict": ...} as some training scripts save it.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": ckpt}, wrapped)
    loaded = read_checkpoint(wrapped)
    assert set(loaded) == set(ckpt)
    assert all(torch.equal(loaded[k], v) for k, v in ckpt.items())


def test_split_timm_state_resamples_pos_embed_from_other_grid():
    ckpt = timm_checkpoint(seed=24)
    ckpt["pos_embed"] = torch.randn(1, 1 + 36, 48, generator=torch.Generator().manual_seed(2))
    body, head = split_timm_state(VisionTransformer(SMALL), ckpt)
    assert body["pos_embed"].shape == (1, 17, 48)
    assert torch.equal(body["pos_embed"], resample_pos_embed(ckpt["pos_embed"], 4))
    assert set(head) == {"weight", "bias"}
    assert "head.weight" not in body


# --------------------------------------------------------------------------------------------
# 7. pickle safety
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_malicious(path: Path, marker: Path) -> None:
    torch.save({"pos_embed": torch.zeros(1, 17, 48), "evil": _Payload(marker)}, path)


def test_malicious_pth_is_refused_without_running_code(tmp_path):
    # Control: the payload is live, an unrestricted unpickle does create its marker.
    control_marker = tmp_path / "control-ran"
    control = tmp_path / "control.pth"
    _write_malicious(control, control_marker)
    torch.load(control, map_location="cpu", weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    _write_malicious(evil, marker)
    with pytest.raises(LorexError) as exc:
        read_checkpoint(evil)
    assert "\n" not in str(exc.value)
    assert "evil.pth" in str(exc.value)
    assert not marker.exists()


def test_malicious_pth_through_cli_exits_2_without_running_code(tmp_path, small_preset, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    _write_malicious(evil, marker)
    out = tmp_path / "out"
    assert main(["import-timm", str(evil), "--preset", small_preset, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    assert not marker.exists()
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 8. mismatching checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pos_embed", torch.zeros(1, 17, 64)),
        ("blocks.1.attn.qkv.weight", torch.zeros(96, 48)),
        ("blocks.0.ls1.gamma", torch.ones(48)),
        ("blocks.1.ls2.gamma", torch.ones(48)),
        ("fc_norm.weight", torch.ones(48)),
    ],
)
def test_bad_checkpoint_names_the_key(tmp_path, small_preset, capsys, key, value):
    ckpt = timm_checkpoint(seed=25)
    ckpt[key] = value
    path = tmp_path / "bad.safetensors"
    save_file(ckpt, str(path))
    with pytest.raises(LorexError, match=f"'{key}'"):
        split_timm_state(VisionTransformer(SMALL), read_checkpoint(path), str(path))
    out = tmp_path / "out"
    with pytest.raises(LorexError, match=f"'{key}'"):
        import_timm(path, SMALL.to_dict(), out)
    assert not out.exists()
    assert main(["import-timm", str(path), "--preset", small_preset, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_key_is_lorex_error(tmp_path):
    ckpt = timm_checkpoint(seed=26)
    del ckpt["blocks.1.norm2.bias"]
    with pytest.raises(LorexError, match="blocks.1.norm2.bias"):
        split_timm_state(VisionTransformer(SMALL), ckpt)


def test_head_of_wrong_width_is_lorex_error(tmp_path):
    ckpt = timm_checkpoint(seed=27)
    ckpt["head.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad-head.safetensors"
    save_file(ckpt, str(path))
    with pytest.raises(LorexError, match="head.weight"):
        import_timm(path, SMALL.to_dict(), tmp_path / "out")
