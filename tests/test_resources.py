"""Peak training memory: the process's RSS on the CPU, the device allocator on CUDA."""

import time
import types

import pytest
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


# --- positive controls: real allocations in fresh processes (no stand-ins) ----------------------
def _fresh(code: str) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


ALLOCATE = """
import json, time, torch
from lorex.metrics.resources import PeakMemory, MB
with PeakMemory(interval=0.001) as idle:
    time.sleep(0.05)
with PeakMemory(interval=0.001) as busy:
    x = torch.ones(256 * MB // 4)  # 256 MB, every page written
    time.sleep(0.05)
    del x
print(json.dumps({"idle": idle.peak_delta_mb, "busy": busy.peak_delta_mb}))
"""


@pytest.mark.slow
def test_the_cpu_sampler_sees_a_real_allocation_in_a_fresh_process():
    """A fresh process has no freed pages to reuse, so a 256 MB tensor it writes must show as
    about 256 MB of RSS growth, and a block that allocates nothing as almost none."""
    peaks = _fresh(ALLOCATE)
    assert 240 <= peaks["busy"] <= 300, peaks
    assert peaks["idle"] < 10, peaks


HOG = """
import json, sys, torch
from lorex.merging import merge_models, method_from_name
from lorex.merging.methods import TaskArithmetic

class Hog(TaskArithmetic):
    '''Task arithmetic that also holds a known 128 MB buffer for the whole merge.'''
    def prepare(self, ctx):
        self.hog = torch.ones(128 * 2**20 // 4)

base, out, *experts = sys.argv[1:]
plain = merge_models(method_from_name("task-arithmetic"), base, experts, out + "-a", progress=False)
hog = merge_models(Hog(), base, experts, out + "-b", progress=False)
print(json.dumps({"plain": plain["peak_added_mb"], "hog": hog["peak_added_mb"]}))
"""


@pytest.mark.slow
def test_the_merge_memory_record_sees_a_known_allocation(tmp_path):
    """The positive control of the merge memory tests: a method that holds 128 MB more than
    task arithmetic is recorded (merge.json's peak_added_mb) as about 128 MB more."""
    import subprocess
    import sys

    from tests.test_merging import make_experts

    base, experts = make_experts(tmp_path, n_full=2, with_lora=False)
    args = [str(base), str(tmp_path / "out"), *map(str, experts)]
    done = subprocess.run(
        [sys.executable, "-c", HOG, *args], capture_output=True, text=True, check=True
    )
    import json

    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert 120 <= peaks["hog"] - peaks["plain"] <= 150, peaks
