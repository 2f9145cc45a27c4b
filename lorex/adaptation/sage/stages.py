"""The orchestration shared by ``adapt_reid`` and ``adapt_classification`` (:class:`SageRun`):
stage outputs with reuse, the variants' models, their costs and the written result. Only the
labelling, the losses and the scoring differ between the two tasks; they come in as callables."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import averaged_sources, gated_model
from lorex.adapters.gated import expert_parameter_count, gate_parameters, record_gate_weights
from lorex.errors import LorexError
from lorex.io import read_json, write_json
from lorex.models import LorexModel, is_model_dir, load_model, save_model
from lorex.models.stamps import reusable, stamp
from lorex.models.store import file_sha256
from lorex.training import distributed
from lorex.training.batches import as_float, chw_tensor
from lorex.training.checkpoint import CheckpointOptions, work_directory
from lorex.training.engine import TrainResult
from lorex.training.evaluation import reid_embeddings
from lorex.training.records import run_record
from lorex.version import __version__

log = logging.getLogger("lorex")
GATE_VARIANTS = {"published": "gated", "light": "gated-light"}
GATE_RECIPE = 3  # bumped when stage 4 changes (2: BN-neck statistics frozen; 3: camera term)


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


def check_sources(sources: Sequence[str | Path]) -> list[Path]:
    paths = [Path(s) for s in sources]
    if len(paths) < 2:
        raise LorexError(f"--sources: SAGE mixes at least 2 source experts, got {len(paths)}")
    for path in paths:
        if not is_model_dir(path):
            raise LorexError(f"{path}: not a model directory")
    return paths


def work_dir(out: Path, work: str | Path | None) -> Path:
    return Path(work) if work is not None else work_directory(out)


def lora_experts(
    sources: Sequence[Path],
    names: Sequence[str],
    work: Path,
    target: str,
    cfg: SageConfig,
    adapt: Callable[[Path, Path], Any],
    timings: dict[str, float],
) -> list[Path]:
    """Stage 2 for every source (``adapt(source, out)``), reusing outputs made with the same
    source, target and settings."""
    settings = {k: v for k, v in cfg.to_dict().items() if not k.startswith("gate")}
    experts = []
    for name, source in zip(names, sources, strict=True):
        path = work / "experts" / name
        value = stamp(
            stage=2, source=file_sha256(source / "model.safetensors"), target=target, cfg=settings
        )
        if reusable(path, value):
            log.info("stage 2: reusing %s", path)
        else:
            tick = time.perf_counter()
            adapt(source, path)
            if distributed.current().main:  # under torchrun rank 0 writes, the others wait
                write_json(path / "stage.json", {"stamp": value, "lorex_version": __version__})
            distributed.barrier()
            timings[f"lora/{name}"] = time.perf_counter() - tick
        experts.append(path)
    return experts


def variant_models(
    sources: Sequence[Path],
    experts: Sequence[Path],
    names: Sequence[str],
    work: Path,
    cfg: SageConfig,
    train_gate: Callable[[LorexModel, str], TrainResult],
    device: torch.device,
    timings: dict[str, float],
    histories: dict[str, Any],
) -> dict[str, LorexModel]:
    """Every variant's model: each source as it is, the averaged backbone, each LoRA expert, the
    uniform mix, and the two trained gates (stage 4, reused like stage 2)."""
    models: dict[str, LorexModel] = {}
    for name, source in zip(names, sources, strict=True):
        models[f"direct/{name}"] = load_model(source, device)
    models["averaged"] = averaged_sources(sources, device)
    for name, path in zip(names, experts, strict=True):
        models[f"lora/{name}"] = load_model(path, device)
    models["uniform"] = gated_model(sources, experts, names, "light", device)
    adapters = [file_sha256(e / "adapter" / "adapter_model.safetensors") for e in experts]
    for kind, label in GATE_VARIANTS.items():
        path = work / label
        value = stamp(stage=4, experts=adapters, kind=kind, cfg=cfg.to_dict(), recipe=GATE_RECIPE)
        if not reusable(path, value):
            tick = time.perf_counter()
            model = gated_model(sources, experts, names, kind, device)
            result = train_gate(model, label)
            if distributed.current().main:  # under torchrun rank 0 writes, the others wait
                history = {"history": result.history}
                save_model(model, path, seed=cfg.seed, extra_files={"history.json": history})
                write_json(path / "stage.json", {"stamp": value, "lorex_version": __version__})
                if result.checkpoint is not None:
                    result.checkpoint.discard()
            distributed.barrier()
            timings[label] = time.perf_counter() - tick
        models[label] = load_model(path, device)
        histories[label] = read_json(path / "history.json")["history"]
    return models


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
    batch = as_float(chw_tensor(images[:64]), device)
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


def costs(
    models: dict[str, LorexModel],
    names: Sequence[str],
    variants: dict[str, dict[str, Any]],
    images: np.ndarray,
    device: torch.device,
) -> dict[str, Any]:
    """Parameters and inference time of every variant (added to ``variants``), and the ratios
    the goals are stated in: against one plain model (the averaged backbone) and an ensemble."""
    for label, model in models.items():
        variants[label]["params"] = sum(p.numel() for p in model.backbone.parameters())
    times = interleaved_ms_per_image(models, images, device)
    for label, ms in times.items():
        variants[label]["infer_ms_per_image"] = ms
    single = times["averaged"]
    ensemble = float(sum(times[f"lora/{n}"] for n in names))
    backbone = variants["averaged"]["params"]
    gate_params = {
        label: sum(p.numel() for p in gate_parameters(models[label].backbone))
        for label in GATE_VARIANTS.values()
    }
    return {
        "backbone_params": backbone,
        "lora_params_per_expert": expert_parameter_count(models["uniform"].backbone) // len(names),
        "gate_params": gate_params,
        "gate_share_of_backbone": {k: v / backbone for k, v in gate_params.items()},
        "single_model_ms_per_image": single,
        "ensemble_ms_per_image": ensemble,
        "time_ratio_to_single": {
            label: times[label] / single for label in ("uniform", *GATE_VARIANTS.values())
        },
        "ensemble_time_ratio_to_single": ensemble / single,
    }


def write_adapted(
    command: str,
    models: dict[str, LorexModel],
    out: Path,
    work: Path,
    cfg: SageConfig,
    sources: Sequence[Path],
    target: str,
    results: dict[str, Any],
    files: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """``metrics.json`` (``results`` plus the run's provenance) and the chosen gate's model,
    written atomically to ``out``; ``files(metrics)`` adds more files beside them."""
    metrics: dict[str, Any] = {
        "target": target,
        "sources": [str(s) for s in sources],
        "gate": cfg.gate,
        **results,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "lorex_version": __version__,
        "device": str(device) if device is not None else None,
    }
    made_by = run_record(
        command, sources=metrics["sources"], target=target, sage=cfg.to_dict(), work=str(work)
    )
    save_model(
        models[GATE_VARIANTS[cfg.gate]],
        out,
        seed=cfg.seed,
        made_by=made_by,
        extra_files={"metrics.json": metrics, **(files(metrics) if files else {})},
    )
    return metrics


@dataclass
class SageRun:
    """One ``lorex adapt`` run: what its stages share (sources, folders, checkpoints, timings,
    histories). The task supplies how an expert is adapted, how a gate trains and how a variant
    is scored."""

    cfg: SageConfig
    device: torch.device
    sources: list[Path]
    names: list[str]
    out: Path
    work: Path
    checkpoint: CheckpointOptions | None
    timings: dict[str, float] = field(default_factory=dict)
    histories: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        sources: Sequence[str | Path],
        out: str | Path,
        cfg: SageConfig | None,
        device: torch.device | str,
        work: str | Path | None,
        checkpoint: CheckpointOptions | None,
    ) -> SageRun:
        """Checks the sources; the work directory beside ``out`` unless ``work`` is given, and
        the checkpoints under it."""
        cfg = cfg or SageConfig()
        device = torch.device(device)
        paths = check_sources(sources)
        out = Path(out)
        work_path = work_dir(out, work)
        ckpt = checkpoint.at(work_path / "checkpoints") if checkpoint is not None else None
        names = source_names(paths)
        return cls(cfg, device, paths, names, out, work_path, ckpt)

    def sub_checkpoint(self, label: str) -> CheckpointOptions | None:
        return self.checkpoint and self.checkpoint.sub(label.replace("/", "-"))

    def experts(
        self, target: str, adapt: Callable[[Path, Path, CheckpointOptions | None], Any]
    ) -> list[Path]:
        """Stage 2 (``lora_experts``): ``adapt(source, out, checkpoint)`` for each source."""

        def each(source: Path, path: Path) -> None:
            adapt(source, path, self.sub_checkpoint(f"experts-{path.name}"))

        return lora_experts(
            self.sources, self.names, self.work, target, self.cfg, each, self.timings
        )

    def variants(
        self,
        experts: Sequence[Path],
        train_gate: Callable[[LorexModel, CheckpointOptions | None], TrainResult],
    ) -> dict[str, LorexModel]:
        """Every variant's model (``variant_models``); ``train_gate(model, checkpoint)``."""
        return variant_models(
            self.sources,
            experts,
            self.names,
            self.work,
            self.cfg,
            lambda model, label: train_gate(model, self.sub_checkpoint(label)),
            self.device,
            self.timings,
            self.histories,
        )

    def finish(
        self,
        command: str,
        target: str,
        models: dict[str, LorexModel],
        score: Callable[[LorexModel], dict[str, Any]],
        images: np.ndarray,
        gate_images: np.ndarray,
        extra: dict[str, Any] | None = None,
        files: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Score every variant (reporting only), measure its costs on ``images`` and the gates'
        mean weights on ``gate_images``, and write the result (``write_adapted``). Under torchrun
        only rank 0 does this; the others return ``{}``."""
        if not distributed.current().main:
            return {}
        variants = {label: score(model) for label, model in models.items()}
        cost = costs(models, self.names, variants, images, self.device)
        gate_weights = {
            label: gate_weight_means(models[label], gate_images, self.device)
            for label in GATE_VARIANTS.values()
        }
        results = {
            "names": self.names,
            "variants": variants,
            "costs": cost,
            "gate_weights": gate_weights,
            "histories": self.histories,
            "stage_seconds": self.timings,
            **(extra or {}),
        }
        return write_adapted(
            command,
            models,
            self.out,
            self.work,
            self.cfg,
            self.sources,
            target,
            results,
            files,
            self.device,
        )
