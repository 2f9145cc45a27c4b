"""Metrics as plain functions on arrays (re-ID retrieval in ``lorex.metrics.reid``), and resource
measurement for training runs."""

from lorex.metrics.classification import accuracy, confusion_matrix

__all__ = ["accuracy", "confusion_matrix"]
