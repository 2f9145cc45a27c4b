"""Per-step costs of the SAGE pipeline at ViT-B/16, 256x128, and a wall-time estimate for
Market-1501-sized data on 1, 8 and 64 GPUs (docs/scaling.md).

Measures, on one device: a full fine-tuning step (stage 1) and a LoRA step (stage 2) at a batch
of 64 (16 ids x 4), with the re-ID loss and AdamW; forward-only feature extraction (the
pseudo-labelling pass); peak memory of each. Then, on the CPU, the k-reciprocal Jaccard +
DBSCAN clustering of Market's 12,936 train features, which runs on rank 0 alone. The estimate
combines them with the recipe of the SAGE brief and an all-reduce model (stated in the output).

    python benchmarks/scaling.py --device cuda --out benchmarks/results/scaling   # on a GPU
    python benchmarks/scaling.py --device cpu --quick --out /tmp/scaling           # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import lorex
from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adapters.lora import LoraConfig, add_adapter, default_targets, mark_trainable
from lorex.backbones import build_backbone
from lorex.experiments.sage_bench import VIT_B_REID
from lorex.io import write_json
from lorex.models import LorexModel
from lorex.training.reid_losses import batch_hard_soft_triplet, label_smoothed_cross_entropy

MARKET_TRAIN = 12_936
# SAGE's recipe (../shared/references/sage_losa.md, Part A): steps at a global batch of 64.
RECIPE = {
    "sources": 3,
    "stage1_steps": 120 * 200,  # per source: full fine-tuning
    "stage2_epochs": 70,  # per source: one clustering + 400 LoRA steps per epoch
    "stage2_steps_per_epoch": 400,
    "stage4_gates": 1,  # one clustering + 41 gate steps
    "stage4_steps": 41,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reid_model(device: torch.device, lora: bool) -> LorexModel:
    torch.manual_seed(0)
    model = LorexModel(build_backbone(VIT_B_REID), VIT_B_REID)
    model.add_head("source", [str(i) for i in range(751)], kind="bnneck")
    if lora:
        add_adapter(
            model.backbone,
            LoraConfig(
                r=8, lora_alpha=32, target_modules=default_targets(model.backbone), bias="all"
            ),
        )
        mark_trainable(model.backbone, "default")
    return model.to(device)


def train_step_ms(device: torch.device, lora: bool, batch: int, steps: int) -> dict:
    model = reid_model(device, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    head = model.heads[model.active_head]
    x = torch.rand(batch, 3, 256, 128, device=device)
    y = torch.arange(batch, device=device) // 4  # 16 ids x 4
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        feats = model.features(x)
        loss = label_smoothed_cross_entropy(head(feats), y, 0.1) + batch_hard_soft_triplet(feats, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= 2:  # warm-up steps are not timed
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "ms_per_step": 1000 * float(np.median(times)),
        "batch": batch,
        "trainable_params": sum(p.numel() for p in params),
        "peak_memory_mb": peak,
    }


@torch.inference_mode()
def extract_images_per_s(device: torch.device, batch: int, rounds: int) -> float:
    model = reid_model(device, lora=False).eval()
    x = torch.rand(batch, 3, 256, 128, device=device)
    model.embedding(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        model.embedding(x)
    sync(device)
    return rounds * batch / (time.perf_counter() - start)


def clustering_seconds(n: int, dim: int = 768, ids: int = 751) -> float:
    """k-reciprocal Jaccard (sparse) + DBSCAN on ``n`` features in ``ids`` loose clusters."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(ids, dim))
    feats = centres[rng.integers(0, ids, n)] + 0.8 * rng.normal(size=(n, dim))
    labeler = PseudoLabeler(sparse=True)
    start = time.perf_counter()
    labeler(feats.astype(np.float32))
    return time.perf_counter() - start


def allreduce_ms(params: int, gpus: int, bandwidth_gbs: float, latency_us: float) -> float:
    """Ring all-reduce of fp32 gradients: 2 (N - 1) / N of the bytes over the slowest link."""
    if gpus == 1:
        return 0.0
    volume = 2 * (gpus - 1) / gpus * params * 4
    return 1000 * volume / (bandwidth_gbs * 1e9) + 2 * (gpus - 1) * latency_us / 1000


def estimate(m: dict, gpus: int) -> dict:
    """Hours per stage with the per-GPU batch fixed at 64 (the global batch grows with N and
    the recipe's steps shrink by N), features extracted in shards, clustering on rank 0."""
    # within a node NVLink (8 GPUs); beyond, the inter-node network limits the ring
    bandwidth, latency = (150.0, 10.0) if gpus <= 8 else (25.0, 30.0)
    full, lora = m["full_step"], m["lora_step"]
    t_full = full["ms_per_step"] + allreduce_ms(full["trainable_params"], gpus, bandwidth, latency)
    t_lora = lora["ms_per_step"] + allreduce_ms(lora["trainable_params"], gpus, bandwidth, latency)
    extract_s = MARKET_TRAIN / gpus / m["extract_images_per_s"]
    r = RECIPE
    stage1 = r["sources"] * r["stage1_steps"] / gpus * t_full / 1000
    per_epoch = extract_s + m["clustering_s"] + r["stage2_steps_per_epoch"] / gpus * t_lora / 1000
    stage2 = r["sources"] * r["stage2_epochs"] * per_epoch
    stage4 = r["stage4_gates"] * (extract_s * 1.1 + m["clustering_s"])  # gated pass ~1.05-1.1x
    stage4 += r["stage4_steps"] * t_lora / 1000
    hours = {k: v / 3600 for k, v in {"stage1": stage1, "stage2": stage2, "stage4": stage4}.items()}
    hours["total"] = sum(hours.values())
    hours["clustering_share"] = (
        r["sources"] * r["stage2_epochs"] * m["clustering_s"] / 3600 / hours["total"]
    )
    return {"gpus": gpus, "hours": hours, "allreduce_gbs": bandwidth}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling"))
    parser.add_argument("--quick", action="store_true", help="tiny batches (a smoke test)")
    parser.add_argument("--clustering-n", type=int, default=MARKET_TRAIN)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = 8 if args.quick else 64
    steps = 2 if args.quick else 10
    measured = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "full_step": train_step_ms(device, lora=False, batch=batch, steps=steps),
        "lora_step": train_step_ms(device, lora=True, batch=batch, steps=steps),
        "extract_images_per_s": extract_images_per_s(device, 32 if args.quick else 256, steps),
        "clustering_n": args.clustering_n,
        "clustering_s": clustering_seconds(args.clustering_n),
    }
    results = {
        "measured": measured,
        "recipe": RECIPE,
        "estimate": [estimate(measured, g) for g in (1, 8, 64)],
        "assumptions": "fp32 as lorex runs; per-GPU batch 64 (global 64 N, steps / N); ring "
        "all-reduce at 150 GB/s within an 8-GPU node, 25 GB/s across nodes; clustering on rank "
        "0's CPU, not sharded; stage 1 and 2 for every source one after another on all GPUs",
        "torch_version": torch.__version__,
        "lorex_version": lorex.__version__,
        "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"results-{device.type}.json", results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
