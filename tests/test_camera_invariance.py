"""The between-camera share of feature variance against a loop that writes it out."""

import numpy as np
import pytest
import torch

from lorex.adaptation.camera_invariance import camera_share


def _loop(features: np.ndarray, cameras: np.ndarray) -> float:
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    mu = x.mean(0)
    total = np.mean([np.sum((row - mu) ** 2) for row in x])
    between = 0.0
    for c in sorted(set(cameras.tolist())):
        rows = x[cameras == c]
        between += len(rows) / len(x) * np.sum((rows.mean(0) - mu) ** 2)
    return between / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_camera_share_matches_the_loop(seed):
    rng = np.random.default_rng(seed)
    cams = rng.integers(0, 5, 40)
    feats = rng.normal(size=(40, 8)) + 0.8 * rng.normal(size=(5, 8))[cams]  # a camera offset
    got = camera_share(torch.from_numpy(feats), torch.from_numpy(cams)).item()
    assert got == pytest.approx(_loop(feats, cams), rel=1e-12)
    assert 0.05 < got < 1


def test_camera_share_limits_scale_and_gradient():
    rng = np.random.default_rng(3)
    base = torch.from_numpy(rng.normal(size=(6, 4)))
    cams = torch.tensor([0, 1, 2] * 2)
    # each camera holds the same two images: equal camera means, share 0
    same = torch.cat([base[:2]] * 3)[torch.tensor([0, 2, 4, 1, 3, 5])]
    assert camera_share(same, cams).item() == pytest.approx(0, abs=1e-12)
    # each camera's images coincide: all the variance is between cameras
    apart = base[:3][cams]
    assert camera_share(apart, cams).item() == pytest.approx(1, rel=1e-12)
    feats = base.clone().requires_grad_(True)
    share = camera_share(feats, cams)
    assert camera_share(7.5 * base, cams).item() == pytest.approx(share.item(), rel=1e-12)
    share.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cameras"):
        camera_share(base, cams[:5])
