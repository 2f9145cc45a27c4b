"""Lorex: adapt and merge low-rank experts on frozen pretrained vision backbones."""

from lorex.models import LorexModel, load_model, save_model
from lorex.version import __version__

__all__ = ["LorexModel", "__version__", "load_model", "save_model"]
