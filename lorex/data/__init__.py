"""Built-in multi-domain data and the ImageFolder format."""

from lorex.data.dataset import ImageDataset
from lorex.data.imagefolder import read_imagefolder, write_imagefolder
from lorex.data.registry import BUILTINS, DIGIT_DOMAINS, cache_dir, load_dataset

__all__ = [
    "BUILTINS",
    "DIGIT_DOMAINS",
    "ImageDataset",
    "cache_dir",
    "load_dataset",
    "read_imagefolder",
    "write_imagefolder",
]
