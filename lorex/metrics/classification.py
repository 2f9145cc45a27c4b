"""Classification metrics on arrays of integer labels."""

from __future__ import annotations

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: the fraction of predictions equal to the labels (0.0 for no samples)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"shape mismatch: {predictions.shape} predictions, {labels.shape} labels")
    return float((predictions == labels).mean()) if labels.size else 0.0


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = how many samples of true class ``i`` were predicted as ``j``."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(predictions)), 1)
    return m
