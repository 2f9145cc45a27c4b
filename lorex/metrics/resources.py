"""Peak memory during a block of work, sampled from a background thread.

``ru_maxrss`` is a lifetime high-water mark that cannot be reset, so a sampler that starts at the
block gives the peak of the block itself; the difference to the RSS at its start is the memory the
work needed (activations, gradients, optimiser state). On a CUDA device that memory is on the
device, so there the difference is taken from PyTorch's allocator instead of the RSS.
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil
import torch

MB = 1024 * 1024


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_rss_mb`` and ``pm.peak_delta_mb`` (the
    device's allocator on CUDA, the process's RSS elsewhere)."""

    def __init__(self, interval: float = 0.005, device: torch.device | str = "cpu"):
        self.interval = interval
        self.device = torch.device(device)
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = 0
        self.peak_device_mb: float | None = None
        self.start_device_mb = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_device_mb = torch.cuda.memory_allocated(self.device) / MB
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self.device.type == "cuda":
            self.peak_device_mb = torch.cuda.max_memory_allocated(self.device) / MB

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss / MB

    @property
    def peak_delta_mb(self) -> float:
        if self.peak_device_mb is not None:
            return max(0.0, self.peak_device_mb - self.start_device_mb)
        return max(0.0, (self.peak_rss - self.start_rss) / MB)


@torch.no_grad()
def inference_ms_per_image(
    model: torch.nn.Module, batch: torch.Tensor, repeats: int = 5, warmup: int = 1
) -> float:
    """Median wall time of ``model(batch)`` per sample, in milliseconds (eval mode)."""
    model.eval()
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        start = time.perf_counter()
        model(batch)
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / len(batch)
