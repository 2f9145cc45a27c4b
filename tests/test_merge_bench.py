"""``benchmarks/merge_vs_mergekit.py --quick``: both tools run, rows are written as they finish,
and a rerun skips the finished ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "merge_vs_mergekit.py"


@pytest.mark.slow
def test_quick_bench_runs_both_tools_and_resumes(tmp_path):
    pytest.importorskip("mergekit")
    pytest.importorskip("transformers")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--out", str(tmp_path / "r")]
    argv += ["--cache", str(tmp_path / "cache"), "--only", "task_arithmetic", "iso-c"]
    subprocess.run(argv, check=True, env=env, capture_output=True, text=True)
    rows = {p.name: json.loads(p.read_text()) for p in (tmp_path / "r").glob("*__*.json")}
    assert set(rows) == {
        "lorex__task_arithmetic.json",
        "mergekit__task_arithmetic.json",
        "lorex__iso-c.json",
    }
    for row in rows.values():
        (run,) = row["runs"]
        assert run["rc"] == 0 and run["seconds"] > 0 and run["peak_rss_mib"] > 50
        assert row["machine"]["cpus"] == os.cpu_count() and row["versions"]["mergekit"]
        assert row["built"]["parameters"] > 0 and row["seed"] == 0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").glob("*__*.json")}
    again = subprocess.run(argv, check=True, env=env, capture_output=True, text=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing ran again
    assert "| iso-c | lorex |" in again.stdout
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "| task_arithmetic | mergekit |" in summary
