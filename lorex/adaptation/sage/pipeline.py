"""``lorex adapt reid``: source experts in, one gated target model out (SAGE-reID stages 2-4).

Every variant is measured on the target's query and gallery, for reporting only: no step
selects a model, an epoch or a setting on target labels (the authors' code keeps the best
target-test mAP; we keep the last model). Stage outputs go to a work directory beside ``out``
(``OUT.parts/``) and are reused when their settings match, so a stopped run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorex import __version__
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import averaged_sources, gated_model, train_gate
from lorex.adaptation.sage.report import gate_weights_png, sage_report
from lorex.adaptation.sage.target_experts import adapt_source_expert
from lorex.adapters.gated import expert_parameter_count, gate_parameters, record_gate_weights
from lorex.errors import LorexError
from lorex.io import read_json, write_json
from lorex.models import LorexModel, is_model_dir, load_model, save_model
from lorex.models.store import file_sha256
from lorex.training.loop import as_float
from lorex.training.reid_objective import (
    _tensor,
    evaluate_reid,
    load_reid_data,
    reid_embeddings,
    subset_ids,
)
from lorex.training.run import run_record

log = logging.getLogger("lorex")
VARIANT_ORDER = ("direct", "averaged", "lora", "uniform", "gated", "gated-light")
GATE_VARIANTS = {"published": "gated", "light": "gated-light"}


def source_names(sources: Sequence[str | Path]) -> list[str]:
    """Short unique names for the experts: their directory names (``-2`` etc. on clashes)."""
    names: list[str] = []
    for source in sources:
        name = Path(source).name or "source"
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _stamp(**settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(path: Path, stamp: str) -> bool:
    stage = path / "stage.json"
    return is_model_dir(path) and stage.is_file() and read_json(stage).get("stamp") == stamp


def _backbone_params(model: LorexModel) -> int:
    return sum(p.numel() for p in model.backbone.parameters())


class _Embedder(torch.nn.Module):
    def __init__(self, model: LorexModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(x)


@torch.inference_mode()
def interleaved_ms_per_image(
    models: dict[str, LorexModel], images: np.ndarray, device: torch.device, rounds: int = 5
) -> dict[str, float]:
    """Embedding time per image for each model, measured in interleaved rounds (each model once
    per round, best round kept) so that the machine's drift hits every model alike."""
    batch = as_float(_tensor(images[:64]), device)
    runners = {name: _Embedder(m).eval() for name, m in models.items()}
    for runner in runners.values():
        runner(batch)
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            runner(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000.0 * t / len(batch) for name, t in best.items()}


def gate_weight_means(
    model: LorexModel, images: np.ndarray, device: torch.device
) -> dict[str, list[float]]:
    """Each gated layer's mean weight per expert over ``images``."""
    with record_gate_weights(model.backbone) as records:
        reid_embeddings(model, images, device=device)
    return {p: torch.cat(v).mean(0).tolist() for p, v in records.items()}


def adapt_reid(
    sources: Sequence[str | Path],
    target: str | Path,
    out: str | Path,
    cfg: SageConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    work: str | Path | None = None,
    diagnostics: bool = False,
) -> dict[str, Any]:
    """Adapt ``sources`` (re-ID experts) to ``target`` (its unlabelled train images) and write the
    gated model (``cfg.gate``) to ``out`` with ``metrics.json``, ``report.md`` and
    ``gate_weights.png``. ``diagnostics`` records each clustering's agreement with the true
    target ids (synthetic benchmarks; the method never reads them). Returns the metrics."""
    cfg = cfg or SageConfig()
    device = torch.device(device)
    sources = [Path(s) for s in sources]
    if len(sources) < 2:
        raise LorexError(f"--sources: SAGE mixes at least 2 source experts, got {len(sources)}")
    for source in sources:
        if not is_model_dir(source):
            raise LorexError(f"{source}: not a model directory")
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".parts")
    data = load_reid_data(target)
    data.train = subset_ids(data.train, cfg.max_target_samples, cfg.seed)
    images = data.train.images
    true_ids = data.train.ids if diagnostics else None
    names = source_names(sources)
    hashes = {str(s): file_sha256(s / "model.safetensors") for s in sources}
    timings: dict[str, float] = {}
    histories: dict[str, Any] = {}

    # stage 2: one LoRA expert per source, adapted on target pseudo-labels
    experts = []
    stage2 = {k: v for k, v in cfg.to_dict().items() if not k.startswith("gate")}
    for name, source in zip(names, sources, strict=True):
        path = work / "experts" / name
        stamp = _stamp(stage=2, source=hashes[str(source)], target=str(target), cfg=stage2)
        if not _reusable(path, stamp):
            tick = time.perf_counter()
            made_by = run_record("adapt reid (stage 2)", source=str(source), target=str(target))
            adapt_source_expert(source, data, path, cfg, device, progress, true_ids, made_by)
            write_json(path / "stage.json", {"stamp": stamp, "lorex_version": __version__})
            timings[f"lora/{name}"] = time.perf_counter() - tick
        else:
            log.info("stage 2: reusing %s", path)
        experts.append(path)
        histories[f"lora/{name}"] = read_json(path / "metrics.json")["history"]

    # stages 3-4: the averaged backbone, the stacked experts and the two gates
    models: dict[str, LorexModel] = {}
    for name, source in zip(names, sources, strict=True):
        models[f"direct/{name}"] = load_model(source, device)
    models["averaged"] = averaged_sources(sources, device)
    for name, path in zip(names, experts, strict=True):
        models[f"lora/{name}"] = load_model(path, device)
    tick = time.perf_counter()
    models["uniform"] = gated_model(sources, experts, names, "light", device)
    timings["stage 3 (build)"] = time.perf_counter() - tick
    for kind, label in GATE_VARIANTS.items():
        path = work / label
        stamp = _stamp(
            stage=4,
            experts=[file_sha256(e / "adapter" / "adapter_model.safetensors") for e in experts],
            kind=kind,
            cfg=cfg.to_dict(),
        )
        if not _reusable(path, stamp):
            tick = time.perf_counter()
            model = gated_model(sources, experts, names, kind, device)
            result = train_gate(model, images, cfg, device, progress, true_ids)
            save_model(
                model,
                path,
                seed=cfg.seed,
                extra_files={"history.json": {"history": result.history}},
            )
            write_json(path / "stage.json", {"stamp": stamp, "lorex_version": __version__})
            timings[label] = time.perf_counter() - tick
        models[label] = load_model(path, device)
        histories[label] = read_json(path / "history.json")["history"]

    # measurements (reporting only)
    variants: dict[str, dict[str, Any]] = {}
    for label, model in models.items():
        variants[label] = evaluate_reid(model, data, device)
        variants[label]["params"] = _backbone_params(model)
    times = interleaved_ms_per_image(models, data.query.images, device)
    for label, ms in times.items():
        variants[label]["infer_ms_per_image"] = ms
    single = times["averaged"]
    lora_times = [times[f"lora/{n}"] for n in names]
    gate_weights = {
        label: gate_weight_means(
            models[label], np.concatenate([data.query.images, data.gallery.images]), device
        )
        for label in GATE_VARIANTS.values()
    }
    backbone = variants["averaged"]["params"]
    gate_params = {
        label: sum(p.numel() for p in gate_parameters(models[label].backbone))
        for label in GATE_VARIANTS.values()
    }
    metrics: dict[str, Any] = {
        "target": str(target),
        "sources": [str(s) for s in sources],
        "names": names,
        "gate": cfg.gate,
        "variants": variants,
        "costs": {
            "backbone_params": backbone,
            "lora_params_per_expert": expert_parameter_count(models["uniform"].backbone)
            // len(names),
            "gate_params": gate_params,
            "gate_share_of_backbone": {k: v / backbone for k, v in gate_params.items()},
            "single_model_ms_per_image": single,
            "ensemble_ms_per_image": float(sum(lora_times)),
            "time_ratio_to_single": {
                label: times[label] / single for label in ("uniform", *GATE_VARIANTS.values())
            },
            "ensemble_time_ratio_to_single": float(sum(lora_times)) / single,
        },
        "gate_weights": gate_weights,
        "histories": histories,
        "stage_seconds": timings,
        "target_train_images": len(images),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "lorex_version": __version__,
        "device": str(device),
    }
    final = models[GATE_VARIANTS[cfg.gate]]
    png = gate_weights_png(gate_weights, names, f"gate weights on {target}")
    save_model(
        final,
        out,
        seed=cfg.seed,
        made_by=run_record(
            "adapt reid",
            sources=[str(s) for s in sources],
            target=str(target),
            sage=cfg.to_dict(),
            work=str(work),
        ),
        extra_files={
            "metrics.json": metrics,
            "report.md": sage_report(metrics).encode(),
            "gate_weights.png": png,
        },
    )
    return metrics
