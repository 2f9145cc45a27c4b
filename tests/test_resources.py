"""Peak training memory: the process's RSS on the CPU, the device allocator on CUDA."""

import time
import types

import torch

from lorex.metrics import resources
from lorex.metrics.resources import MB, PeakMemory


def test_cpu_peak_is_the_rss_growth_inside_the_block(monkeypatch):
    """The process's RSS is stood in for: a real allocation may reuse pages the process already
    holds (in a long test session it did), so its growth is not a fixed number."""
    rss = {"now": 900 * MB}

    class Process:
        def memory_info(self):
            return types.SimpleNamespace(rss=rss["now"])

    monkeypatch.setattr(resources.psutil, "Process", Process)
    with PeakMemory(interval=0.001) as pm:
        rss["now"] = 964 * MB  # the block's work, until the sampler thread has seen it
        deadline = time.monotonic() + 10
        while pm.peak_rss < 964 * MB and time.monotonic() < deadline:
            time.sleep(0.001)
        rss["now"] = 920 * MB  # partly freed before the block ends
    assert pm.peak_device_mb is None
    assert pm.peak_delta_mb == 64 and pm.peak_rss_mb == 964


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
