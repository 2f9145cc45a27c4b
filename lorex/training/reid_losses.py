"""The re-ID losses of SAGE's stage 1 (and of its pseudo-label stages): label-smoothed
cross-entropy on the classifier's logits and the batch-hard soft-margin triplet on features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorex.errors import LorexError


def label_smoothed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, eps: float = 0.1
) -> torch.Tensor:
    """Mean cross-entropy against ``(1 - eps) * one_hot + eps / C`` (CrossEntropyLabelSmooth of
    open-reid / MMT, which SAGE uses; equal to ``F.cross_entropy(label_smoothing=eps)``)."""
    if not 0 <= eps < 1:
        raise LorexError(f"label smoothing: expected 0 <= eps < 1, got {eps}")
    log_p = F.log_softmax(logits, dim=1)
    smooth = torch.full_like(log_p, eps / logits.shape[1])
    smooth.scatter_add_(
        1, targets[:, None], torch.full_like(log_p[:, :1], 1.0 - eps)
    )  # (1 - eps) on the true class, plus its eps / C share
    return -(smooth * log_p).sum(1).mean()


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` Euclidean distances, ``sqrt(max(|a|^2 + |b|^2 - 2ab, 1e-12))`` as MMT's
    ``euclidean_dist``: the clamp keeps the gradient finite for identical images."""
    sq = x.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_soft_triplet(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch-hard triplet loss with a soft margin: mean over anchors of
    ``softplus(d(a, hardest positive) - d(a, hardest negative))``.

    SAGE's ``SoftTripletLoss_vallia(margin=0)``: ``-log_softmax([d_ap, d_an])[1]``, which is this
    softplus. The hardest positive may be the anchor itself (distance ~1e-6) when it is its
    identity's only image in the batch, as in the authors' code. Needs two identities in a batch.
    """
    if features.ndim != 2 or targets.shape != (features.shape[0],):
        raise LorexError(
            f"triplet: expected features (B, D) and targets (B,), got {tuple(features.shape)} "
            f"and {tuple(targets.shape)}"
        )
    same = targets[:, None] == targets[None, :]
    if bool(same.all()):
        raise LorexError("triplet: a batch needs at least two identities")
    dist = pairwise_euclidean(features)
    d_ap = dist.masked_fill(~same, float("-inf")).max(1).values
    d_an = dist.masked_fill(same, float("inf")).min(1).values
    valid = torch.isfinite(d_an)  # an anchor with no negative in the batch adds nothing
    return F.softplus(d_ap[valid] - d_an[valid]).sum() / features.shape[0]
