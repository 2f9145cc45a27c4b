"""One module per merge method; importing this package registers them all."""

from lorex.merging.methods import (
    average,
    dare,
    doge,
    iso_c,
    iso_cts,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)

__all__ = [
    "average",
    "dare",
    "doge",
    "iso_c",
    "iso_cts",
    "task_arithmetic",
    "ties",
    "tsv_m",
    "wudi",
]
