"""Peak training memory: the process's RSS on the CPU, the device allocator on CUDA."""

import numpy as np
import torch

from lorex.metrics import resources
from lorex.metrics.resources import MB, PeakMemory


def test_cpu_peak_counts_memory_allocated_inside_the_block():
    with PeakMemory(interval=0.001) as pm:
        block = np.ones(64 * MB // 8)  # 64 MB, touched
        block.sum()
    assert pm.peak_device_mb is None
    assert 48 <= pm.peak_delta_mb <= 512


def test_cuda_peak_is_the_allocator_growth_not_the_rss(monkeypatch):
    """No GPU here: the allocator's counters are stood in for. On CUDA the RSS hardly moves
    (the work lives on the device), so the delta must come from the allocator."""
    allocated = {"now": 300 * MB, "peak": 300 * MB}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: allocated["peak"])
    with PeakMemory(device="cuda") as pm:
        allocated["peak"] = 1300 * MB  # activations during the block
    assert pm.peak_device_mb == 1300
    assert pm.peak_delta_mb == 1000
    assert resources.PeakMemory(device="cpu").peak_device_mb is None
