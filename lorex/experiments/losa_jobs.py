"""``lorex bench losa``'s measurements, each run in a fresh process of its own.

``python -m lorex.experiments.losa_jobs JOB`` runs one JSON job (``train``: one method on one
task; ``memory``: two training steps of a deep backbone) and prints its JSON answer last: one
method's allocations never count against another's peak memory.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lorex.adapters.lora import LoraConfig
from lorex.backbones import build_backbone, preset_config
from lorex.data import ImageDataset, load_dataset
from lorex.metrics.resources import inference_ms_per_image
from lorex.models import LorexModel, load_model
from lorex.training.batches import as_float, images_to_tensor
from lorex.training.config import TrainConfig
from lorex.training.evaluation import evaluate_classifier
from lorex.training.methods import TRAINING_METHODS
from lorex.training.objectives.classification import fit


def _resized(data, size: int):
    """Digits upsampled to ``size`` px (bilinear), for backbones made for 224-px images."""
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ImageDataset(np.ascontiguousarray(images), data.labels, data.classes, data.name)


def _make_method(name: str):
    if name == "lora":  # r = 8 on qkv, proj, fc1, fc2 of every block, scaling alpha / r = 2
        return TRAINING_METHODS["lora"](LoraConfig(r=8, lora_alpha=16.0))
    return TRAINING_METHODS[name]()


def run_train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method on one task and measure it (inside a worker process)."""
    torch.manual_seed(job["seed"])
    train = load_dataset(job["task"], "train", job["train_samples"], job["seed"])
    test = load_dataset(job["task"], "test", job["test_samples"], job["seed"])
    if job["image"] != train.image_size[0]:
        train, test = _resized(train, job["image"]), _resized(test, job["image"])
    if job.get("base"):
        model = load_model(job["base"])
    else:
        cfg = preset_config(job["preset"])
        model = LorexModel(build_backbone(cfg), cfg)
    model.add_head(train.name, train.classes)
    cfg = TrainConfig(
        epochs=job["epochs"],
        batch_size=job["batch"],
        lr=job["lr"],
        seed=job["seed"],
        feature_cache=job.get("cache", False),
    )
    result = fit(model, _make_method(job["method"]), train, cfg, progress=False)
    x, _ = images_to_tensor(test)
    latency = inference_ms_per_image(model, as_float(x[: job["batch"]], torch.device("cpu")))
    return {
        "accuracy": evaluate_classifier(model, test),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "peak_train_mb": result.peak_train_mb,
        "peak_rss_mb": result.peak_rss_mb,
        "train_seconds": result.train_seconds,
        "infer_ms_per_image": latency,
        "feature_cache": result.feature_cache,
        "cache_seconds": result.cache_seconds,
        "epochs": job["epochs"],
    }


def run_memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """Peak resident memory of building a backbone and two training steps (worker process)."""
    torch.manual_seed(0)
    cfg = {**preset_config("vit-base-patch16-224"), "depth": job["depth"], "img_size": job["image"]}
    with torch.no_grad():
        model = LorexModel(build_backbone(cfg), cfg)
    model.add_head("t", [str(i) for i in range(10)])
    method = _make_method(job["method"])

    class _Frames:
        frames = 1

    method.fit_to_data(_Frames())
    method.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(job["batch"], 3, job["image"], job["image"])
    y = torch.randint(0, 10, (job["batch"],))
    model.train(job["method"] != "losa")
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mb": peak_kb / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    answer = run_train_job(job) if job["kind"] == "train" else run_memory_job(job)
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
