import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorex.data import ImageDataset, load_dataset
from lorex.errors import LorexError
from lorex.models import load_model
from lorex.training import engine as loop
from lorex.training.batches import random_shift
from lorex.training.checkpoint import CHECKPOINT_FILE, CheckpointOptions
from lorex.training.config import TrainConfig
from lorex.training.engine import Objective, TrainingDiverged, train
from lorex.training.methods import TRAINING_METHODS as METHODS
from lorex.training.objectives.classification import fit


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_methods_choose_what_trains(tiny_base):
    model = load_model(tiny_base)
    model.add_head("t", ["a", "b"])
    METHODS["linear"]().prepare(model)
    assert _trainable(model) == {"heads.t.weight", "heads.t.bias"}
    METHODS["full"]().prepare(model)
    trainable = _trainable(model)
    assert "backbone.blocks.0.attn.qkv.weight" in trainable and "heads.t.weight" in trainable
    assert not any(n.startswith("heads.digits_mnist") for n in trainable)  # other heads stay


def _fit(tiny_base, method, cfg, data):
    model = load_model(tiny_base)
    model.add_head("digits/optdigits", data.classes)
    result = fit(model, METHODS[method](), data, cfg, progress=False)
    return model, result


def test_training_is_deterministic(tiny_base):
    data = load_dataset("digits/optdigits", "train", 128)
    cfg = TrainConfig(epochs=1, batch_size=32, seed=3, augment=True)
    a, ra = _fit(tiny_base, "full", cfg, data)
    b, rb = _fit(tiny_base, "full", cfg, data)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert ra.history == rb.history


def test_feature_cache_matches_running_the_backbone(tiny_base, monkeypatch):
    """The linear probe on cached features equals one that runs the frozen backbone every step."""
    data = load_dataset("digits/optdigits", "train", 96)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=1, lr=1e-2)
    cached, r1 = _fit(tiny_base, "linear", cfg, data)
    assert r1.feature_cache
    monkeypatch.setattr(METHODS["linear"], "frozen_backbone", False)
    direct, r2 = _fit(tiny_base, "linear", cfg, data)
    assert not r2.feature_cache
    torch.testing.assert_close(
        cached.heads["digits_optdigits"].weight,
        direct.heads["digits_optdigits"].weight,
        rtol=1e-4,
        atol=1e-5,
    )


def test_loss_goes_down_and_metrics_are_reported(tiny_base):
    data = load_dataset("digits/mnist", "train", 200)
    model, result = _fit(tiny_base, "linear", TrainConfig(epochs=8, batch_size=50, lr=1e-2), data)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.1
    assert result.trainable_params == 10 * model.num_features + 10
    assert result.total_params > result.trainable_params
    assert result.train_seconds > 0 and result.peak_rss_mb > 0 and result.peak_train_mb >= 0


def test_random_shift_matches_a_brute_force_loop():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(5)
    shifts = torch.randint(-2, 3, (2, 2), generator=torch.Generator().manual_seed(5)).tolist()
    out = random_shift(x, 2, g)
    for i, (dy, dx) in enumerate(shifts):
        for y in range(6):
            for xx in range(6):
                sy, sx = min(max(y + dy, 0), 5), min(max(xx + dx, 0), 5)
                assert torch.equal(out[i, :, y, xx], x[i, :, sy, sx])


def test_schedule_warms_up_then_decays_to_zero():
    f = loop._schedule(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) < 0.01
    assert all(f(i) >= f(i + 1) for i in range(10, 99))


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("lr", -1.0), ("batch_size", 0), ("label_smoothing", 1.5), ("max_samples", 0)],
)
def test_bad_hyper_parameters_are_refused(field, value):
    with pytest.raises(LorexError, match=field):
        TrainConfig(**{field: value})


def test_diverging_loss_stops_with_a_clear_error(tiny_base):
    data = ImageDataset(np.zeros((8, 32, 32, 3), np.uint8), np.arange(8) % 2, ["a", "b"], "x")
    model = load_model(tiny_base)
    model.add_head("x", data.classes)
    with torch.no_grad():
        model.heads["x"].weight.fill_(float("inf"))
    with pytest.raises(LorexError, match="diverged"):
        fit(model, METHODS["full"](), data, TrainConfig(epochs=1, batch_size=4), progress=False)


def test_frozen_head_from_a_probe(tiny_base, tmp_path):
    """--head-from copies the probe's head; --freeze-head keeps it while the backbone trains."""
    from lorex.cli import main

    common = ["--data", "digits/optdigits", "--epochs", "1", "--max-samples", "60"]
    probe, expert = tmp_path / "probe", tmp_path / "expert"
    assert (
        main(
            ["train", "--base", str(tiny_base), "--method", "linear", "--out", str(probe)] + common
        )
        == 0
    )
    args = ["train", "--base", str(tiny_base), "--method", "full", "--out", str(expert)]
    assert main(args + common + ["--head-from", str(probe), "--freeze-head"]) == 0
    p, e, b = load_model(probe), load_model(expert), load_model(tiny_base)
    key = p.active_head
    assert torch.equal(e.heads[key].weight, p.heads[key].weight)
    assert torch.equal(e.heads[key].bias, p.heads[key].bias)
    moved = [
        k
        for k, v in b.backbone.state_dict().items()
        if not torch.equal(v, e.backbone.state_dict()[k])
    ]
    assert moved  # the backbone trained
    code = main(args + common + ["--freeze-head"])
    assert code == 2  # a frozen zero head is refused


# --------------------------------------------------------------------------------------------
# the engine itself, on a toy objective
# --------------------------------------------------------------------------------------------


class Toy(Objective):
    """A linear model on random inputs; ``extra_state`` carries a step count and a tensor."""

    loop = "toy"

    def __init__(self, steps=3, epochs=2, clip_norm=1.0, scale=1.0, nan_at=None, second=False):
        super().__init__()
        self.n, self.epochs, self.clip_norm, self.scale = steps, epochs, clip_norm, scale
        self.nan_at, self.second, self.calls, self.loaded = nan_at, second, 0, None

    def prepare(self, device):
        self.model = torch.nn.Linear(3, 2)
        self.other = torch.nn.Linear(3, 1)
        self.params = list(self.model.parameters())
        self.generator = torch.Generator().manual_seed(1)
        self.generators = {"inputs": self.generator}
        self.seen = 0

    def total_steps(self):
        return self.n * self.epochs

    def optimizers(self, total):
        main = torch.optim.SGD(self.model.parameters(), lr=0.1)
        if not self.second:
            return main, None
        return {"main": main, "other": torch.optim.SGD(self.other.parameters(), lr=0.1)}, None

    def checkpointed(self):
        return torch.nn.ModuleDict({"model": self.model, "other": self.other})

    def load_state(self, position, arrays):
        self.seen = position["seen"]
        self.loaded = (position["seen"], arrays["mark"].clone())

    def extra_state(self):
        return {"seen": self.seen}, {"mark": torch.full((2,), float(self.seen))}

    def begin_epoch(self, epoch):
        return range(self.n)

    def step(self, batch):
        self.calls += 1
        self.seen += 1
        x = torch.randn(4, 3, generator=self.generator)
        loss = self.scale * self.model(x).pow(2).mean()
        bad = float("nan") if self.nan_at == self.calls else 1.0
        if not self.second:
            return loss * bad, None
        return {"main": loss, "other": self.other(x).pow(2).mean() * bad}, None

    def end_epoch(self, epoch):
        return {"epoch": epoch + 1, "seen": self.seen}


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("clip", [0.5, None])
def test_engine_clips_gradients_to_the_objectives_norm(clip):
    toy = Toy(steps=1, epochs=1, clip_norm=clip, scale=1e6)
    torch.manual_seed(0)
    before = _weights(torch.nn.Linear(3, 2))  # the toy's initial weights (same seed)
    train(toy, progress=False)
    moved = float((_weights(toy.model) - before).norm())
    if clip is None:
        assert moved > 100  # lr 0.1 x an unclipped gradient of norm ~1e6
    else:
        assert moved == pytest.approx(0.1 * clip, rel=1e-4)  # lr x the clipped norm


@pytest.mark.parametrize("second", [False, True])
def test_engine_stops_before_a_non_finite_step_and_names_the_checkpoint(tmp_path, second):
    toy = Toy(nan_at=3, second=second)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1") as err:
        train(toy, progress=False, checkpoint=CheckpointOptions(tmp_path, every=1))
    path = tmp_path / CHECKPOINT_FILE
    assert f"the last good checkpoint is kept at {path}" in str(err.value)
    meta = json.loads(load_file_metadata(path)["lorex_checkpoint"])
    assert meta["step"] == 2
    saved = load_file(path)
    # no weight moved at the bad step, in either optimiser
    assert torch.equal(toy.model.weight.detach(), saved["model/model.weight"])
    assert torch.equal(toy.other.weight.detach(), saved["model/other.weight"])


def test_engine_round_trips_the_objectives_extra_state(tmp_path, stop_after_saves):
    ref = Toy()
    ref_result = train(ref, progress=False)
    options = CheckpointOptions(tmp_path, every=1)
    with pytest.raises(stop_after_saves(4)):  # epoch 2, after its first batch
        train(Toy(), progress=False, checkpoint=options)
    resumed = Toy()
    result = train(resumed, progress=False, checkpoint=CheckpointOptions(tmp_path, 1, True))
    assert resumed.loaded[0] == 4 and torch.equal(resumed.loaded[1], torch.full((2,), 4.0))
    assert resumed.calls == 2  # only the steps left
    assert (
        result.history == ref_result.history == [{"epoch": 1, "seen": 3}, {"epoch": 2, "seen": 6}]
    )
    assert torch.equal(_weights(resumed.model), _weights(ref.model))


def test_every_objective_but_tgmb_clips_at_one():
    from lorex.adaptation.cross_modal.objectives import TargetTransfer, Translator
    from lorex.adaptation.sage.objectives import ClassPseudoLabels, PseudoIdentities
    from lorex.training.objectives.classification import Classification
    from lorex.training.objectives.reid import Reid

    for objective in (Classification, Reid, PseudoIdentities, ClassPseudoLabels, TargetTransfer):
        assert objective.clip_norm == 1.0, objective
    assert Translator.clip_norm is None  # TGMB was never clipped: outputs stay as they were


def load_file_metadata(path):
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()
