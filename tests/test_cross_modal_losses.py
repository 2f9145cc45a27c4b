"""Each cross-modal loss against a value worked out by hand on a tiny batch."""

import math

import pytest
import torch

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.losses import (
    feature_alignment,
    information_maximisation,
    kl_distillation,
    lsgan_critic_loss,
    lsgan_generator_loss,
    statistics_matching,
    teacher_log_probs,
    token_statistics,
)
from lorex.adaptation.cross_modal.methods import CROSS_MODAL_METHODS as METHODS
from lorex.adaptation.cross_modal.methods import MAIN_METHODS, resolve_methods
from lorex.adaptation.cross_modal.translator import PatchCritic, TinyTranslator, UNetTranslator
from lorex.errors import LorexError


def test_information_maximisation_by_hand():
    # Rows predict (1/4, 3/4) and (3/4, 1/4): each has entropy h; their mean is uniform (ln 2).
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert information_maximisation(logits).item() == pytest.approx(h - math.log(2), abs=1e-6)


def test_information_maximisation_prefers_confident_diverse_predictions():
    confident_diverse = torch.tensor([[9.0, 0.0], [0.0, 9.0]])
    confident_same = torch.tensor([[9.0, 0.0], [9.0, 0.0]])
    unsure = torch.zeros(2, 2)
    im = [information_maximisation(x).item() for x in (confident_diverse, confident_same, unsure)]
    assert im[0] < im[1] and im[0] < im[2]


def test_kl_distillation_by_hand():
    teacher = torch.tensor([[math.log(3), 0.0]])  # (3/4, 1/4)
    student = torch.zeros(1, 2)  # (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_distillation(student, teacher, 1.0, False).item() == pytest.approx(kl, abs=1e-6)
    # The confidence weight is the teacher's top probability.
    assert kl_distillation(student, teacher, 1.0, True).item() == pytest.approx(0.75 * kl, 1e-5)
    # At temperature T both sides soften and the KL is scaled by T^2.
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    assert kl_distillation(student, teacher, 2.0, False).item() == pytest.approx(4 * kl2, 1e-5)


def test_kl_distillation_never_moves_the_teacher():
    teacher = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 3, requires_grad=True)
    kl_distillation(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_feature_alignment_is_the_mean_pair_rms_distance():
    student = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    source = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # Pair distances 5 and 1, over sqrt(2 channels), averaged.
    assert feature_alignment(student, source).item() == pytest.approx(3.0 / math.sqrt(2))


def test_statistics_matching_by_hand():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # one image, two tokens, two channels
    mean, var = token_statistics(tokens)
    assert mean.tolist() == [2.0, 4.0] and var.tolist() == [1.0, 4.0]
    # Block 0's source: means (0, 4), variances (1, 16), i.e. deviations (1, 4). The batch mean
    # is off by (2/1, 0/4) deviations and the variances by (1-1, 4-16)/(1, 16) = (0, -3/4),
    # each an RMS over 2 channels; block 0 counts x10 and block 1 matches exactly.
    loss = statistics_matching(
        [tokens, tokens],
        [torch.tensor([0.0, 4.0]), mean],
        [torch.tensor([1.0, 16.0]), var],
        first_factor=10.0,
        eps=0.0,
    )
    block0 = 2.0 / math.sqrt(2) + 0.75 / math.sqrt(2)
    assert loss.item() == pytest.approx((10 * block0 + 0) / 2, rel=1e-6)


def test_teacher_two_views_and_class_balance_by_hand():
    # Two images, two classes; logits chosen so the softmaxes are round numbers.
    translated = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))
    raw = torch.log(torch.tensor([[0.4, 0.6], [1.0, 1e-9]]))
    alone = teacher_log_probs(translated, balance=False).exp()
    assert torch.allclose(alone, torch.tensor([[0.8, 0.2], [0.6, 0.4]]), atol=1e-6)
    # Averaged views: [[0.6, 0.4], [0.8, 0.2]]; class means 0.7 and 0.3.
    mixed = teacher_log_probs(translated, raw, balance=False).exp()
    assert torch.allclose(mixed, torch.tensor([[0.6, 0.4], [0.8, 0.2]]), atol=1e-6)
    # Balanced: row 1 is (0.6/0.7, 0.4/0.3) renormalised, row 2 (0.8/0.7, 0.2/0.3).
    rows = [[0.6 / 0.7, 0.4 / 0.3], [0.8 / 0.7, 0.2 / 0.3]]
    expected = torch.tensor([[a / (a + b), b / (a + b)] for a, b in rows])
    balanced = teacher_log_probs(translated, raw, balance=True).exp()
    assert torch.allclose(balanced, expected, atol=1e-6)
    assert balanced[0].argmax() == 1  # the balance can flip a biased reading


def test_lsgan_losses_by_hand():
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert lsgan_critic_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.5))
    assert lsgan_generator_loss(fake).item() == pytest.approx(0.5 * 0.5)


@pytest.mark.parametrize("net", [TinyTranslator(8), UNetTranslator(8)])
def test_translators_map_one_channel_to_rgb_in_unit_range(net):
    y = net(torch.rand(3, 1, 32, 32))
    assert y.shape == (3, 3, 32, 32) and 0 <= y.min() and y.max() <= 1
    assert PatchCritic()(y).shape[:2] == (3, 1)


def test_methods_switch_terms_off_and_keep_the_rest():
    cfg = CrossModalConfig(ti_weight=0.7, kd_weight=2.0)
    shot = METHODS["shot"].settings(cfg)
    assert shot.ti_weight == shot.kd_weight == shot.stats_weight == 0 and shot.im_weight == 1.0
    socket = METHODS["socket"].settings(cfg)
    assert socket.kd_weight == 0 and socket.ti_weight == 0.7
    assert METHODS["tgmb-tgkt-no-ti"].settings(cfg).kd_weight == 2.0
    paper = METHODS["tgmb-tgkt-paper-teacher"].settings(cfg)
    assert not (paper.kd_raw_view or paper.kd_balance or paper.kd_refresh)
    assert paper.kd_weight == 2.0
    fixed = METHODS["tgmb-tgkt-fixed-teacher"].settings(cfg)
    assert not fixed.kd_refresh and fixed.kd_raw_view and fixed.kd_balance
    assert cfg.kd_raw_view and cfg.kd_balance and cfg.kd_refresh  # lorex's teacher is the default
    assert [m.name for m in resolve_methods(["all", "shot"])] == list(MAIN_METHODS)
    with pytest.raises(LorexError, match="unknown cross-modal method"):
        resolve_methods(["sokcet"])


@pytest.mark.parametrize(
    "field, value", [("epochs", -1), ("lr", 0.0), ("kd_weight", -1.0), ("translator", "gan")]
)
def test_config_refuses_bad_values(field, value):
    with pytest.raises(LorexError, match=field):
        CrossModalConfig(**{field: value})
