"""lorex LoRA against PEFT LoRA on the same ViT, rank and targets; and LoRA inference overhead.

Training: each implementation runs in its own fresh subprocess (peak RSS is a lifetime high-water
mark), alternating lorex/peft over several rounds, so both see the same machine load. Inference:
bare backbone, unmerged LoRA and merged LoRA, timed side by side in one process.

    python benchmarks/lora_vs_peft.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PRESET, RANK, BATCH = "vit-micro", 8, 64
INFERENCE_PRESETS = ("vit-micro", "vit-tiny")


def _model(preset: str = PRESET):
    from lorex.backbones import build_backbone, preset_config

    torch.manual_seed(0)
    return build_backbone(preset_config(preset))


def _targets() -> str:
    from lorex.adapters.lora import VIT_TARGETS

    return VIT_TARGETS


def child(impl: str, steps: int, warmup: int) -> dict:
    """One training run: returns median step time and the peak RSS it added."""
    backbone = _model()
    if impl == "lorex":
        from lorex.adapters import lora

        lora.add_adapter(
            backbone, lora.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=_targets())
        )
        lora.mark_trainable(backbone, "default")
    else:
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=_targets())
        backbone = peft.get_peft_model(backbone, config)
    head = torch.nn.Linear(128, 10)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(head(backbone(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in params) - sum(p.numel() for p in head.parameters())
    return {
        "impl": impl,
        "step_ms": 1000 * statistics.median(times),
        "peak_train_mb": (peak - base_rss) / 1024,
        "trainable_params": trainable,
    }


def inference(repeats: int, presets: tuple[str, ...] = INFERENCE_PRESETS) -> dict:
    """Median latency of the bare backbone, lorex LoRA unmerged and merged, and PEFT unmerged."""
    import peft
    from torch.utils.benchmark import Timer

    from lorex.adapters import lora

    result = {}
    for preset in presets:
        bare = _model(preset).eval()
        adapted = _model(preset).eval()
        lora.add_adapter(adapted, lora.LoraConfig(r=RANK, target_modules=_targets()))
        merged = _model(preset).eval()
        lora.add_adapter(merged, lora.LoraConfig(r=RANK, target_modules=_targets()))
        lora.merge_adapter(merged, "default")
        config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=_targets())
        peft_model = peft.get_peft_model(_model(preset), config).eval()
        models = {"bare": bare, "unmerged": adapted, "merged": merged, "peft_unmerged": peft_model}
        size = _model(preset).patch_embed.img_size
        for batch in (1, BATCH):
            x = torch.rand(batch, 3, size, size)
            row: dict[str, list[float]] = {}
            for _ in range(repeats):  # interleave the models so drift hits each equally
                for name, model in models.items():
                    with torch.inference_mode():
                        t = Timer("m(x)", globals={"m": model, "x": x}).blocked_autorange(
                            min_run_time=0.5
                        )
                    row.setdefault(name, []).append(t.median * 1000)
            med = {k: statistics.median(v) for k, v in row.items()}
            result[f"{preset}/batch_{batch}"] = {
                **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                **{f"{k}_over_bare": round(med[k] / med["bare"], 3) for k in models if k != "bare"},
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=("lorex", "peft"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, warmup=3)))
        return
    runs: dict[str, list[dict]] = {"lorex": [], "peft": []}
    for _ in range(args.rounds):
        for impl in ("lorex", "peft"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", impl, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {
        impl: {
            "step_ms": round(statistics.median(r["step_ms"] for r in rs), 2),
            "peak_train_mb": round(statistics.median(r["peak_train_mb"] for r in rs), 1),
            "trainable_params": rs[0]["trainable_params"],
        }
        for impl, rs in runs.items()
    }
    import peft

    record = {
        "benchmark": "lora_vs_peft",
        "preset": PRESET,
        "rank": RANK,
        "batch": BATCH,
        "targets": _targets(),
        "rounds": args.rounds,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "train": summary,
        "step_time_ratio_lorex_over_peft": round(
            summary["lorex"]["step_ms"] / summary["peft"]["step_ms"], 3
        ),
        "memory_ratio_lorex_over_peft": round(
            summary["lorex"]["peak_train_mb"] / max(summary["peft"]["peak_train_mb"], 1e-9), 3
        ),
        "inference": inference(repeats=3),
        "raw": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_vs_peft.json").write_text(json.dumps(record, indent=2) + "\n")
    inf = record["inference"]
    (args.out / "lora_vs_peft.md").write_text(
        f"# lorex LoRA vs PEFT {peft.__version__} ({PRESET}, r={RANK}, batch {BATCH}, "
        f"{os.cpu_count()} CPU cores)\n\n"
        "Training, median over rounds, each run in a fresh subprocess:\n\n"
        "| implementation | step ms | peak train MB | trainable params |\n|---|---|---|---|\n"
        + "".join(
            f"| {k} | {v['step_ms']} | {v['peak_train_mb']} | {v['trainable_params']:,} |\n"
            for k, v in summary.items()
        )
        + f"\nlorex / PEFT: step time {record['step_time_ratio_lorex_over_peft']}, "
        f"memory {record['memory_ratio_lorex_over_peft']}.\n\n"
        "Inference latency (median ms), side by side in one process. Unmerged lorex LoRA adds\n"
        "the update to the weight per call when no gradient is needed (see docs/lora.md):\n\n"
        "| preset / batch | bare | lorex unmerged | lorex merged | PEFT unmerged "
        "| unmerged/bare | merged/bare | PEFT/bare |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "".join(
            f"| {key.replace('/batch_', ' / ')} | {v['bare_ms']} | {v['unmerged_ms']} | "
            f"{v['merged_ms']} | {v['peft_unmerged_ms']} | {v['unmerged_over_bare']} | "
            f"{v['merged_over_bare']} | {v['peft_unmerged_over_bare']} |\n"
            for key, v in inf.items()
        )
    )
    print(json.dumps({k: v for k, v in record.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
