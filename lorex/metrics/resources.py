"""Peak memory during a block of work, sampled from a background thread.

``ru_maxrss`` is a lifetime high-water mark that cannot be reset, so a sampler that starts at the
block gives the peak of the block itself; the difference to the RSS at its start is the memory the
work needed (activations, gradients, optimiser state).
"""

from __future__ import annotations

import threading

import psutil
import torch

MB = 1024 * 1024


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_rss_mb`` and ``pm.peak_delta_mb``."""

    def __init__(self, interval: float = 0.005, device: torch.device | str = "cpu"):
        self.interval = interval
        self.device = torch.device(device)
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = 0
        self.peak_device_mb: float | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
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
        return max(0.0, (self.peak_rss - self.start_rss) / MB)
