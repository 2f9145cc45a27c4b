"""How SAGE labels the unlabelled target: pseudo-identities for re-ID, SHOT's class labels for
classification.

Re-ID (stages 2 and 4): the current model's L2-normalised BN-neck features -> k-reciprocal
Jaccard distance -> DBSCAN (eps fixed on the first clustering); the outliers are dropped and the
classifier is reset to the normalised cluster centroids (a fixed prototype classifier, as SAGE's
code does). Classification: SHOT's centroid labels (Liang et al. 2020), since the target shares
the sources' classes. The training on these labels is in :mod:`lorex.adaptation.sage.objectives`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorex.adaptation.pseudo_labels import PseudoLabeler, centroids
from lorex.data.reid import PKSampler
from lorex.errors import LorexError
from lorex.models import BNNeckHead, LorexModel
from lorex.training import distributed
from lorex.training.batches import as_float, features_and_head
from lorex.training.evaluation import reid_embeddings


def reid_head(model: LorexModel) -> BNNeckHead:
    head = model.heads[model.active_head] if model.active_head is not None else None
    if not isinstance(head, BNNeckHead):
        raise LorexError("target adaptation needs a model whose active head is a BN-neck")
    return head


def set_centroid_classifier(model: LorexModel, cents: np.ndarray) -> None:
    """Replace the active BN-neck's classifier by the frozen cluster centroids, one row each, and
    rename its classes ``cluster-0 .. cluster-{C-1}``."""
    head = reid_head(model)
    weight = torch.as_tensor(cents, dtype=head.bn.weight.dtype, device=head.bn.weight.device)
    classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.device)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    classifier.requires_grad_(False)
    head.classifier = classifier
    model.head_info[model.active_head]["classes"] = [f"cluster-{c}" for c in range(len(cents))]


def relabel(
    model: LorexModel, images: np.ndarray, labeler: PseudoLabeler, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels (N,) (-1: outlier) and the normalised centroids (C, D) by the current
    model; the classifier is reset to the centroids.

    Under torchrun each rank embeds its shard of the images, rank 0 gathers the features,
    clusters them and sends the labels, centroids and eps to every rank: the clustering is
    global, and the centroids are the same bits everywhere."""
    device = torch.device(device)
    world = distributed.current()
    rows = distributed.shard_slice(len(images), world)
    local = reid_embeddings(model, images[rows], device=device)
    link = device if device.type == "cuda" else torch.device("cpu")  # nccl or gloo
    feats = distributed.gather_rows(local.to(link), len(images)).cpu().numpy()
    labels = cents = None
    summary = np.zeros(2)
    if world.main:
        labels, num = labeler(feats)
        summary[:] = num, labeler.eps
        if num >= 2:
            cents = centroids(feats, labels)
    num, eps = distributed.broadcast_array(summary, link)
    labeler.eps = float(eps)
    if num < 2:
        raise LorexError(
            f"pseudo-labelling found {int(num)} cluster(s) in {len(images)} target images (eps "
            f"{eps:.4g}); a larger rho gives a larger eps"
        )
    labels = distributed.broadcast_array(labels, link)
    cents = distributed.broadcast_array(cents, link)
    set_centroid_classifier(model, cents)
    return labels, cents


def cycle_batches(sampler: PKSampler, iters: int) -> list[np.ndarray]:
    batches: list[np.ndarray] = []
    while len(batches) < iters:
        epoch = sampler.epoch()
        if not epoch:
            raise LorexError("too few pseudo-identities with enough images for one P x K batch")
        batches.extend(epoch)
    return batches[:iters]


def class_pseudo_labels(features: np.ndarray, probs: np.ndarray, rounds: int = 2) -> np.ndarray:
    """SHOT's labels: nearest class centroid by cosine, centroids first weighted by ``probs``
    ``(N, C)``, then (each further round) the mean of the images that took that label."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    weights = probs
    labels = np.zeros(len(x), np.int64)
    for _ in range(rounds):
        cents = weights.T @ x / np.maximum(weights.sum(0)[:, None], 1e-12)
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        labels = np.argmax(x @ cents.T, axis=1)
        weights = np.eye(probs.shape[1], dtype=x.dtype)[labels]
    return labels


def features_and_probs(
    model: LorexModel, x: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Features and class probabilities of uint8 images ``x``, as numpy arrays."""
    feats, probs = features_and_head(
        model, x, lambda part: as_float(part, device), batch, lambda logits: F.softmax(logits, 1)
    )
    return feats.numpy(), probs.numpy()
