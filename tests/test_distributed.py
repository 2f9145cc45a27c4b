"""torch.distributed: two gloo processes on this machine, launched by torchrun, against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorex.errors import LorexError
from lorex.training import distributed
from lorex.training.distributed import World

# End to end under torchrun: `pytest -m "not slow"` leaves them out; CI runs them.
pytestmark = pytest.mark.slow

# One thread per process in both runs: torchrun sets it too, and float sums depend on it.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def lorex(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "lorex", *args], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_shards_cover_a_batch_once_in_order():
    for n in (1, 2, 7, 35, 64):
        for size in (1, 2, 3, 4):
            parts = [distributed.shard_slice(n, World(r, size)) for r in range(size)]
            covered = [i for s in parts for i in range(n)[s]]
            assert covered == list(range(n))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1
    batch = np.arange(20)  # P = 5 identities x K = 4
    for size in (1, 2):
        got = [distributed.shard_groups(batch, 4, World(r, size)) for r in range(size)]
        assert np.array_equal(np.concatenate([g for g, _ in got]), batch)
        assert all(np.array_equal(batch[rows], g) for g, rows in got)
        assert all(len(g) % 4 == 0 and len(g) for g, _ in got)  # whole identities, never none
    with pytest.raises(LorexError, match="5 identities per batch cannot give 3 processes two"):
        distributed.shard_groups(batch, 4, World(0, 3))


def test_ddp_training_equals_one_process_with_the_same_global_batch(tiny_base, tmp_path):
    # 100 images in global batches of 35: 35, 35, 30; the odd ones split 17/18 over two ranks.
    args = ["train", "--base", str(tiny_base), "--data", "digits/mnist", "--method", "full"]
    args += ["--augment", "--epochs", "2", "--max-samples", "100", "--batch-size", "35"]
    lorex([*args, "--out", str(tmp_path / "one")])
    torchrun(["-m", "lorex", *args, "--out", str(tmp_path / "two")])
    one, two = (
        load_file(tmp_path / "one/model.safetensors"),
        load_file(tmp_path / "two/model.safetensors"),
    )
    assert one.keys() == two.keys()
    moved = 0
    base = load_file(tiny_base / "model.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += k in base and not torch.equal(one[k], base[k])
    assert moved > 10  # training did change the weights
    h1 = json.loads((tmp_path / "one/metrics.json").read_text())["history"]
    h2 = json.loads((tmp_path / "two/metrics.json").read_text())["history"]
    for a, b in zip(h1, h2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["train_accuracy"] == a["train_accuracy"]
    # only rank 0 wrote: one output, no second copy, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


PSEUDO = """
import sys, numpy as np, torch
from lorex.errors import LorexError
from lorex.training import distributed
from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.relabel import relabel
from lorex.adaptation.sage.target_experts import start_from_source

device = torch.device("cpu")
world = distributed.init(device)
images = np.load(sys.argv[2])
model = start_from_source(sys.argv[1], images.shape[1:3], device)
labels, cents = relabel(model, images, PseudoLabeler(k1=10, k2=4, rho=0.05), device)
np.savez(sys.argv[3] + f"-{world.rank}.npz", labels=labels, cents=cents,
         classifier=model.heads[model.active_head].classifier.weight.detach().numpy())
distributed.leave()  # as the CLI does: exiting inside the group can abort gloo's threads
"""


@pytest.fixture(scope="module")
def reid_source(tiny_base, tmp_path_factory):
    """A tiny re-ID expert and 90 target images of another domain."""
    from lorex.data import make_reid_domain
    from lorex.data.market1501 import write_market1501
    from lorex.data.reid import load_reid_data
    from lorex.training.config import TrainConfig
    from lorex.training.expert_jobs import train_reid_expert
    from lorex.training.methods import TRAINING_METHODS as METHODS

    root = tmp_path_factory.mktemp("dist-reid")
    for name in ("a", "c"):
        write_market1501(root / name, make_reid_domain(f"reid/{name}", num_ids=16))
    cfg = TrainConfig(epochs=1, batch_size=16, max_samples=64)
    train_reid_expert(
        tiny_base, str(root / "a"), METHODS["full"](), root / "src", cfg, num_instances=4
    )
    images = load_reid_data(str(root / "c")).train.images[:90]
    np.save(root / "target.npy", images)
    return root / "src", root / "target.npy"


def test_distributed_pseudo_labels_equal_single_process(reid_source, tmp_path):
    from lorex.adaptation.pseudo_labels import PseudoLabeler
    from lorex.adaptation.sage.relabel import relabel
    from lorex.adaptation.sage.target_experts import start_from_source

    source, target = reid_source
    images = np.load(target)
    model = start_from_source(source, images.shape[1:3], torch.device("cpu"))
    torch.set_num_threads(1)
    try:
        labels, cents = relabel(model, images, PseudoLabeler(k1=10, k2=4, rho=0.05), "cpu")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert labels.max() >= 1  # at least two clusters: the comparison means something
    script = tmp_path / "pseudo.py"
    script.write_text(textwrap.dedent(PSEUDO))
    torchrun([str(script), str(source), str(target), str(tmp_path / "rank")])
    runs = [np.load(tmp_path / f"rank-{r}.npz") for r in range(2)]
    for run in runs:
        assert np.array_equal(run["labels"], labels)
        np.testing.assert_allclose(run["cents"], cents, rtol=1e-5, atol=1e-6)
    # the centroids, and so the classifiers, are the same bits on every rank
    assert np.array_equal(runs[0]["cents"], runs[1]["cents"])
    assert np.array_equal(runs[0]["classifier"], runs[1]["classifier"])


def test_parallel_experts_equal_experts_trained_one_by_one(tiny_base, tmp_path):
    args = ["train-experts", "--base", str(tiny_base), "--sources", "digits/mnist",
            "digits/optdigits", "digits/syn", "--method", "lora", "--epochs", "1",
            "--max-samples", "64", "--batch-size", "32"]  # fmt: skip
    lorex([*args, "--out", str(tmp_path / "one")])
    torchrun(["-m", "lorex", *args, "--out", str(tmp_path / "two")])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert {"mnist", "optdigits", "syn"} <= set(names)
    for name in ("mnist", "optdigits", "syn"):
        a = load_file(tmp_path / "one" / name / "model.safetensors")
        b = load_file(tmp_path / "two" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        m1 = json.loads((tmp_path / "one" / name / "metrics.json").read_text())
        m2 = json.loads((tmp_path / "two" / name / "metrics.json").read_text())
        assert m1["accuracy"] == m2["accuracy"] and m1["history"] == m2["history"]


def test_reid_training_runs_data_parallel_with_whole_identities_per_rank(reid_source, tmp_path):
    """The P x K sampler under DDP: each rank takes whole identities of every global batch
    (triplets are mined within a rank, so this matches one process in kind, not bit for bit)."""
    from lorex.models import load_model

    source, _ = reid_source
    data = source.parent / "a"
    args = ["train", "--base", str(source), "--data", str(data), "--objective", "reid"]
    args += ["--method", "lora", "--epochs", "2", "--batch-size", "16", "--augment"]
    torchrun(["-m", "lorex", *args, "--out", str(tmp_path / "two")])
    metrics = json.loads((tmp_path / "two/metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert all(np.isfinite(h["loss"]) and h["steps"] > 0 for h in metrics["history"])
    assert 0 <= metrics["mAP"] <= 1
    load_model(tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


def test_adapt_classify_under_ddp_equals_one_process(tiny_base, tmp_path):
    """SAGE on a classification target: LoRA experts and gates trained data-parallel, on class
    pseudo-labels made by rank 0, end where one process ends (within float tolerance)."""
    from lorex.training.config import TrainConfig
    from lorex.training.expert_jobs import train_expert
    from lorex.training.methods import TRAINING_METHODS as METHODS

    sources = []
    for name in ("digits/mnist", "digits/optdigits"):
        out = tmp_path / name.split("/")[1]
        cfg = TrainConfig(epochs=1, max_samples=64)
        train_expert(tiny_base, name, METHODS["full"](), out, cfg, progress=False)
        sources.append(str(out))
    args = ["adapt", "classify", "--sources", *sources, "--target", "digits/syn", "--epochs", "2",
            "--iters", "3", "--batch-size", "15", "--num-instances", "5", "--gate-iters", "2",
            "--max-target-samples", "64"]  # fmt: skip
    lorex([*args, "--out", str(tmp_path / "one")])
    torchrun(["-m", "lorex", *args, "--out", str(tmp_path / "two")])
    one = load_file(tmp_path / "one/model.safetensors")
    two = load_file(tmp_path / "two/model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    for name in ("mnist", "optdigits"):  # the LoRA experts of stage 2
        a = load_file(tmp_path / f"one.parts/experts/{name}/adapter/adapter_model.safetensors")
        b = load_file(tmp_path / f"two.parts/experts/{name}/adapter/adapter_model.safetensors")
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_adapt_reid_with_the_camera_term_runs_data_parallel(reid_source, tmp_path):
    """The gate's camera term under DDP: its images share the P x K batch's forward, each rank
    takes its slice of them, and the first-step scales are averaged over the ranks."""
    import shutil

    source, _ = reid_source
    twin = tmp_path / "src-twin"
    shutil.copytree(source, twin)
    args = ["adapt", "reid", "--sources", str(source), str(twin)]
    args += ["--target", str(source.parent / "c"), "--epochs", "1", "--iters", "2"]
    args += ["--batch-size", "16", "--num-instances", "2", "--min-samples", "2"]
    args += ["--rho", "0.05", "--k1", "10", "--gate-iters", "2"]
    torchrun(["-m", "lorex", *args, "--out", str(tmp_path / "two")])
    metrics = json.loads((tmp_path / "two/metrics.json").read_text())
    assert {"gated", "gated-light"} <= set(metrics["variants"])
    for label in ("gated", "gated-light"):
        (epoch,) = metrics["histories"][label]
        assert 0 < epoch["camera_share"] < 1 and np.isfinite(epoch["loss"])
