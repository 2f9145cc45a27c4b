"""The model object and its on-disk directory format."""

from lorex.models.model import BNNeckHead, LorexModel, head_key
from lorex.models.store import is_model_dir, load_model, save_model

__all__ = ["BNNeckHead", "LorexModel", "head_key", "is_model_dir", "load_model", "save_model"]
