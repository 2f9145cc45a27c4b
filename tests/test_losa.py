"""LoSA: the side network's maths, its training guarantees, caching, clips and saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorex.adapters.losa import LosaConfig, LosaSideNetwork, LowRankMixer, attach_losa
from lorex.backbones import build_backbone, preset_config
from lorex.data import BUILTINS, ImageDataset, load_dataset
from lorex.data.moving_digits import DIRECTIONS, FRAMES
from lorex.errors import LorexError
from lorex.models import LorexModel, load_model, save_model
from lorex.training.config import TrainConfig
from lorex.training.methods import TRAINING_METHODS as METHODS
from lorex.training.objectives.classification import fit


def _model(frames: int = 1, classes: int = 5, seed: int = 0) -> LorexModel:
    torch.manual_seed(seed)
    cfg = preset_config("vit-micro")
    model = LorexModel(build_backbone(cfg), cfg)
    model.add_head("t", [str(i) for i in range(classes)])
    torch.nn.init.normal_(model.heads["t"].weight, std=0.1)
    return model


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Give zero-initialised up-projections values, so the maths is tested off the start point."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _mixer_by_loops(mixer: LowRankMixer, h: torch.Tensor) -> torch.Tensor:
    """The mixer written with explicit loops over samples, frames, tokens and channels."""

    def mlp(m, v):  # one vector through a LowRankMlp (norm included when it has one)
        if isinstance(m.norm, torch.nn.LayerNorm):
            v = F.layer_norm(v, v.shape, m.norm.weight, m.norm.bias, m.norm.eps)
        return m.up.weight @ F.gelu(m.down.weight @ v + m.down.bias) + m.up.bias

    def ln(norm, v):
        return F.layer_norm(v, v.shape, norm.weight, norm.bias, norm.eps)

    clip = h.ndim == 4
    x = h if clip else h.unsqueeze(1)
    b, t, n, d = x.shape
    x = x.clone()
    for i in range(b):
        for f in range(t):
            for k in range(n):
                x[i, f, k] = x[i, f, k] + mlp(mixer.channel, x[i, f, k])
    normed = torch.stack(
        [
            torch.stack([ln(mixer.token_norm, x[i, f, k]) for k in range(n)])
            for i in range(b)
            for f in range(t)
        ]
    ).view(b, t, n, d)
    out = x.clone()
    for i in range(b):
        for f in range(t):
            for c in range(d):
                out[i, f, :, c] = x[i, f, :, c] + mlp(mixer.token, normed[i, f, :, c])
    if clip:
        x = out
        normed = torch.stack(
            [
                ln(mixer.temporal_norm, x[i, f, k])
                for i in range(b)
                for f in range(t)
                for k in range(n)
            ]
        ).view(b, t, n, d)
        out = x.clone()
        for i in range(b):
            for k in range(n):
                for c in range(d):
                    out[i, :, k, c] = x[i, :, k, c] + mlp(mixer.temporal, normed[i, :, k, c])
    out = out if clip else out.squeeze(1)
    return out - h


@pytest.mark.parametrize("frames", [1, 3])
def test_mixer_matches_loops(frames):
    torch.manual_seed(0)
    mixer = LowRankMixer(
        dim=6, tokens=5, rank_channel=3, rank_token=2, rank_temporal=2, frames=frames
    )
    _randomise(mixer)
    h = torch.randn(2, frames, 5, 6) if frames > 1 else torch.randn(2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(mixer(h), _mixer_by_loops(mixer, h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [0, 24])
def test_recurrence_matches_its_definition(width):
    """a_0 = 0, a_i = a_{i-1} + g_i(a_{i-1} + P b_i), features = pool(b_L + U a_L), with P and U
    the identity at full width and learned projections D -> w -> D in a narrow stream."""
    model = _model()
    cfg = LosaConfig(layers=[0, 2], rank_channel=4, rank_token=3, width=width)
    side = attach_losa(model, cfg)
    _randomise(side)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        blocks = model.backbone.forward_tokens(x)
        down = side.project_down.weight if width else torch.eye(128)
        up = side.project_up.weight if width else torch.eye(128)
        a = torch.zeros(3, blocks[-1].shape[1], width or 128)
        for mixer, i in zip(side.mixers, [0, 2], strict=True):
            a = a + mixer(a + blocks[i] @ down.T)
        expected = model.heads["t"](model.backbone.pool(blocks[-1] + a @ up.T))
        torch.testing.assert_close(model(x), expected)
    assert side.sources == [0, 2, 3]  # the last block is always read
    assert side.width == (width or 128) and hasattr(side, "project_up") == bool(width)


@pytest.mark.parametrize("frames", [1, FRAMES])
@pytest.mark.parametrize("width", [0, 32])
def test_zero_initialised_side_network_is_the_linear_probe(frames, width):
    model = _model()
    x = torch.rand(2, frames, 3, 32, 32) if frames > 1 else torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        probe = model(x)
        attach_losa(model, LosaConfig(frames=frames, width=width))
        torch.testing.assert_close(model(x), probe, atol=0, rtol=0)


@pytest.mark.parametrize("pool", ["backbone", "token", "avg"])
def test_shapes_for_images_and_clips(pool):
    for frames in (1, FRAMES):
        model = _model()
        side = attach_losa(model, LosaConfig(frames=frames, pool=pool, rank_temporal=3))
        x = torch.rand(2, frames, 3, 32, 32) if frames > 1 else torch.rand(2, 3, 32, 32)
        taps = side.taps(model.backbone, x)
        n, d, s = 1 + (32 // 8) ** 2, 128, 4
        assert taps.shape == ((2, s, n, d) if frames == 1 else (2, frames, s, n, d))
        assert side.refine(taps).shape == ((2, n, d) if frames == 1 else (2, frames, n, d))
        assert model(x).shape == (2, 5)
        assert hasattr(side.mixers[0], "temporal") == (frames > 1)
        if frames > 1:
            assert side.mixers[0].temporal.down.out_features == 3


def test_wrong_input_is_refused():
    model = _model()
    attach_losa(model, LosaConfig(frames=FRAMES))
    with pytest.raises(LorexError, match="4-frame clips"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(LorexError, match="2 frames"):
        model(torch.rand(2, 2, 3, 32, 32))
    with pytest.raises(LorexError, match="rank_token"):
        LosaConfig(rank_token=0)
    with pytest.raises(LorexError, match="block 9 does not exist"):
        LosaConfig(layers=[9]).tapped(4)
    with pytest.raises(LorexError, match="width: must be a whole number"):
        LosaConfig(width=-1)
    with pytest.raises(LorexError, match="wider than the backbone's 128"):
        attach_losa(_model(), LosaConfig(width=256))
    with pytest.raises(LorexError, match="did you mean 'rank_token'"):
        LosaConfig.from_dict({"rank_tokens": 4})


def _train(data: ImageDataset, cache: bool, epochs: int = 2, seed: int = 0):
    model = _model(classes=len(data.classes))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=5e-3, seed=seed, feature_cache=cache)
    result = fit(
        model, METHODS["losa"](LosaConfig(rank_channel=8, rank_token=4)), data, cfg, progress=False
    )
    return model, before, result


def test_backbone_gets_no_gradient_and_stays_bit_identical():
    data = load_dataset("digits/optdigits", "train", 96)
    model = _model(classes=10)
    method = METHODS["losa"]()
    method.fit_to_data(data)
    method.prepare(model)
    x = torch.rand(4, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.side.parameters() if p.requires_grad)
    trained, before, result = _train(data, cache=False)
    after = trained.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.trainable_params == sum(p.numel() for p in trained.side.parameters()) + 10 * 129
    changed = [
        n for n, p in trained.side.named_parameters() if "up.weight" in n and p.abs().sum() > 0
    ]
    assert changed, "the side network did not train"


def test_cached_and_uncached_training_agree():
    data = load_dataset("digits/optdigits", "train", 96)
    cached, _, rc = _train(data, cache=True)
    plain, _, rp = _train(data, cache=False)
    assert rc.feature_cache and not rp.feature_cache
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    for ha, hb in zip(rc.history, rp.history, strict=True):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)


def test_memory_mapped_cache_agrees(monkeypatch, caplog):
    from lorex.training import batches as loop

    data = load_dataset("digits/optdigits", "train", 64)
    in_memory, _, _ = _train(data, cache=True, epochs=1)
    monkeypatch.setattr(loop, "CACHE_MEMORY_MB", 0.0)  # every cache goes to a file
    with caplog.at_level("INFO", logger="lorex"):
        mapped, _, _ = _train(data, cache=True, epochs=1)
    assert "memory-mapped file" in caplog.text
    for a, b in zip(in_memory.state_dict().values(), mapped.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_save_and_load_round_trip(tmp_path, tiny_base):
    model = load_model(tiny_base)
    model.add_head("x", ["a", "b", "c"])
    side = attach_losa(model, LosaConfig(layers=[1, 3], rank_channel=4, frames=FRAMES))
    _randomise(side)
    save_model(model, tmp_path / "m", weights="delta", base_dir=tiny_base)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["side"]["config"]["layers"] == [1, 3] and config["side"]["tokens"] == 17
    loaded = load_model(tmp_path / "m")
    x = torch.rand(2, FRAMES, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    config["side"]["config"]["rank_chanel"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorexError, match="did you mean 'rank_channel'"):
        load_model(tmp_path / "m")


def test_from_description_refuses_other_methods():
    with pytest.raises(LorexError, match="'losa'"):
        LosaSideNetwork.from_description({"method": "ladder"}, "cfg")


def test_moving_digits_move_in_the_labelled_direction():
    data = load_dataset("video/moving-digits", "test")
    again = load_dataset("video/moving-digits", "test")
    spec = BUILTINS["video/moving-digits"]  # what `lorex data list` reports without generating
    assert spec.size("test") == len(data) and list(spec.classes) == data.classes
    assert np.array_equal(data.images, again.images)
    assert data.images.shape[1:] == (FRAMES, 32, 32, 3) and data.frames == FRAMES
    assert data.classes == DIRECTIONS
    grey = data.images[:200].astype(np.float64).mean(-1)
    grey = (grey - grey.min(axis=(2, 3), keepdims=True) > 50).astype(np.float64)  # the digit
    rows, cols = np.arange(32)[:, None], np.arange(32)[None, :]
    mass = grey.sum(axis=(2, 3))
    cy, cx = (grey * rows).sum(axis=(2, 3)) / mass, (grey * cols).sum(axis=(2, 3)) / mass
    dy, dx = cy[:, -1] - cy[:, 0], cx[:, -1] - cx[:, 0]
    moves = {0: dx >= 8, 1: dx <= -8, 2: dy >= 8, 3: dy <= -8}  # 3 steps of 3-4 px
    for label, ok in moves.items():
        picked = data.labels[:200] == label
        assert picked.any() and ok[picked].all(), DIRECTIONS[label]


def test_clip_order_matters_only_with_temporal_mixing():
    """Frame-averaged features cannot see the order of frames; a temporal mixer can."""
    model = _model()
    clip = torch.rand(2, FRAMES, 3, 32, 32)
    reverse = clip.flip(1)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), model(reverse))
        side = attach_losa(model, LosaConfig(frames=FRAMES))
        _randomise(side)
        assert not torch.allclose(model(clip), model(reverse), atol=1e-4)
        # Without temporal mixing (rank 0) every mixing step is per frame: order is invisible.
        model.side = None
        side = attach_losa(model, LosaConfig(frames=FRAMES, rank_temporal=0))
        _randomise(side)
        assert not hasattr(side.mixers[0], "temporal")
        torch.testing.assert_close(model(clip), model(reverse))


def test_cli_trains_losa_on_clips_and_reports_efficiency(tmp_path, tiny_base, capsys):
    from lorex.cli import main

    out = tmp_path / "clip-expert"
    argv = ["train", "--base", tiny_base, "--data", "video/moving-digits", "--method", "losa"]
    argv += ["--out", out, "--epochs", "1", "--max-samples", "64", "--rank-temporal", "3"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "efficiency:" in printed and "feature cache on" in printed and "ms/image" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "trainable_params", "peak_train_mb", "train_seconds"):
        assert metrics[key] >= 0
    assert metrics["infer_ms_per_image"] > 0 and metrics["feature_cache"] is True
    model = load_model(out)
    assert (
        model.side.config.frames == FRAMES and model.side.mixers[0].temporal.down.out_features == 3
    )
    assert main(["eval", "--model", str(out), "--data", "video/moving-digits"]) == 0
    assert main(["info", str(out)]) == 0
    assert "side       losa" in capsys.readouterr().out
    merged = tmp_path / "merged"
    code = main(
        ["merge", "--method", "average", "--base", str(tiny_base), "--experts", str(out)]
        + ["--out", str(merged)]
    )
    assert code == 2 and "LoSA side network" in capsys.readouterr().err and not merged.exists()
    assert main(["data", "make", "video/moving-digits", "--out", str(tmp_path / "clips")]) == 2
    assert "no ImageFolder layout" in capsys.readouterr().err
    assert not (tmp_path / "clips").exists()


def test_benchmark_pieces(tmp_path):
    """One in-process training job, the cached-time projection and the report on fixed numbers."""
    from lorex.experiments import losa_bench as bench
    from lorex.experiments import losa_jobs as jobs
    from lorex.experiments import losa_report as report

    job = {
        "kind": "train",
        "task": "digits/optdigits",
        "method": "losa",
        "cache": True,
        "preset": "vit-micro",
        "base": None,
        "image": 48,  # resized, as the vit-base-sized runs are
        "batch": 16,
        "epochs": 1,
        "train_samples": 32,
        "test_samples": 16,
        "lr": 5e-3,
        "seed": 0,
    }
    with pytest.raises(LorexError, match="does not fit"):  # vit-micro takes 32 px
        jobs.run_train_job(job)
    answer = jobs.run_train_job({**job, "image": 32})
    assert answer["feature_cache"] and 0 < answer["cache_seconds"] <= answer["train_seconds"]
    assert answer["trainable_params"] < answer["total_params"]
    resized = jobs._resized(load_dataset("digits/optdigits", "test", 4), 48)
    assert resized.images.shape == (4, 48, 48, 3) and resized.images.dtype == np.uint8

    losa = {"train_seconds_cached": 12.0, "cache_seconds": 2.0}
    projected = report.projected_cached_ratio(losa, {"train_seconds": 100.0}, 5, 100)
    assert projected["losa_epoch"] == pytest.approx(2.0) and projected["lora_epoch"] == 20.0
    assert projected["ratio"] == pytest.approx((2.0 + 100 * 2.0) / (100 * 20.0))

    def method(acc, params, mb, s, **extra):
        keys = ("accuracy", "trainable_params", "peak_train_mb", "train_seconds")
        return {
            **dict(zip(keys, (acc, params, mb, s), strict=True)),
            "infer_ms_per_image": 1.0,
            **extra,
        }

    cached = {"train_seconds_cached": 3.0, "accuracy_cached": 0.5, "cache_seconds": 1.0}
    block = {
        "full": method(0.6, 1000, 300.0, 30.0),
        "lora": method(0.55, 100, 200.0, 20.0),
        "losa": method(0.54, 50, 80.0, 8.0, **cached),
        "tasks": {"t": {}},
        "settings": {
            "preset": "p",
            "image": 32,
            "batch": 8,
            "epochs": 2,
            "train_samples": 10,
            "pretrained": True,
        },
    }
    runs = {m: [{"depth": 4, "params": 1e6, "peak_mb": 100.0}] for m in bench.METHODS}
    sweep = {
        "cap_gb": 1,
        "image": 32,
        "batch": 2,
        "runs": runs,
        "largest_depth": dict.fromkeys(bench.METHODS, 4),
    }
    written = report.write_report({"tiny": block, "base": block, "memory_cap": sweep}, tmp_path)
    text = written.read_text()
    assert "**0.40** (goal <= 0.5)" in text  # memory 80 / 200
    assert "**0.40** without the cache" in text and "**0.15** with it" in text
    assert "**-1.0** points" in text
    assert (tmp_path / "losa_costs.png").stat().st_size > 1000
    assert (
        json.loads((tmp_path / "results.json").read_text())["tiny"]["losa"]["train_seconds"] == 8.0
    )


def test_benchmark_jobs_resume(tmp_path, monkeypatch):
    """A stopped benchmark resumes: saved answers are reused, failed jobs run again."""
    from lorex.experiments import losa_bench as bench

    calls = []

    def worker(job):
        calls.append(job["n"])
        return {"error": "boom"} if job["n"] == 2 else {"value": job["n"] * 10}

    monkeypatch.setattr(bench, "_worker", worker)
    reused = [0]
    for _ in range(2):
        answers = [bench._saved_worker({"n": n}, tmp_path / "jobs", reused) for n in (1, 2)]
    assert answers == [{"value": 10}, {"error": "boom"}]
    assert calls == [1, 2, 2] and reused == [1]
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 1
