"""Lorex: adapt and merge low-rank experts on frozen pretrained vision backbones."""

__version__ = "0.1.0"

from lorex.models import LorexModel, load_model, save_model  # noqa: E402

__all__ = ["LorexModel", "__version__", "load_model", "save_model"]
