"""SAGE-reID: source-free multi-source adaptation with gated LoRA experts (docs/sage.md)."""

from lorex.adaptation.sage.classification import adapt_classification
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import averaged_sources, gated_model, train_gate
from lorex.adaptation.sage.pipeline import adapt_reid
from lorex.adaptation.sage.relabel import class_pseudo_labels
from lorex.adaptation.sage.target_experts import adapt_source_expert

__all__ = [
    "SageConfig",
    "adapt_classification",
    "adapt_reid",
    "adapt_source_expert",
    "averaged_sources",
    "class_pseudo_labels",
    "gated_model",
    "train_gate",
]
