"""Checkpoints and resume: a killed run, resumed, ends bit-identical to one never stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorex.cli import main
from lorex.data import ImageDataset
from lorex.errors import LorexError
from lorex.io import save_tensors
from lorex.models import load_model
from lorex.training import checkpoint as checkpoint_module
from lorex.training.checkpoint import Checkpointer, CheckpointOptions, work_directory
from lorex.training.config import TrainConfig
from lorex.training.engine import TrainingDiverged
from lorex.training.methods import TRAINING_METHODS as METHODS
from lorex.training.objectives.classification import fit

CPU = torch.device("cpu")
TRAIN = ["--data", "digits/mnist", "--method", "full", "--augment", "--epochs", "2"]
TRAIN += ["--max-samples", "256", "--batch-size", "16", "--checkpoint-every", "1"]
TOTAL_STEPS = 32  # 2 epochs x 256 / 16


def checkpoint_step(path: Path) -> int:
    """The step recorded in a checkpoint's header (0 when there is none yet)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return 0
    return json.loads(header["__metadata__"]["lorex_checkpoint"])["step"]


def lorex_process(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lorex", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after(proc: subprocess.Popen, ckpt: Path, step: int, timeout: float = 120.0) -> int:
    """SIGKILL ``proc`` as soon as its checkpoint has reached ``step``; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = checkpoint_step(ckpt)
        if seen >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.slow  # subprocesses killed
def test_sigkill_at_three_random_steps_then_resume_is_bit_identical(tiny_base, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    common = ["train", "--base", str(tiny_base), *TRAIN]
    done = subprocess.run(
        [sys.executable, "-m", "lorex", *common, "--out", str(ref)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not work_directory(ref).exists()  # the checkpoint goes once the expert is written

    ckpt = work_directory(out) / checkpoint_module.CHECKPOINT_FILE
    points = sorted(random.Random(8).sample(range(2, TOTAL_STEPS - 1), 3))
    killed_at = []
    for i, point in enumerate(points):
        proc = lorex_process([*common, "--out", str(out), *(["--resume"] if i else [])])
        killed_at.append(kill_after(proc, ckpt, point))
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()  # nothing at the target that looks complete
    assert killed_at == sorted(killed_at) and len(set(killed_at)) == 3, killed_at
    assert all(s < TOTAL_STEPS for s in killed_at)
    done = subprocess.run(
        [sys.executable, "-m", "lorex", *common, "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    same_weights(ref, out)
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_out = json.loads((out / "metrics.json").read_text())
    assert m_out["accuracy"] == m_ref["accuracy"]
    assert m_out["history"] == m_ref["history"]
    assert not work_directory(out).exists()


def tiny_data(n: int = 48, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    return ImageDataset(images, labels, [str(i) for i in range(10)], "noise")


def fit_once(base, cfg, options, method="lora", data=None):
    model = load_model(base)
    data = data or tiny_data()
    model.add_head("noise", data.classes)
    result = fit(model, METHODS[method](), data, cfg, checkpoint=options, progress=False)
    return model, result


@pytest.mark.parametrize("stop_at", [1, 4, 6])  # mid first epoch, mid second, after the last step
def test_fit_resumes_at_any_step_bit_identically(tiny_base, tmp_path, stop_after_saves, stop_at):
    cfg = TrainConfig(epochs=2, batch_size=16, augment=True, seed=3)
    ref, _ = fit_once(tiny_base, cfg, None)
    options = CheckpointOptions(tmp_path / "work", every=1)
    with pytest.raises(stop_after_saves(stop_at)):
        fit_once(tiny_base, cfg, options)
    torch.manual_seed(12345)  # a resumed run must not depend on the process's RNG state
    np.random.seed(12345)
    resumed, result = fit_once(tiny_base, cfg, CheckpointOptions(tmp_path / "work", 1, True))
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert len(result.history) == 2
    result.checkpoint.discard()
    assert not (tmp_path / "work").exists()


def test_resume_refuses_a_checkpoint_made_with_other_settings(
    tiny_base, tmp_path, stop_after_saves
):
    options = CheckpointOptions(tmp_path / "work", every=1)
    with pytest.raises(stop_after_saves(2)):
        fit_once(tiny_base, TrainConfig(epochs=1, batch_size=16, seed=0), options)
    resume = CheckpointOptions(tmp_path / "work", 1, True)
    with pytest.raises(LorexError, match="made with another 'config'"):
        fit_once(tiny_base, TrainConfig(epochs=1, batch_size=16, seed=1), resume)


def test_a_corrupt_checkpoint_is_a_one_line_refusal(tiny_base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / checkpoint_module.CHECKPOINT_FILE).write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(LorexError, match="not a valid lorex checkpoint"):
        fit_once(tiny_base, TrainConfig(epochs=1, batch_size=16), CheckpointOptions(work, 1, True))


def test_without_resume_an_old_checkpoint_is_replaced(tiny_base, tmp_path, stop_after_saves):
    options = CheckpointOptions(tmp_path / "work", every=1)
    cfg = TrainConfig(epochs=1, batch_size=16)
    with pytest.raises(stop_after_saves(1)):
        fit_once(tiny_base, cfg, options)
    ref, _ = fit_once(tiny_base, cfg, None)
    again, _ = fit_once(tiny_base, cfg, options)  # starts over: same as a fresh run
    for (k, a), (_, b) in zip(ref.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny_base, tmp_path, monkeypatch
):
    import lorex.training.objectives.classification as loop

    calls = {"n": 0}
    original = loop.F.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    options = CheckpointOptions(tmp_path / "work", every=1)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is kept") as err:
        fit_once(tiny_base, TrainConfig(epochs=1, batch_size=16), options)
    assert "\n" not in str(err.value)
    ckpt = tmp_path / "work" / checkpoint_module.CHECKPOINT_FILE
    assert checkpoint_step(ckpt) == 2  # the two good steps; the bad one never ran
    tensors = load_file(ckpt)
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())


def test_checkpoint_holds_every_rng_and_restores_them(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    ckpt = Checkpointer(CheckpointOptions(tmp_path, 1), {"a": 1}, model, opt, None, {"g": gen})
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    ckpt.save(1, {"note": "x"}, {"order": torch.arange(4)})
    expected = (torch.rand(2), np.random.rand(2), random.random(), torch.rand(2, generator=gen))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    gen.manual_seed(0)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    gen2 = torch.Generator()
    again = Checkpointer(
        CheckpointOptions(tmp_path, 1, True), {"a": 1}, model2, opt2, None, {"g": gen2}
    )
    step, position, arrays = again.restore()
    assert (step, position) == (1, {"note": "x"})
    assert torch.equal(arrays["order"], torch.arange(4))
    got = (torch.rand(2), np.random.rand(2), random.random(), torch.rand(2, generator=gen2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
    assert torch.equal(model2.weight, model.weight)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for name, value in s1["state"][i].items():
            assert torch.equal(value, s2["state"][i][name])


def test_cli_resume_options(tiny_base, tmp_path, capsys):
    out = tmp_path / "e"
    args = ["train", "--base", str(tiny_base), "--data", "digits/mnist", "--out", str(out)]
    assert main([*args, "--resume", "--no-checkpoint"]) == 2
    assert "--resume and --no-checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*args, "--checkpoint-every", "0"])
    assert exc.value.code == 2
    capsys.readouterr()
    save_tensors(work_directory(out) / "checkpoint.safetensors", {"x": torch.zeros(1)})
    assert main([*args, "--resume", "--epochs", "1", "--max-samples", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.safetensors: not a valid lorex checkpoint" in err and "\n" not in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# checkpoints written before the engine (lorex's six own loops) still resume
# --------------------------------------------------------------------------------------------


def _micro_source():
    from lorex.backbones import build_backbone, preset_config
    from lorex.models import LorexModel

    torch.manual_seed(0)
    cfg = preset_config("vit-micro")
    model = LorexModel(build_backbone(cfg), cfg)
    model.add_head("shapes", ["a", "b", "c"])
    return model


def _rewrite_position(path: Path, old_layout) -> None:
    """Give a checkpoint the position layout of the loop it had before the engine."""
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["lorex_checkpoint"])
    tensors = load_file(path)
    meta["position"] = old_layout(meta["position"])
    save_tensors(path, tensors, metadata={"lorex_checkpoint": json.dumps(meta)})


@pytest.mark.parametrize("loop", ["transfer", "tgmb"])
def test_a_checkpoint_from_before_the_engine_resumes_bit_identically(
    tmp_path, stop_after_saves, loop
):
    from lorex.adaptation.cross_modal.config import CrossModalConfig
    from lorex.adaptation.cross_modal.objectives import train_target_model, train_translator

    source = _micro_source()
    g = torch.Generator().manual_seed(0)
    target, ti_t, ti_rgb = (
        torch.rand(n, c, 32, 32, generator=g) for n, c in ((20, 1), (12, 1), (12, 3))
    )
    if loop == "transfer":  # its position named the batch "step"
        cfg = CrossModalConfig(epochs=2, batch_size=8, stats_weight=0, ti_weight=0, kd_weight=0)

        def run(options):
            model, result = train_target_model(source, target, cfg, CPU, checkpoint=options)
            return model.state_dict(), result.history

        def old_layout(p):
            return {
                "epoch": p["epoch"],
                "step": p["batch"],
                "sums": p["sums"],
                "history": p["history"],
            }
    else:  # one epoch: its position had neither epoch nor batch
        cfg = CrossModalConfig(translator_steps=6, batch_size=8)

        def run(options):
            net, history = train_translator(
                source, ti_t, ti_rgb, target, cfg, CPU, checkpoint=options
            )
            return net.state_dict(), history

        def old_layout(p):
            return {"history": p["history"], "running": p["running"]}

    ref_state, ref_history = run(None)
    with pytest.raises(stop_after_saves(3)):
        run(CheckpointOptions(tmp_path, every=1))
    _rewrite_position(tmp_path / checkpoint_module.CHECKPOINT_FILE, old_layout)
    state, history = run(CheckpointOptions(tmp_path, 1, True))
    assert history == ref_history
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
