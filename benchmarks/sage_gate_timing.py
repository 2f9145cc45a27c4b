"""Gated inference against one plain model at ViT-B size (256x128 crops), on any device.

The SAGE goal is gated inference at <= 1.2x one model. ``lorex bench sage`` measures it on the
CPU, where two runs differed by 0.1x; this script repeats the measurement for several batch
sizes and expert counts on one device, side by side, and writes JSON and Markdown.

Usage: python benchmarks/sage_gate_timing.py --device cuda --out DIR [--batch 16 64]
       [--experts 3 5] [--rounds 10]
"""

import argparse
import json
import platform
from pathlib import Path

import torch

import lorex
from lorex.experiments.sage_bench import gated_time_at_vit_b
from lorex.training.expert_jobs import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--experts", type=int, nargs="+", default=[3])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    rows = []
    for k in args.experts:
        for batch in args.batch:
            r = gated_time_at_vit_b(k, 8, batch, device, rounds=args.rounds)
            rows.append(r)
            print(k, batch, {n: round(v, 3) for n, v in r["ratio_to_single"].items()}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "lorex": lorex.__version__,
        "rounds": args.rounds,
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows],
    }
    (args.out / "gate_timing.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# Gated inference at ViT-B size on {name} ({device})",
        "",
        f"Random weights, 256x128 crops, rank-8 experts; best of {args.rounds} interleaved rounds;",
        f"torch {torch.__version__}. Times are relative to one plain ViT-B in the same rounds.",
        "",
        "| experts | batch | one model ms/image | published gate | light gate | ensemble |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["ratio_to_single"]
        lines.append(
            f"| {r['experts']} | {r['batch']} | {r['ms_per_image']['single']:.3f} | "
            f"{ratio['gated']:.3f}x | {ratio['gated-light']:.3f}x | {r['experts']}x |"
        )
    (args.out / "gate_timing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
