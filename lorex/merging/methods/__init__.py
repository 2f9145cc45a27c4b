"""One module per merge method; importing this package registers them all."""

from lorex.merging.methods import average, dare, doge, task_arithmetic, ties

__all__ = ["average", "dare", "doge", "task_arithmetic", "ties"]
