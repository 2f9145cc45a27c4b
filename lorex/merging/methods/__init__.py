"""One module per merge method; importing this package registers them all."""

from lorex.merging.methods import average, dare, doge, iso_c, task_arithmetic, ties, tsv_m

__all__ = ["average", "dare", "doge", "iso_c", "task_arithmetic", "ties", "tsv_m"]
