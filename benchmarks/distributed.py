"""Data-parallel training on torch.distributed: 2 gloo processes against 1, side by side.

The same ``lorex train`` command (same global batch, same seed) runs as one process with 2 and
with 1 intra-op threads, and under ``torchrun`` as 2 processes of 1 thread each. On this 2-core
machine two processes cannot be faster than one process using both cores: the point is the
overhead of DDP (gradient all-reduce, sharding), not a speed-up. Per-step time is rank 0's
training time over its steps (it includes waiting for the all-reduce).

    python benchmarks/distributed.py --out benchmarks/results/distributed [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorex
from lorex.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def note(rows: dict) -> str:
    """What the ratio means, from the numbers measured."""
    two = rows["2 processes (torchrun, gloo), 1 thread each"]["step_ms"]
    one_two = rows["1 process, 2 threads"]["step_ms"]
    one_one = rows["1 process, 1 thread"]["step_ms"]
    verdict = "faster" if two < one_two else "slower"
    return (
        "Two processes on two cores are not expected to beat one process that uses both cores "
        "through intra-op threads: the work is the same, and DDP adds an all-reduce of every "
        f"gradient each step. Measured here they were {abs(1 - two / one_two):.0%} {verdict}: "
        f"threads gave {one_one / one_two:.2f}x over one thread, two processes "
        f"{one_one / two:.2f}x. The point is that the overhead is small. Accuracies differ by "
        "a few points because float sums depend on the thread count, and 32 steps leave the "
        "model near chance, where that flips predictions."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/distributed")
    parser.add_argument("--quick", action="store_true", help="fewer steps, a smaller model")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (best kept)")
    parser.add_argument("--work", type=Path, help="models and runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    preset = "vit-micro" if args.quick else "vit-tiny"
    samples, batch = (512, 64) if args.quick else (2048, 64)
    env = dict(os.environ)
    py = [sys.executable]
    work = args.work or Path(tempfile.mkdtemp(prefix="lorex-distributed-"))
    base = work / f"base-{preset}"
    if not (base / "model.safetensors").is_file():
        run(
            [*py, "-m", "lorex", "pretrain", "--preset", preset, "--data", "digits/mnist",
             "--epochs", "1", "--max-samples", "256", "--out", str(base)],
            env,
        )  # fmt: skip
    train = ["train", "--base", str(base), "--data", "digits/mnist", "--method", "full"]
    train += ["--epochs", "1", "--max-samples", str(samples), "--batch-size", str(batch)]
    train += ["--no-checkpoint"]
    settings = {
        "1 process, 2 threads": (py + ["-m", "lorex"], "2"),
        "1 process, 1 thread": (py + ["-m", "lorex"], "1"),
        "2 processes (torchrun, gloo), 1 thread each": (
            py
            + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorex"],
            "1",
        ),
    }
    steps = -(-samples // batch)
    rows = {}
    for _ in range(args.repeats):  # interleaved, so that the machine's drift hits all alike
        for name, (launcher, threads) in settings.items():
            target = work / name.split(",")[0].replace(" ", "-")
            wall = run(
                [*launcher, *train, "--out", str(target)], {**env, "OMP_NUM_THREADS": threads}
            )
            metrics = json.loads((target / "metrics.json").read_text())
            step_ms = 1000 * metrics["train_seconds"] / steps
            best = rows.get(name)
            if best is None or step_ms < best["step_ms"]:
                rows[name] = {"step_ms": step_ms, "wall_s": wall, "accuracy": metrics["accuracy"]}
    one = rows["1 process, 2 threads"]["step_ms"]
    for row in rows.values():
        row["ratio_to_1_process_2_threads"] = row["step_ms"] / one
    results = {
        "settings": {"preset": preset, "samples": samples, "global_batch": batch, "steps": steps},
        "results": rows,
        "note": note(rows),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "torch_version": torch.__version__,
        "lorex_version": lorex.__version__,
    }
    write_json(out / "results.json", results)
    lines = [
        "# Data-parallel training: 2 processes against 1",
        "",
        f"`lorex train --method full` on {samples} digits/mnist images, {preset}, global batch "
        f"{batch} ({steps} steps), the same command in every row. Best of {args.repeats} "
        "interleaved runs. Per-step time is rank 0's training time over its steps.",
        "",
        "| setting | ms per step | x 1 process, 2 threads | wall s | accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['step_ms']:.1f} | {row['ratio_to_1_process_2_threads']:.2f} | "
            f"{row['wall_s']:.1f} | {row['accuracy']:.4f} |"
        )
    lines += ["", results["note"], ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
