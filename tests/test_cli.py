import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lorex
from lorex.cli import main


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_for_every_subcommand(capsys):
    for cmd in (
        ["data", "list"],
        ["data", "make"],
        ["pretrain"],
        ["train"],
        ["eval"],
        ["info"],
        ["import-timm"],
        ["demo"],
    ):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: lorex" in capsys.readouterr().out


def test_pretrain_train_eval_info_end_to_end(tmp_path, capsys):
    base = tmp_path / "base"
    code, out, _ = run(
        capsys,
        "pretrain",
        "--preset",
        "vit-micro",
        "--data",
        "digits/mnist",
        "--out",
        base,
        "--epochs",
        "1",
        "--max-samples",
        "200",
        "--batch-size",
        "50",
    )
    assert code == 0 and "pretrained" in out
    for method in ("linear", "full"):
        expert = tmp_path / method
        code, out, _ = run(
            capsys,
            "train",
            "--base",
            base,
            "--data",
            "digits/optdigits",
            "--method",
            method,
            "--out",
            expert,
            "--epochs",
            "1",
            "--max-samples",
            "100",
        )
        assert code == 0, out
        metrics = json.loads((expert / "metrics.json").read_text())
        for key in (
            "accuracy",
            "trainable_params",
            "train_seconds",
            "peak_rss_mb",
            "peak_train_mb",
        ):
            assert key in metrics
        assert (expert / "train_curve.png").stat().st_size > 1000
        code, out, _ = run(
            capsys,
            "eval",
            "--model",
            expert,
            "--data",
            "digits/optdigits",
            "--json",
            tmp_path / f"{method}.json",
        )
        assert code == 0
        result = json.loads((tmp_path / f"{method}.json").read_text())
        assert result["accuracy"] == pytest.approx(metrics["accuracy"])
        assert f"{result['accuracy']:.4f}" in out
    linear = json.loads((tmp_path / "linear" / "metrics.json").read_text())
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert linear["trainable_params"] < full["trainable_params"]
    code, out, _ = run(capsys, "info", tmp_path / "linear")
    assert code == 0 and "digits/optdigits" in out and "base" in out
    model = lorex.load_model(tmp_path / "full")
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.backbone(x).shape == (2, model.num_features)


def test_data_list_and_make(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    for name in (
        "digits/mnist",
        "digits/mnistm",
        "digits/syn",
        "digits/optdigits",
        "pretrain/chars",
    ):
        assert name in out
    code, _, _ = run(
        capsys, "data", "make", "digits/syn", "--out", tmp_path / "syn", "--max-samples", "20"
    )
    assert code == 0
    files = sorted((tmp_path / "syn" / "train").glob("*/*.png"))
    assert len(files) == 20 and len(list((tmp_path / "syn" / "test").glob("*/*.png"))) == 20
    assert Image.open(files[0]).size == (32, 32)
    # The exported folder works wherever a dataset name does.
    data = lorex.data.load_dataset(str(tmp_path / "syn"), "test")
    assert len(data) == 20 and data.classes == [str(d) for d in range(10)]


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, tiny_base):
    code, _, err = run(capsys, "eval", "--model", tmp_path / "nope", "--data", "digits/mnist")
    _one_line_error(code, err, "nope", "not found")
    code, _, err = run(capsys, "eval", "--model", tiny_base, "--data", "digits/mnsit")
    _one_line_error(code, err, "unknown dataset", "digits/mnist")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_base / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "eval", "--model", broken, "--data", "digits/mnist")
    _one_line_error(code, err, "model.safetensors", "not a valid safetensors")
    small = tmp_path / "small" / "test" / "3"
    small.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(small / f"{i}.png")
    for d in range(10):
        (tmp_path / "small" / "test" / str(d)).mkdir(exist_ok=True)
    code, _, err = run(capsys, "eval", "--model", tiny_base, "--data", tmp_path / "small")
    _one_line_error(code, err, "32, 32")
    for option, value in (("--epochs", "0"), ("--lr", "-1"), ("--batch-size", "x")):
        argv = ["train", "--base", tiny_base, "--data", "digits/mnist", "--out", tmp_path / "x"]
        code, _, err = run(capsys, *argv, option, value)
        _one_line_error(code, err, option)
    assert not (tmp_path / "x").exists()


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorex", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "missing" in proc.stderr


def test_output_cut_short_by_its_reader_exits_quietly(tmp_path):
    """``lorex data list | head -1``: no traceback when the reader has closed the pipe (here
    before the first write, so the outcome does not depend on timing)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "LOREX_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "lorex", "data", "list"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists()  # listing generates nothing


@pytest.mark.slow  # the whole demo
def test_demo_end_to_end_on_tiny_settings(tmp_path):
    from lorex.experiments.demo import QUICK, replace, run_demo

    tiny = replace(
        QUICK,
        pretrain_samples=200,
        pretrain_epochs=1,
        expert_samples=60,
        expert_epochs=1,
        linear_epochs=2,
        test_samples=40,
        domains=("digits/mnist", "digits/optdigits"),
        frozen_head_experts=True,
        small_lr=1e-4,
        merge_kinds=("full", "frozen-head", "frozen-head-small-lr"),
        reid=False,  # tests/test_sage.py runs the re-ID part (lorex bench sage) on tiny settings
        cross_modal=False,  # tests/test_cross_modal.py runs lorex bench cross-modal on tiny ones
    )
    report = run_demo(tmp_path / "demo", settings=tiny)
    text = report.read_text()
    assert "Accuracy matrix" in text and "optdigits" in text
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert np.asarray(metrics["accuracy_matrix"]).shape == (2, 2)
    assert (tmp_path / "demo" / "accuracy_matrix.png").stat().st_size > 1000
    lora_expert = metrics["experts"]["digits/mnist"]["lora"]
    assert lora_expert["adapter_bytes"] > 0
    assert (
        lora_expert["trainable_params"]
        < metrics["experts"]["digits/mnist"]["full"]["trainable_params"]
    )
    assert "LoRA r8 %" in text
    losa = metrics["experts"]["digits/mnist"]["losa"]
    assert losa["feature_cache"] and losa["infer_ms_per_image"] > 0
    assert losa["trainable_params"] < lora_expert["trainable_params"]
    efficiency = text.split("## Efficiency")[1].split("##")[0]
    assert all(f"| {m} |" in efficiency for m in ("linear", "full", "lora", "losa"))
    assert "merging the experts without data" in text and "`dare-ties`" in text
    stages = metrics["stage_seconds"]  # where the time went: every stage, timed
    assert any(k.startswith("losa expert on digits/mnist") for k in stages)
    assert {"evaluation", "merge the full experts"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) > 0
    from lorex.models import load_model

    frozen = load_model(tmp_path / "demo" / "experts" / "mnist" / "frozen-head")
    probe = load_model(tmp_path / "demo" / "experts" / "mnist" / "linear")
    key = probe.active_head
    assert torch.equal(frozen.heads[key].weight, probe.heads[key].weight)
    assert "frozen-head experts" in text and "frozen-head-small-lr experts" in text
    assert set(metrics["merge"]) == {"full", "frozen-head", "frozen-head-small-lr"}
    # the small-step experts: under the same frozen head, and a tenth of the step moves the
    # backbone far less from the base
    small = load_model(tmp_path / "demo" / "experts" / "mnist" / "frozen-head-small-lr")
    assert torch.equal(small.heads[key].weight, probe.heads[key].weight)
    base = load_model(tmp_path / "demo" / "base").backbone.state_dict()

    def distance(model):
        state = model.backbone.state_dict()
        return sum(float((state[k] - base[k]).square().sum()) for k in base) ** 0.5

    assert 0 < distance(small) < 0.5 * distance(frozen)
    merged = metrics["merge"]["full"]
    assert list(merged) == [
        "experts",
        "average",
        "task-arithmetic",
        "ties",
        "dare",
        "dare-ties",
        "iso-c",
        "tsv-m",
    ]
    for result in list(merged.values())[1:]:
        assert set(result["per_task"]) == {"mnist", "optdigits"}
        assert 0 <= result["normalized"] <= 200 and result["seconds"] >= 0
    # The merge benchmark's pieces on the same experts (DOGE shortened to 2 steps).
    from lorex.experiments.merge_bench import score_merges, write_merge_report

    lora_results = score_merges(
        tmp_path / "demo",
        tmp_path / "merged",
        list(tiny.domains),
        "lora",
        methods=(("doge (eta auto)", "doge", {"eta": "auto", "steps": 2}),),
        test_samples=40,
    )
    report_md = write_merge_report({"lora": lora_results}, tmp_path / "bench", "tiny")
    assert "doge (eta auto)" in report_md.read_text()
    assert (tmp_path / "bench" / "merge_lora.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["lora"]["experts"]
    stamp = (
        (tmp_path / "demo" / "experts" / "mnist" / "full" / "model.safetensors").stat().st_mtime_ns
    )
    run_demo(tmp_path / "demo", settings=tiny)  # a second run reuses every finished stage
    assert (
        tmp_path / "demo" / "experts" / "mnist" / "full" / "model.safetensors"
    ).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_cli_starts_without_scikit_learn():
    """Every lorex command imports the whole CLI; scikit-learn (and pandas with it, when
    installed) is loaded only by the SAGE step that clusters, not at start-up (it was ~3 s of
    every command, `lorex merge` included)."""
    code = "import sys, lorex.cli; print('sklearn' in sys.modules, 'pandas' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
