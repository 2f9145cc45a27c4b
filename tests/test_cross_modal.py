"""Cross-modal transfer end to end on tiny settings: statistics, the training loop, TGMB, the
pipeline's guarantee that task-relevant RGB is never read, the CLI and the bench."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lorex.adaptation.cross_modal import CrossModalConfig, adapt_cross_modal
from lorex.adaptation.cross_modal.objectives import train_target_model, train_translator
from lorex.adaptation.cross_modal.tgmb import translate
from lorex.cli import main
from lorex.data import load_dataset, load_paired, paired
from lorex.experiments.cross_modal_bench import CrossModalBenchSettings, Task, run_cross_modal_bench
from lorex.models import load_model
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import train_expert
from lorex.training.feature_stats import feature_statistics, load_statistics
from lorex.training.methods import TRAINING_METHODS as METHODS

TINY = CrossModalConfig(
    epochs=1, batch_size=16, translator_steps=4, max_target_samples=48, max_ti_samples=32
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def source(tiny_base, tmp_path_factory):
    """A tiny RGB source of sensor k1's shape classes, with its feature statistics."""
    out = tmp_path_factory.mktemp("cross-modal") / "source"
    cfg = TrainConfig(epochs=1, batch_size=32, max_samples=120)
    train_expert(tiny_base, "rgbd/k1/rgb", METHODS["full"](), out, cfg, feature_stats=True)
    return out


def test_recorded_statistics_are_those_of_the_training_images(source):
    means, variances = load_statistics(source, CPU)
    model = load_model(source)
    x, _ = load_dataset("rgbd/k1/rgb", "train", 120, 0).tensors()
    again = feature_statistics(model, x, CPU, batch=7)  # other batches, same statistics
    for a, b in zip(means + variances, again[0] + again[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Independent reference: every token of every image at once.
    with torch.no_grad():
        tokens = model.backbone.forward_tokens(x)
    flat = tokens[2].reshape(-1, tokens[2].shape[-1])
    torch.testing.assert_close(means[2], flat.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(variances[2], flat.var(0, unbiased=False), rtol=1e-4, atol=1e-5)


def _inputs(source):
    model = load_model(source)
    target = load_paired("rgbd/k2", "train", with_rgb=False, max_samples=32).target_tensor()
    ti = load_paired("rgbd/ti", "train", max_samples=16)
    with torch.no_grad():
        ti_feats = model.features(ti.rgb_tensor())
    return model, target, ti.target_tensor(), ti.rgb_tensor(), ti_feats


def test_target_training_is_deterministic_and_keeps_the_classifier(source):
    model, target, ti_t, _, ti_feats = _inputs(source)
    teacher = torch.randn(
        len(target), len(model.classes), generator=torch.Generator().manual_seed(0)
    )
    stats = load_statistics(source, CPU)
    cfg = CrossModalConfig(epochs=2, batch_size=8)
    runs = [
        train_target_model(model, target, cfg, CPU, ti_t, ti_feats, teacher, stats)[0]
        for _ in range(2)
    ]
    a, b = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    src = model.state_dict()
    head = [k for k in src if k.startswith("heads.")]
    assert head and all(torch.equal(a[k], src[k]) for k in head)
    assert not torch.equal(
        a["backbone.blocks.0.attn.qkv.weight"], src["backbone.blocks.0.attn.qkv.weight"]
    )
    assert torch.equal(
        model.state_dict()["backbone.blocks.0.attn.qkv.weight"],
        src["backbone.blocks.0.attn.qkv.weight"],
    )


@pytest.mark.parametrize("refresh", [True, False])
def test_the_refreshed_teacher_averages_in_the_models_own_reading(source, monkeypatch, refresh):
    """Epoch 1 distils the fixed teacher; with kd_refresh, every later epoch distils the fixed
    teacher's probabilities averaged with the model's reading at that epoch's start, balanced."""
    from lorex.adaptation.cross_modal import objectives as transfer

    model, target, ti_t, _, ti_feats = _inputs(source)
    fixed = torch.randn(len(target), len(model.classes), generator=torch.Generator().manual_seed(1))
    seen, readings = [], []
    original_reading, original_kl = transfer.features_and_logits, transfer.kl_distillation

    def reading(*args, **kwargs):
        feats, logits = original_reading(*args, **kwargs)
        readings.append(logits)
        return feats, logits

    def kl(student, teacher, *args):
        seen.append((len(readings), teacher.clone()))
        return original_kl(student, teacher, *args)

    monkeypatch.setattr(transfer, "features_and_logits", reading)
    monkeypatch.setattr(transfer, "kl_distillation", kl)
    cfg = CrossModalConfig(epochs=2, batch_size=8, kd_refresh=refresh, kd_weight=1.0)
    train_target_model(model, target, cfg, CPU, ti_t, ti_feats, fixed, load_statistics(source, CPU))
    assert len(readings) == 2  # one reading per epoch start (the self-labels need it too)
    # the expected teacher, computed here from the definition
    p = (fixed.softmax(1) + readings[1].softmax(1)) / 2
    p = p / p.mean(0, keepdim=True)
    refreshed = torch.log(p / p.sum(1, keepdim=True))

    def rows_of(batch, table):  # each row of the batch is one of the table's rows
        return bool(((batch[:, None] - table[None]).abs().amax(-1).min(1).values < 1e-5).all())

    first = [t for n, t in seen if n == 1]
    later = [t for n, t in seen if n == 2]
    assert first and later and all(rows_of(t, fixed) for t in first)
    assert all(rows_of(t, refreshed if refresh else fixed) for t in later)
    assert refresh == (not any(rows_of(t, fixed) for t in later))


def test_a_weighted_term_needs_its_inputs(source):
    model, target, *_ = _inputs(source)
    with pytest.raises(ValueError, match="needs its inputs"):
        train_target_model(model, target, CrossModalConfig(epochs=1, batch_size=8), CPU)
    cfg = CrossModalConfig(epochs=1, batch_size=8, kd_weight=0, ti_weight=0, stats_weight=0)
    train_target_model(model, target, cfg, CPU)  # SHOT's terms need nothing else


def test_tgmb_learns_the_paired_mapping_and_is_deterministic(source):
    model, target, ti_t, ti_rgb, _ = _inputs(source)
    cfg = CrossModalConfig(translator_steps=60, batch_size=16, translator_lr=5e-3)
    net, history = train_translator(model, ti_t, ti_rgb, target, cfg, CPU)
    assert history[-1]["rec"] < history[0]["rec"]
    again, _ = train_translator(model, ti_t, ti_rgb, target, cfg, CPU)
    torch.testing.assert_close(
        translate(net, ti_t, CPU), translate(again, ti_t, CPU), rtol=0, atol=0
    )
    assert set(history[0]) == {"step", "rec", "im", "adv", "critic"}
    feat = CrossModalConfig(translator_steps=2, batch_size=8, tgmb_feat_weight=1.0)
    with pytest.raises(ValueError, match="tgmb_feat_weight"):
        train_translator(model, ti_t, ti_rgb, target, feat, CPU)
    with torch.no_grad():
        ti_feats = model.features(ti_rgb)
    _, history = train_translator(model, ti_t, ti_rgb, target, feat, CPU, None, ti_feats)
    assert history[-1]["feat"] > 0


def _write_folder(name: str, root: Path, per_split: int) -> None:
    assert main(["data", "make", name, "--out", str(root), "--max-samples", str(per_split)]) == 0


def test_adaptation_never_reads_task_relevant_rgb(source, tmp_path, monkeypatch):
    target_dir, ti_dir = tmp_path / "target", tmp_path / "ti"
    _write_folder("rgbd/k2", target_dir, 36)
    _write_folder("rgbd/ti", ti_dir, 32)
    real = paired.read_rgb

    def guarded(src):
        paths = [Path(p) for p in src] if not isinstance(src, np.lib.npyio.NpzFile) else []
        if any(target_dir in p.parents for p in paths) or isinstance(src, np.lib.npyio.NpzFile):
            raise AssertionError("task-relevant RGB was read")
        return real(src)

    monkeypatch.setattr(paired, "read_rgb", guarded)
    out = tmp_path / "adapted"
    metrics = adapt_cross_modal(
        source, str(target_dir), str(ti_dir), out, ["all", "ablations"], TINY, CPU
    )
    expected = {"source-only", "shot", "socket", "tgmb-tgkt", "tgmb-only", "tgmb-tgkt-no-ti",
                "tgmb-tgkt-no-self", "tgmb-tgkt-no-adv", "tgmb-tgkt-no-im",
                "tgmb-tgkt-paper-teacher", "tgmb-tgkt-fixed-teacher"}  # fmt: skip
    assert set(metrics["methods"]) == expected
    for r in metrics["methods"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
    assert metrics["source_statistics"].startswith("recorded")
    assert metrics["saved_model"] == "source-only"  # the first method, by default
    for name in ("metrics.json", "report.md", "translations.png", "translator.safetensors"):
        assert (out / name).is_file()
    assert load_model(out).classes == load_model(source).classes  # source-only: the source


def test_cli_adapt_cross_modal_and_its_refusals(source, tmp_path, capsys):
    args = ["adapt", "cross-modal", "--source", str(source), "--target", "rgbd/k2"]
    tiny = ["--epochs", "1", "--batch-size", "16", "--translator-steps", "3",
            "--max-target-samples", "48", "--max-ti-samples", "32"]  # fmt: skip
    out = tmp_path / "cli"
    assert main([*args, "--ti", "rgbd/ti", "--out", str(out), "--method", "shot", *tiny]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["shot"] and metrics["config"]["epochs"] == 1
    assert "shot: accuracy" in capsys.readouterr().out
    bad = tmp_path / "bad"
    for extra, message in (
        (["--ti", "rgbnir/ti"], "TI pairs are RGB-nir"),
        (["--ti", "rgbd/k1"], "TI classes must be outside the task"),
        (["--ti", "rgbd/ti", "--method", "sockett"], "unknown cross-modal method"),
        (["--ti", "rgbd/ti", "--kd-weight", "-1"], "invalid kd_weight"),
        (["--ti", "nowhere/at/all"], "unknown paired set"),
    ):
        assert main([*args, *extra, "--out", str(bad), *tiny]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()


def test_a_source_with_other_classes_is_refused(tiny_base, tmp_path, capsys):
    code = main(["adapt", "cross-modal", "--source", str(tiny_base), "--target", "rgbd/k2",
                 "--ti", "rgbd/ti", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "differ from the source head's" in capsys.readouterr().err


@pytest.mark.slow  # a whole bench
def test_bench_end_to_end_on_tiny_settings(tiny_base, tmp_path):
    settings = CrossModalBenchSettings(
        tasks=(Task("rgbd k1->k2", "rgbd/k1/rgb", "rgbd/k2", "rgbd/ti"),),
        methods=("source-only", "shot", "socket", "tgmb-tgkt"),
        config=TINY,
        source_epochs=1,
        source_samples=60,
    )
    summary = run_cross_modal_bench(tmp_path, settings=settings, base=tiny_base)
    task = summary["tasks"]["rgbd k1->k2"]
    assert set(task) == {"source-only", "shot", "socket", "tgmb-tgkt"}
    assert all(0 <= v["accuracy"] <= 1 for v in task.values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rgbd k1->k2"]["tgmb-tgkt"]["accuracy"] == task["tgmb-tgkt"]["accuracy"]
    task_metrics = json.loads((tmp_path / "tasks" / "rgbd_k1-to-k2" / "metrics.json").read_text())
    assert task_metrics["saved_model"] == "tgmb-tgkt"  # the bench keeps the method's own model
    assert (tmp_path / "results.md").is_file() and (tmp_path / "translations.png").is_file()
    for report in (tmp_path / "results.md", tmp_path / "tasks" / "rgbd_k1-to-k2" / "report.md"):
        for table in report.read_text().split("\n\n"):  # every row as wide as its header
            widths = {line.count("|") for line in table.splitlines() if line.startswith("|")}
            assert len(widths) <= 1, (report.name, table)
    # A rerun reuses the finished source and task.
    stamp = (tmp_path / "tasks" / "rgbd_k1-to-k2" / "metrics.json").stat().st_mtime_ns
    again = run_cross_modal_bench(tmp_path, settings=settings, base=tiny_base)
    assert again["tasks"]["rgbd k1->k2"] == task
    assert set(json.loads((tmp_path / "summary.json").read_text())["goals"]) >= {"gain_over_socket"}
    assert (tmp_path / "tasks" / "rgbd_k1-to-k2" / "metrics.json").stat().st_mtime_ns == stamp
    # The demo's report section reads the same summary.
    from lorex.experiments.demo_report import _cross_modal_section

    section = _cross_modal_section(summary)
    assert "| rgbd k1->k2 | tgmb-tgkt |" in section and _cross_modal_section(None) == ""


def test_tgmb_stopped_mid_way_resumes_bit_identically(source, tmp_path, stop_after_saves):
    from lorex.training.checkpoint import CheckpointOptions

    model, target, ti_t, ti_rgb, _ = _inputs(source)
    cfg = CrossModalConfig(translator_steps=5, batch_size=8)  # the critic trains too
    ref, ref_history = train_translator(model, ti_t, ti_rgb, target, cfg, CPU)
    work = CheckpointOptions(tmp_path / "tgmb", every=1)
    with pytest.raises(stop_after_saves(2)):
        train_translator(model, ti_t, ti_rgb, target, cfg, CPU, None, None, work)
    resume = CheckpointOptions(tmp_path / "tgmb", every=1, resume=True)
    net, history = train_translator(model, ti_t, ti_rgb, target, cfg, CPU, None, None, resume)
    a, b = ref.state_dict(), net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and history == ref_history


def test_adapt_cross_modal_stopped_mid_method_resumes_bit_identically(
    source, tmp_path, stop_after_saves
):
    from lorex.io import load_tensors
    from lorex.training.checkpoint import CheckpointOptions

    methods = ["tgmb-tgkt", "shot"]
    cfg = replace(TINY, epochs=2)  # the second epoch's refreshed teacher must resume too
    ref = adapt_cross_modal(source, "rgbd/k2", "rgbd/ti", tmp_path / "ref", methods, cfg, CPU)
    out = tmp_path / "out"
    # saves 1-4: the translator; 5-10: TGMB + TGKT's target model (3 a epoch); 11-16: SHOT
    with pytest.raises(stop_after_saves(9)):
        adapt_cross_modal(
            source, "rgbd/k2", "rgbd/ti", out, methods, cfg, CPU,
            checkpoint=CheckpointOptions(every=1),
        )  # fmt: skip
    assert not out.exists()
    got = adapt_cross_modal(
        source, "rgbd/k2", "rgbd/ti", out, methods, cfg, CPU,
        checkpoint=CheckpointOptions(every=1, resume=True),
    )  # fmt: skip
    for name in ("model.safetensors", "translator.safetensors"):
        x, y = load_tensors(tmp_path / "ref" / name), load_tensors(out / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    for method in methods:
        for key in ("accuracy", "test_accuracy", "history"):
            assert got["methods"][method][key] == ref["methods"][method][key], (method, key)
    assert not (tmp_path / "out.parts").exists()
