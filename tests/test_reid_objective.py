"""The re-ID training objective (SAGE stage 1): losses, P x K sampler, BN-neck, expert runs, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorex.backbones import build_backbone, preset_config
from lorex.cli import main
from lorex.data import make_reid_domain
from lorex.data.market1501 import ReidSplit, write_market1501
from lorex.data.reid import PKSampler, load_reid_data, subset_ids
from lorex.errors import LorexError
from lorex.io import load_tensors
from lorex.models import BNNeckHead, LorexModel, load_model, save_model
from lorex.models.resize import fit_image_size
from lorex.training.config import TrainConfig
from lorex.training.evaluation import evaluate_reid
from lorex.training.expert_jobs import train_reid_expert
from lorex.training.methods import TRAINING_METHODS as METHODS
from lorex.training.reid_losses import batch_hard_soft_triplet, label_smoothed_cross_entropy

CFG = TrainConfig(epochs=1, batch_size=16, seed=0)  # P = 4 ids x K = 4


@pytest.fixture(scope="module")
def reid_folder(tmp_path_factory):
    """A tiny reid/a (16 ids: 8 train, 8 test) in the Market-1501 layout."""
    root = tmp_path_factory.mktemp("reid") / "tiny-a"
    write_market1501(root, make_reid_domain("reid/a", num_ids=16))
    return root


@pytest.fixture(scope="module")
def expert(reid_folder, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "a"
    metrics = train_reid_expert(tiny_base, str(reid_folder), METHODS["full"](), out, CFG)
    return out, metrics


# --------------------------------------------------------------------------------------------
# losses against brute force
# --------------------------------------------------------------------------------------------


def test_label_smoothed_cross_entropy_matches_a_loop_and_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    eps = 0.1
    total = 0.0
    for i in range(6):
        z = logits[i].tolist()
        log_norm = math.log(sum(math.exp(v) for v in z))
        for c in range(5):
            q = (1 - eps) * (c == int(targets[i])) + eps / 5
            total -= q * (z[c] - log_norm)
    expected = total / 6
    got = label_smoothed_cross_entropy(logits, targets, eps)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets, label_smoothing=eps))
    torch.testing.assert_close(
        label_smoothed_cross_entropy(logits, targets, 0.0), F.cross_entropy(logits, targets)
    )


def _triplet_loop(x: list[list[float]], labels: list[int]) -> float:
    n = len(labels)
    total = 0.0
    for a in range(n):
        d_ap, d_an = -math.inf, math.inf
        for j in range(n):
            d = math.sqrt(max(sum((p - q) ** 2 for p, q in zip(x[a], x[j], strict=True)), 1e-12))
            if labels[j] == labels[a]:
                d_ap = max(d_ap, d)  # the anchor itself counts (distance ~0)
            else:
                d_an = min(d_an, d)
        total += math.log1p(math.exp(d_ap - d_an))
    return total / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_soft_triplet_matches_a_mining_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4]  # ids 3 and 4 have no other positive
    got = batch_hard_soft_triplet(x, torch.tensor(labels))
    assert got.item() == pytest.approx(_triplet_loop(x.tolist(), labels), rel=1e-10)
    # margin 0: SAGE's -log_softmax([d_ap, d_an])[1]
    assert got.item() > 0


def test_triplet_gradient_is_finite_for_identical_images():
    """K instances drawn with replacement can be the same image: distance 0, no NaN."""
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.5], [0.0, 0.5]], requires_grad=True)
    loss = batch_hard_soft_triplet(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_triplet_needs_two_identities():
    with pytest.raises(LorexError, match="two identities"):
        batch_hard_soft_triplet(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# P x K sampler
# --------------------------------------------------------------------------------------------


def test_pk_sampler_gives_p_ids_times_k_instances():
    ids = np.repeat(np.arange(10), [2, 9, 4, 5, 8, 3, 6, 4, 7, 1])  # ids 0, 5, 9 have < K
    sampler = PKSampler(ids, p=4, k=4, seed=3)
    batches = sampler.epoch()
    assert batches
    seen = []
    for batch in batches:
        assert batch.shape == (16,)
        rows = ids[batch].reshape(4, 4)
        assert (rows == rows[:, :1]).all()  # one identity per row of K
        assert len(set(rows[:, 0].tolist())) == 4  # P distinct identities
        seen += batch.tolist()
    # Ids with fewer than K images are drawn with replacement: repeated indices.
    small = [b for b in batches if 9 in ids[b]]
    assert all(len(set(b[ids[b] == 9].tolist())) == 1 for b in small)
    # An epoch sees about every image once: identities with K or more give no repeats.
    big = [i for i in seen if (ids == ids[i]).sum() >= 4]
    assert len(big) == len(set(big))


def test_pk_sampler_is_deterministic():
    ids = np.repeat(np.arange(12), 6)
    a = [b.tolist() for b in PKSampler(ids, 4, 4, seed=1).epoch()]
    b = [b.tolist() for b in PKSampler(ids, 4, 4, seed=1).epoch()]
    c = [b.tolist() for b in PKSampler(ids, 4, 4, seed=2).epoch()]
    assert a == b and a != c


def test_pk_sampler_bad_input():
    with pytest.raises(LorexError, match="2 identities"):
        PKSampler(np.zeros(8, dtype=int), 4, 4)
    with pytest.raises(LorexError, match="P >= 2"):
        PKSampler(np.arange(8), 1, 4)
    # Fewer identities than P: P shrinks to all of them.
    assert PKSampler(np.repeat(np.arange(3), 4), 16, 4).epoch()[0].shape == (12,)


# --------------------------------------------------------------------------------------------
# head, image size, data
# --------------------------------------------------------------------------------------------


def _micro(seed=0):
    torch.manual_seed(seed)
    cfg = preset_config("vit-micro")
    return LorexModel(build_backbone(cfg), cfg)


def test_bnneck_head_layout_and_round_trip(tmp_path):
    model = _micro()
    model.add_head("digits/mnist", list("0123456789"))  # a linear head stays as it was
    key = model.add_head("reid/a", ["1", "2", "3"], kind="bnneck")
    head = model.heads[key]
    assert isinstance(head, BNNeckHead) and head.classifier.bias is None
    assert torch.equal(head.bn.bias, torch.zeros(128)) and not head.bn.bias.requires_grad
    assert 0.0005 < head.classifier.weight.std().item() < 0.002  # N(0, 0.001)
    with torch.no_grad():
        head.bn.running_mean.uniform_()
        head.bn.weight.uniform_()
    model.eval()
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "kind" not in config["heads"]["digits_mnist"]  # old head entries are unchanged
    assert config["heads"]["reid_a"]["kind"] == "bnneck"
    back = load_model(tmp_path / "m")
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(back.embedding(x), model.embedding(x), rtol=0, atol=0)
    emb = back.embedding(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    expected = F.normalize(head.bn(model.features(x)), dim=1)
    torch.testing.assert_close(emb, expected, rtol=0, atol=0)
    with pytest.raises(LorexError, match="head kind"):
        model.add_head("t", ["a"], kind="mlp")


def test_fit_image_size_resamples_only_the_position_table():
    model = _micro()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert fit_image_size(model, (64, 32))
    after = model.backbone.state_dict()
    assert model.image_hw == (64, 32) and model.backbone_config["img_size"] == [64, 32]
    assert after["pos_embed"].shape == (1, 1 + 8 * 4, 128)
    assert torch.equal(after["pos_embed"][:, 0], before["pos_embed"][:, 0])
    for k, v in before.items():
        if k != "pos_embed":
            assert torch.equal(after[k], v), k
    assert model.features(torch.rand(2, 3, 64, 32)).shape == (2, 128)
    assert not fit_image_size(model, (64, 32))  # already that size
    with pytest.raises(LorexError, match="64x32"):
        _ = model.image_size  # not square


def test_subset_ids_keeps_whole_identities():
    split = ReidSplit(
        np.zeros((10, 4, 2, 3), np.uint8), [0, 0, 0, 1, 1, 2, 2, 2, 2, 3], np.zeros(10, int)
    )
    small = subset_ids(split, 6, seed=0)
    assert len(small) <= 6
    counts = {int(r): int((split.raw_ids == r).sum()) for r in np.unique(small.raw_ids)}
    for r, n in counts.items():
        assert (small.raw_ids == r).sum() == n
    assert sorted(set(small.ids.tolist())) == list(range(len(counts)))


def test_classification_data_is_refused(tmp_path):
    with pytest.raises(LorexError, match="classification dataset"):
        load_reid_data("digits/mnist")
    (tmp_path / "query").mkdir()
    with pytest.raises(LorexError, match="not a Market-1501 folder"):
        load_reid_data(tmp_path)


# --------------------------------------------------------------------------------------------
# training runs
# --------------------------------------------------------------------------------------------


def test_expert_metrics_and_reload(expert, reid_folder):
    out, metrics = expert
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"]
    for key in ("trainable_params", "train_seconds", "peak_train_mb", "infer_ms_per_image"):
        assert metrics[key] >= 0, key
    assert metrics["objective"] == "reid" and metrics["image_size"] == [64, 32]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["mAP"] == metrics["mAP"]
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["lorex_version"]
    assert config["made_by"]["objective"]["ids_per_batch"] == 4
    assert config["made_by"]["config"]["batch_size"] == 16
    assert list(config["heads"]) == ["tiny_a"]  # the base's digit head is not carried over
    model = load_model(out)
    assert isinstance(model.heads[model.active_head], BNNeckHead)
    assert model.image_hw == (64, 32)
    # The reloaded model reproduces the features: the same retrieval scores, exactly.
    scores = evaluate_reid(model, load_reid_data(reid_folder))
    for key in ("mAP", "rank1", "mINP"):
        assert scores[key] == metrics[key]
    state = load_tensors(out / "model.safetensors")
    assert torch.equal(state["heads.tiny_a.bn.bias"], torch.zeros(128))  # never trained


def test_training_is_deterministic(reid_folder, tiny_base, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=16, seed=5, augment=True)
    for name in ("x", "y"):
        train_reid_expert(tiny_base, str(reid_folder), METHODS["full"](), tmp_path / name, cfg)
    a = load_tensors(tmp_path / "x" / "model.safetensors")
    b = load_tensors(tmp_path / "y" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_delta_method_from_a_square_base_is_refused(reid_folder, tiny_base, tmp_path):
    with pytest.raises(LorexError, match="--method full first"):
        train_reid_expert(tiny_base, str(reid_folder), METHODS["lora"](), tmp_path / "l", CFG)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_and_eval(reid_folder, tiny_base, tmp_path, capsys):
    argv = ["train", "--base", tiny_base, "--data", reid_folder, "--objective", "reid"]
    argv += ["--out", tmp_path / "e", "--epochs", "1", "--batch-size", "16"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "mAP" in out and "rank-1" in out and "mINP" in out and "efficiency" in out
    code, out, err = _run(capsys, "eval", "--model", tmp_path / "e", "--data", reid_folder)
    assert code == 0, err
    assert out.startswith("mAP ") and "rank-10" in out
    # A classification base is evaluated directly (direct transfer), its positions resampled.
    code, out, err = _run(capsys, "eval", "--model", tiny_base, "--data", reid_folder)
    assert code == 0 and out.startswith("mAP "), err
    code, out, err = _run(capsys, "info", tmp_path / "e")
    assert code == 0 and "bnneck" in out


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]


def test_cli_bad_input_exits_2(reid_folder, tiny_base, tmp_path, capsys):
    base = ["train", "--base", tiny_base, "--out", tmp_path / "x", "--epochs", "1"]
    code, _, err = _run(capsys, *base, "--data", "digits/mnist", "--objective", "reid")
    _one_line_error(code, err, "classification dataset")
    code, _, err = _run(capsys, *base, "--data", reid_folder)
    _one_line_error(code, err, "--objective reid")
    code, _, err = _run(
        capsys, *base, "--data", reid_folder, "--objective", "reid", "--batch-size", "10"
    )
    _one_line_error(code, err, "--batch-size")
    code, _, err = _run(capsys, *base, "--data", "digits/mnist", "--num-instances", "2")
    _one_line_error(code, err, "--num-instances")
    code, _, err = _run(
        capsys, "eval", "--model", tiny_base, "--data", reid_folder, "--split", "train"
    )
    _one_line_error(code, err, "--split")
    assert not (tmp_path / "x").exists()
