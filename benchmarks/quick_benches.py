"""Time every `lorex bench ... --quick` once the quick demo's cache exists, and collect what each
one shows: its scores against chance and its order of methods against the full bench's.

    python benchmarks/quick_benches.py --out benchmarks/results

First runs `lorex demo --quick` into a new cache (not timed: that is `demo_quick.py`'s job), then
each quick bench with that cache into a new, empty folder, then copied to ``OUT/<bench>-quick``
(the merge bench's to ``OUT/merge``, where its quick results have always been). Writes
``quick_benches.json`` and ``quick_benches.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorex

TARGET_SECONDS = 300
#: bench -> (results folder under OUT, the file that holds its quick checks)
BENCHES = {
    "losa": ("losa-quick", "results.json"),
    "merge": ("merge", "quick_checks.json"),
    "sage": ("sage-quick", "results.json"),
    "cross-modal": ("cross_modal-quick", "summary.json"),
}


#: bench -> the folder under OUT of the full run a quick run compares its order with
FULL = {"losa": "losa", "merge": "merge-full", "sage": "sage", "cross-modal": "cross_modal"}


def _lorex(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorex", *args], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only", nargs="*", choices=list(BENCHES), help="these benches only")
    args = parser.parse_args()
    record_file = args.out / "quick_benches.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"benches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LOREX_CACHE_DIR": str(Path(tmp) / "cache")}
        demo_seconds = _lorex(["demo", "--quick", "--out", str(Path(tmp) / "demo")], env)
        print(f"demo (fills the cache): {demo_seconds:.0f} s", flush=True)
        for bench in args.only or BENCHES:
            folder, checks_file = BENCHES[bench]
            fresh = Path(tmp) / "benches" / folder  # nothing reused from an earlier run
            full = ["--full-results", str(args.out / FULL[bench] / "results.json")]
            seconds = _lorex(["bench", bench, "--quick", "--out", str(fresh), *full], env)
            out = args.out / folder
            shutil.copytree(fresh, out, dirs_exist_ok=True)  # models are git-ignored there
            data = json.loads((out / checks_file).read_text())
            checks = data.get("quick_checks", data)
            record["benches"][bench] = {
                "seconds": round(seconds, 1),
                "within_target": seconds < TARGET_SECONDS,
                "results": str(out / "results.md"),
                "lines": checks["lines"],
            }
            print(f"bench {bench} --quick: {seconds:.0f} s", flush=True)
    record.update(
        target_seconds=TARGET_SECONDS,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        torch=torch.__version__,
        lorex=lorex.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# The quick benches, once the quick demo's cache exists",
        "",
        f"{record['cpu_count']} CPU cores, torch {record['torch']}, {record['date']}; each bench "
        f"from a fresh output folder (target under {TARGET_SECONDS} s).",
        "",
    ]
    for bench, r in record["benches"].items():
        lines += [
            f"## `lorex bench {bench} --quick`: {r['seconds']:.0f} s "
            f"({'met' if r['within_target'] else 'missed'}; `{r['results']}`)",
            "",
            *r["lines"],
            "",
        ]
    (args.out / "quick_benches.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
