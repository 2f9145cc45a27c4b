"""Scoring a trained model: a classifier's accuracy, a re-ID model's retrieval, and their speed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lorex.data import ImageDataset
from lorex.data.market1501 import Market1501
from lorex.errors import LorexError
from lorex.metrics import accuracy
from lorex.metrics.agreement import mean_se
from lorex.metrics.reid import reid_scores
from lorex.metrics.resources import inference_ms_per_image
from lorex.models import LorexModel
from lorex.training.batches import as_float, chw_tensor, images_to_tensor, predict

RANKS = (1, 5, 10)


def check_classes(model: LorexModel, data: ImageDataset, source: str) -> None:
    if list(model.classes) != list(data.classes):
        raise LorexError(
            f"{source}: classes {data.classes[:5]}... do not match the model head's "
            f"{model.classes[:5]}..."
        )


def evaluate_classifier(
    model: LorexModel, data: ImageDataset, device: torch.device | str = "cpu", batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model``'s active head on ``data``."""
    check_classes(model, data, data.name or "dataset")
    return accuracy(predict(model, data, batch_size, device), data.labels)


def classifier_ms_per_image(
    model: LorexModel, data: ImageDataset, device: torch.device, batch: int = 64
) -> float:
    x, _ = images_to_tensor(data)
    return inference_ms_per_image(model, as_float(x[:batch], device))


@torch.inference_mode()
def reid_embeddings(
    model: LorexModel,
    images: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``model.embedding`` (L2-normalised) of uint8 ``(N, H, W, 3)`` images, in eval mode."""
    device = torch.device(device)
    model.eval()
    x = chw_tensor(images)
    return torch.cat(
        [
            model.embedding(as_float(x[i : i + batch_size], device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def evaluate_reid(
    model: LorexModel, data: Market1501, device: torch.device | str = "cpu", batch_size: int = 256
) -> dict[str, Any]:
    """Query-vs-gallery retrieval: ``mAP``, ``rank1``, ``rank5``, ``rank10``, ``mINP`` and
    ``num_valid_queries``, on L2-normalised embeddings with the squared Euclidean distance
    ``2 - 2 cos`` (ranks as the Euclidean distance does)."""
    hw = tuple(int(s) for s in data.query.images.shape[1:3])
    if model.image_hw != hw:
        raise LorexError(
            f"the model takes {model.image_hw[0]}x{model.image_hw[1]} images, the data is "
            f"{hw[0]}x{hw[1]}"
        )
    q = reid_embeddings(model, data.query.images, batch_size, device)
    g = reid_embeddings(model, data.gallery.images, batch_size, device)
    dist = (2.0 - 2.0 * (q @ g.T)).clamp_(min=0.0).numpy()
    r = reid_scores(dist, data.query.ids, data.gallery.ids, data.query.cams, data.gallery.cams)
    out = {"mAP": r["mAP"], **{f"rank{k}": float(r["cmc"][k - 1]) for k in RANKS}}
    out.update(mINP=r["mINP"], num_valid_queries=r["num_valid_queries"])
    out["mAP_se"] = mean_se(r["ap"].tolist())  # over queries: the noise of a small gallery
    return out


class _Embedder(nn.Module):
    def __init__(self, model: LorexModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(x)


def embedding_ms_per_image(
    model: LorexModel, images: np.ndarray, device: torch.device | str = "cpu", batch: int = 64
) -> float:
    return inference_ms_per_image(_Embedder(model), as_float(chw_tensor(images[:batch]), device))


def reid_line(scores: dict[str, Any]) -> str:
    """``mAP 0.4123, rank-1 0.6012, rank-5 ..., mINP 0.1234`` for the CLI."""
    ranks = ", ".join(f"rank-{k} {scores[f'rank{k}']:.4f}" for k in RANKS)
    return f"mAP {scores['mAP']:.4f}, {ranks}, mINP {scores['mINP']:.4f}"
