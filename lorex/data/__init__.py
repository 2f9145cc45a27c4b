"""Built-in multi-domain data and the ImageFolder format."""

from lorex.data.cache import cache_dir
from lorex.data.dataset import ImageDataset
from lorex.data.imagefolder import read_imagefolder, write_imagefolder
from lorex.data.paired import PAIRED_SETS, PairedDataset, load_paired
from lorex.data.registry import BUILTINS, DIGIT_DOMAINS, load_dataset
from lorex.data.reid_synth import REID_DOMAINS, load_reid, make_reid_domain

__all__ = [
    "BUILTINS",
    "DIGIT_DOMAINS",
    "ImageDataset",
    "PAIRED_SETS",
    "PairedDataset",
    "REID_DOMAINS",
    "cache_dir",
    "load_dataset",
    "load_paired",
    "load_reid",
    "make_reid_domain",
    "read_imagefolder",
    "write_imagefolder",
]
