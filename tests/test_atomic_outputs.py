"""A run killed at any moment (SIGKILL: no cleanup code runs) leaves the previous output intact.

Each command that writes a directory builds it beside the target (``.OUT.HOST-PID-XXXX.partial``)
and swaps it into place only when it is complete. Here ``lorex merge``, ``lorex data make`` and
``lorex train`` each write an output, are started again into the same ``--out`` as a separate
process and SIGKILLed: mid-work (merge, while DOGE optimises and the weights file is half
written) and at the worst moment of all (data make and train: the new output complete in its
temporary directory, the rename not yet done). The previous output must be byte-identical,
nothing complete-looking may sit outside it but the clearly temporary ``.partial``, and the next
run must complete and remove what the killed one left.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.cli import main
from lorex.models import LorexModel, save_model

# Subprocesses killed mid-run: `pytest -m "not slow"` leaves them out; CI runs them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(type="vit", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
MARKS = ("config.json", "model.safetensors", "train")  # what a complete output holds

# Runs lorex's CLI as ``python -m lorex`` would (argv: MODE READY GO COMMAND...). It imports
# everything first and starts only once GO exists, so the slow imports overlap the test's own
# first run. MODE "pause": stop for good just before the finished temporary directory would be
# renamed into place, after writing its path to READY; the test kills it there.
RUNNER = """
import sys, time
from pathlib import Path
import lorex.io
from lorex.cli import build_parser, main
build_parser()
def paused(tmp, target):
    Path(sys.argv[2]).write_text(str(tmp))
    time.sleep(600)
if sys.argv[1] == "pause":
    lorex.io._swap_into_place = paused
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
sys.exit(main(sys.argv[4:]))
"""


def _fresh() -> LorexModel:
    return LorexModel(VisionTransformer(ViTConfig.from_dict(TINY)), TINY)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny base, three full experts fine-tuned from it (base + noise), and a small
    ImageFolder of 16x16 images (train/test, two classes) that the base can train on."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = _fresh()
    base.add_head("pretrain", ["a", "b"])
    save_model(base, root / "base")
    backbone = {k: v for k, v in base.state_dict().items() if k.startswith("backbone.")}
    for i in range(3):
        model = _fresh()
        model.load_state_dict(backbone, strict=False)
        model.add_head(f"t{i}", ["x", "y"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape))
        save_model(model, root / f"t{i}")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, cls in enumerate(("dark", "light")):
            (root / "images" / split / cls).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 100, (16, 16, 3)) + 120 * c
                Image.fromarray(pixels.astype(np.uint8)).save(
                    root / "images" / split / cls / f"{k}.png"
                )
    return root


def run(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), directories included."""
    files = sorted(folder.rglob("*"))
    return {str(p.relative_to(folder)): _sha256(p) if p.is_file() else "" for p in files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def complete_looking_outside(out: Path) -> list[Path]:
    """Directories beside ``out`` that look like a finished output but are neither ``out`` nor
    a clearly temporary ``.OUT.*.partial``."""
    return [
        p
        for p in out.parent.iterdir()
        if p.is_dir()
        and p != out
        and not (p.name.startswith(f".{out.name}.") and p.name.endswith(".partial"))
        and any((p / m).exists() for m in MARKS)
    ]


@pytest.fixture
def start(tmp_path):
    """``start(argv)``: a Python child process (stderr to a file: a chatty child never blocks
    on a pipe); any still running when the test ends, failed or not, is killed."""
    procs: list[subprocess.Popen] = []

    def _start(argv: list) -> subprocess.Popen:
        with open(tmp_path / "stderr", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *map(str, argv)],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
        return procs[-1]

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup code runs: not `finally`, not atexit
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def check_previous_output_survived(out: Path, before: dict[str, str], inputs: set[str]) -> None:
    """``out`` unchanged; beside it only the killed run's ``.OUT.*.partial`` and, for training,
    its ``OUT.parts/`` work directory (a checkpoint for --resume, never a model)."""
    assert snapshot(out) == before
    assert complete_looking_outside(out) == []
    others = {p.name for p in out.parent.iterdir()} - inputs - {out.name, f"{out.name}.parts"}
    assert others and all(n.startswith(f".{out.name}.") and n.endswith(".partial") for n in others)


def check_rerun_cleaned_up(out: Path, before: dict[str, str]) -> None:
    assert snapshot(out) != before  # the new settings' output
    assert temporaries(out) == []  # the killed run's temporary directory is gone too
    assert complete_looking_outside(out) == []
    assert not out.with_name(f"{out.name}.parts").exists()  # a finished run keeps no checkpoint


def test_merge_killed_mid_way_leaves_the_previous_merge_intact(zoo, tmp_path, start):
    experts = [zoo / f"t{i}" for i in range(3)]
    out = tmp_path / "merged"
    # DOGE with many Adam steps per matrix: minutes of work, killed a moment after it starts
    # writing the merged weights into its temporary directory.
    argv = ["merge", "--method", "doge", "--steps", "1000000", "--base", zoo / "base"]
    argv += ["--experts", *experts, "--out", out]
    go = tmp_path / "go"
    proc = start(["-c", RUNNER, "run", "-", go, *argv])
    try:
        run("merge", "--method", "task-arithmetic", "--base", zoo / "base", "--experts",
            *experts, "--out", out)  # fmt: skip
    finally:
        go.touch()
    before = snapshot(out)
    assert {"config.json", "model.safetensors", "merge.json"} <= set(before)

    wait_for(lambda: any(p.glob("*.tmp") for p in temporaries(out)), proc, "the weights file")
    time.sleep(0.3)
    kill(proc)
    (partial,) = temporaries(out)
    assert not (partial / "model.safetensors").exists()  # really mid-way: weights half written
    assert not (partial / "config.json").exists()
    check_previous_output_survived(out, before, {"merged", "go", "stderr"})

    run("merge", "--method", "doge", "--steps", "5", "--base", zoo / "base", "--experts",
        *experts, "--out", out)  # fmt: skip
    check_rerun_cleaned_up(out, before)
    assert '"method": "doge"' in (out / "merge.json").read_text()


def _commands(zoo: Path, out: Path) -> dict[str, tuple[list, list]]:
    """Per command: the first run's arguments and the killed (then rerun) run's, which differ
    so that the output would change."""
    data = ["data", "make", zoo / "images", "--out", out]
    train = ["train", "--base", zoo / "base", "--data", zoo / "images", "--out", out]
    train += ["--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    return {
        "data make": ([*data, "--max-samples", "8"], [*data, "--max-samples", "6"]),
        "train": ([*train, "--seed", "0"], [*train, "--seed", "1"]),
    }


@pytest.mark.parametrize("command", ["data make", "train"])
def test_killed_just_before_the_rename_leaves_the_previous_output_intact(
    zoo, tmp_path, start, command
):
    out = tmp_path / "out"
    first, second = _commands(zoo, out)[command]
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = start(["-c", RUNNER, "pause", ready, go, *second])
    try:
        run(*first)
    finally:
        go.touch()
    before = snapshot(out)
    assert any(m in before for m in MARKS)

    wait_for(ready.exists, proc, "the finished temporary directory")
    kill(proc)
    partial = Path(ready.read_text())
    ready.unlink()
    assert partial.parent == out.parent and partial.name.startswith(f".{out.name}.")
    assert partial.name.endswith(".partial")
    assert snapshot(partial) != before  # the new output, complete but never renamed
    assert any((partial / m).exists() for m in MARKS)
    check_previous_output_survived(out, before, {"out", "go", "stderr"})

    run(*second)
    check_rerun_cleaned_up(out, before)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_without_an_atomic_swap_a_kill_between_the_two_renames_is_undone(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing (not Linux, some file systems) the previous
    output is moved aside, then the new one renamed in. A kill between the two leaves no
    output but ``.OUT.HOST-PID-old.partial``: the next write puts it back before anything
    else, and stale temporaries of dead processes (directories and files) are removed."""
    import lorex.io as lio

    monkeypatch.setattr(lio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with lio.atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("first")
    with lio.atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("second")
    assert (out / "model.safetensors").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    dead, host = _dead_pid(), lio._HOST
    old = tmp_path / f".out.{host}-{dead}-old.partial"
    os.replace(out, old)  # killed after the first rename ...
    new = tmp_path / f".out.{host}-{dead}-abcd1234.partial"  # ... before the second
    new.mkdir()
    (new / "model.safetensors").write_text("third")
    (tmp_path / f".x.json.{host}-{dead}-abcd1234.tmp").write_text("{")  # a killed write_json
    alive = tmp_path / f".out.{host}-{os.getppid()}-abcd1234.partial"  # another live process's
    alive.mkdir()

    with pytest.raises(RuntimeError), lio.atomic_directory(out):
        raise RuntimeError("a run that fails")
    assert (out / "model.safetensors").read_text() == "second"  # put back
    lio.write_json(tmp_path / "x.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out", "x.json"])
