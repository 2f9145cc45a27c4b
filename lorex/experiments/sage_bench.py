"""``lorex bench sage``: leave-one-domain-out over the four synthetic re-ID domains.

For each target, the other three domains' source experts are adapted and mixed (``adapt_reid``),
and every variant is scored on the target's query vs gallery. Two cost measurements sit beside
the accuracies: the bench model's own inference time, and the same gated layers at ViT-B size
(768 wide, 12 blocks, 256x128 crops, 129 tokens; random weights, since timing does not depend on
them), where the K = 3 rank-8 branches are ~4% of the linear-layer FLOPs as in the paper.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorex.adaptation.sage.classification import adapt_classification
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.pipeline import adapt_reid
from lorex.adaptation.sage.report import ordered_variants
from lorex.adaptation.sage.stages import GATE_VARIANTS, interleaved_ms_per_image
from lorex.adapters.gated import GateConfig, attach_gate, gate_parameters
from lorex.backbones import build_backbone
from lorex.data import DIGIT_DOMAINS, REID_DOMAINS
from lorex.data.reid import load_reid_data
from lorex.data.reid_synth import PRETRAIN_DOMAIN
from lorex.experiments import settings as demo_settings
from lorex.experiments.sage_bench_report import gate_png, sage_bench_report
from lorex.experiments.stages import augmented_config, ensure_base, run_stage, short, teller
from lorex.io import read_json, write_json
from lorex.metrics.agreement import chance_check, ordering_agreement, read_full_results
from lorex.metrics.reid import random_ranking_map
from lorex.models import LorexModel
from lorex.models.stamps import stamp
from lorex.models.store import file_sha256
from lorex.pretrained import find_shipped, install_shipped
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import train_expert, train_reid_expert
from lorex.training.methods import TRAINING_METHODS
from lorex.training.records import run_record
from lorex.version import __version__

say = teller("sage")

#: The quick people base shipped as package data (``lorex.pretrained``).
SHIPPED_PEOPLE_BASE = "people-vit-micro"

VIT_B_REID = {
    "type": "vit",
    "img_size": [256, 128],
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
}


@dataclass(frozen=True)
class SageBenchSettings:
    targets: tuple[str, ...]
    source_epochs: int
    source_samples: int | None
    sage: SageConfig
    pretrain_epochs: int  # the people base, on reid/pretrain (docs/sage.md, "The base")
    pretrain_samples: int | None
    pretrain_lr: float = 1e-3
    # Low, so the source experts stay near their shared base and their mean is a good model.
    source_lr: float = 3e-4
    timing_batch: int = 16
    vit_b_timing: bool = True
    domains: tuple[str, ...] = field(default_factory=lambda: tuple(REID_DOMAINS))
    # Leave-one-out on the digit domains (classification accuracy); empty: skipped.
    digit_targets: tuple[str, ...] = ()
    digit_samples: int = 2000  # per expert and per target train split
    digit_epochs: int = 5  # the digit experts (the quick demo's recipe)
    digit_sage: SageConfig = field(default_factory=lambda: SageConfig(epochs=3, gate_iters=41))


FULL = SageBenchSettings(
    targets=tuple(REID_DOMAINS),
    source_epochs=6,
    source_samples=None,
    sage=SageConfig(),
    pretrain_epochs=10,
    pretrain_samples=None,
    digit_targets=tuple(DIGIT_DOMAINS),
)
# Smaller runs (2-3 epochs on 500-1,500 images) left every model near chance (4-14% mAP).
QUICK = SageBenchSettings(
    targets=("reid/a",),
    source_epochs=3,
    source_samples=None,
    sage=SageConfig(epochs=3, max_target_samples=600, gate_iters=20),
    pretrain_epochs=4,
    pretrain_samples=None,
    timing_batch=4,
)
# `lorex demo`'s re-ID part: QUICK with two sources, 300 target images rather than 600 and no
# ViT-B timing (about a minute; a cut made for time, not chosen on any score).
DEMO = replace(
    QUICK,
    vit_b_timing=False,
    domains=("reid/a", "reid/b", "reid/d"),
    sage=replace(QUICK.sage, max_target_samples=300),
)


def people_config(s: SageBenchSettings, seed: int) -> TrainConfig:
    return augmented_config(s.pretrain_epochs, s.pretrain_lr, seed, s.pretrain_samples)


def people_recipe(cfg: TrainConfig, base: Path) -> dict[str, Any]:
    """What decides the people base: the same recipe gives the same model, bit for bit."""
    return {
        "stage": "people-base",
        "data": PRETRAIN_DOMAIN,
        "cfg": cfg.to_dict(),
        "base": file_sha256(base / "model.safetensors"),
    }


def people_base(out: Path, base: Path, s: SageBenchSettings, seed: int, device, progress) -> Path:
    """The chars base pretrained further on generic people (``reid/pretrain``, identities as
    classes): the stand-in for the ImageNet backbone every re-ID expert starts from."""
    path = out / "people-base"
    cfg = people_config(s, seed)
    value = stamp(
        stage=0,
        cfg=cfg.to_dict(),
        base=file_sha256(base / "model.safetensors"),
        version=__version__,
    )
    shipped = find_shipped(SHIPPED_PEOPLE_BASE, people_recipe(cfg, base))
    if shipped is not None:  # the same model, bit for bit (lorex.pretrained)
        label = f"people base on {PRETRAIN_DOMAIN}, shipped with lorex"
        make = lambda: install_shipped(shipped, path)  # noqa: E731
    else:
        label = f"people base on {PRETRAIN_DOMAIN}"
        make = lambda: train_reid_expert(  # noqa: E731
            base, PRETRAIN_DOMAIN, TRAINING_METHODS["full"](), path, cfg, device, progress
        )
    run_stage(path, {"stamp": value}, make, label, say)
    return path


def train_sources(
    out: Path, base: Path, s: SageBenchSettings, seed: int, device, progress
) -> dict[str, Path]:
    """One full re-ID expert per domain (stage 1), reused when its settings match."""
    sources = {}
    cfg = augmented_config(s.source_epochs, s.source_lr, seed, s.source_samples)
    needed = {d for d in s.domains if any(t != d for t in s.targets)}
    for domain in s.domains:
        if domain not in needed:
            continue
        path = out / "sources" / short(domain)
        value = stamp(
            stage=1,
            domain=domain,
            cfg=cfg.to_dict(),
            base=read_json(base / "stage.json")["stamp"],
            version=__version__,
        )
        run_stage(
            path,
            {"stamp": value},
            lambda d=domain, p=path: train_reid_expert(
                base, d, TRAINING_METHODS["full"](), p, cfg, device, progress
            ),
            f"source expert on {domain}",
            say,
        )
        sources[domain] = path
    return sources


def digits_leave_one_out(
    out: Path, base: Path, s: SageBenchSettings, seed: int, device, progress
) -> dict[str, Any]:
    """The same pipeline on the digit domains: full experts from the chars base, then each
    target adapted from the other three (``adapt_classification``); test accuracy per variant."""

    cfg = TrainConfig(
        epochs=s.digit_epochs, batch_size=64, lr=1e-3, seed=seed, max_samples=s.digit_samples
    )
    experts = {}
    for domain in DIGIT_DOMAINS:
        path = out / "digits" / "experts" / short(domain)
        value = stamp(
            stage=1, domain=domain, cfg=cfg.to_dict(), base=file_sha256(base / "model.safetensors")
        )
        run_stage(
            path,
            {"stamp": value},
            lambda d=domain, p=path: train_expert(
                base, d, TRAINING_METHODS["full"](), p, cfg, device
            ),
            f"digit expert on {domain}",
            say,
        )
        experts[domain] = path
    sage = replace(s.digit_sage, seed=seed, max_target_samples=s.digit_samples)
    results = {}
    for target in s.digit_targets:
        say(f"digit target {target} ...")
        folder = out / "digits" / "targets" / short(target)
        srcs = [experts[d] for d in DIGIT_DOMAINS if d != target]
        metrics = adapt_classification(
            srcs, target, folder / "model", sage, device, progress, folder / "work"
        )
        results[target] = {
            name: {"accuracy": metrics["variants"][name]["accuracy"]}
            for name in ordered_variants(metrics["variants"])
        }
    return results


def gated_time_at_vit_b(
    num_experts: int = 3, r: int = 8, batch: int = 16, device="cpu", rounds: int = 3
) -> dict[str, Any]:
    """Inference ms per image of a plain ViT-B (256x128) and of the same with K rank-r experts
    under each gate, measured side by side (best of ``rounds``); random weights."""
    device = torch.device(device)
    torch.manual_seed(0)
    models: dict[str, LorexModel] = {}
    single = LorexModel(build_backbone(VIT_B_REID), VIT_B_REID)
    models["single"] = single
    paths = [
        n for n, m in single.backbone.named_modules() if n.endswith(("qkv", "proj", "fc1", "fc2"))
    ]
    paths = [p for p in paths if p.startswith("blocks.")]
    params = {}
    for kind, label in GATE_VARIANTS.items():
        model = LorexModel(build_backbone(VIT_B_REID), VIT_B_REID)
        model.backbone.load_state_dict(single.backbone.state_dict())
        config = GateConfig(
            experts=[f"e{i}" for i in range(num_experts)],
            r=r,
            scaling=4.0,
            target_modules=paths,
            kind=kind,
            tokens=int(model.backbone.pos_embed.shape[1]),
        )
        attach_gate(model.backbone, config)
        with torch.no_grad():
            for p in model.backbone.parameters():
                if p.ndim == 3 or (p.ndim == 2 and p.shape[0] == config.tokens):
                    p.normal_(std=0.02)
        models[label] = model
        params[label] = sum(p.numel() for p in gate_parameters(model.backbone))
    for m in models.values():
        m.to(device)
    images = (np.random.default_rng(0).random((batch, 256, 128, 3)) * 255).astype(np.uint8)
    times = interleaved_ms_per_image(models, images, device, rounds=rounds)
    backbone = sum(p.numel() for p in single.backbone.parameters())
    return {
        "config": VIT_B_REID,
        "experts": num_experts,
        "rank": r,
        "batch": batch,
        "device": str(device),
        "ms_per_image": times,
        "ratio_to_single": {k: times[k] / times["single"] for k in GATE_VARIANTS.values()},
        "ensemble_ratio_to_single": float(num_experts),
        "backbone_params": backbone,
        "gate_params": params,
        "gate_share_of_backbone": {k: v / backbone for k, v in params.items()},
    }


def run_sage_bench(
    out: str | Path,
    quick: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    settings: SageBenchSettings | None = None,
    base: str | Path | None = None,
    full_results: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark into ``out`` (stages reused when their settings match). ``base``: a
    pretrained base to start from instead of the demo's chars base. A ``quick`` run also checks
    its scores against chance and its order against ``full_results`` (a full run's JSON)."""
    out = Path(out)
    s = settings or (QUICK if quick else FULL)
    s = replace(s, sage=replace(s.sage, seed=seed))
    device = torch.device(device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base_dir = base
    if base is None:
        base = ensure_base(demo_settings.QUICK, seed, out, device, timings)
    base = people_base(out, base, s, seed, device, progress)
    sources = train_sources(out, base, s, seed, device, progress)
    timings["sources"] = time.perf_counter() - start - sum(timings.values())
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for target in s.targets:
        tick = time.perf_counter()
        say(f"target {target} ...")
        srcs = [sources[d] for d in s.domains if d != target]
        folder = out / "targets" / short(target)
        metrics = adapt_reid(
            srcs, target, folder / "model", s.sage, device, progress, folder / "work", True
        )
        results[target] = {
            name: {
                k: metrics["variants"][name][k]
                for k in ("mAP", "rank1", "mINP", "mAP_se")
                if k in metrics["variants"][name]
            }
            for name in ordered_variants(metrics["variants"])
        }
        details[target] = {
            "costs": metrics["costs"],
            "gate_weights": metrics["gate_weights"],
            "names": metrics["names"],
            "pseudo_labels": {
                k: [
                    {x: h[x] for x in ("clusters", "outlier_fraction", "diagnostic_ari") if x in h}
                    for h in v
                ]
                for k, v in metrics["histories"].items()
            },
        }
        timings[f"target {target}"] = time.perf_counter() - tick
    digits = {}
    if s.digit_targets:
        tick = time.perf_counter()
        chars_base = base_dir if base_dir is not None else out / "base"
        digits = digits_leave_one_out(out, chars_base, s, seed, device, progress)
        timings["digits leave-one-out"] = time.perf_counter() - tick
    vit_b = None
    if s.vit_b_timing:
        tick = time.perf_counter()
        vit_b = gated_time_at_vit_b(3, s.sage.rank, s.timing_batch, device)
        timings["timing at ViT-B size"] = time.perf_counter() - tick
    summary = {
        **results,
        "details": details,
        "digits": digits,
        "vit_b_timing": vit_b,
        "goals": goals(results, details, vit_b),
        "settings": {**asdict(s), "sage": s.sage.to_dict()},
        "stage_seconds": timings,
        "run": run_record("bench sage", None, quick=quick, seed=seed),
    }
    if quick:
        summary["quick_checks"] = sage_quick_checks(
            summary, read_full_results(full_results) if full_results else None, str(full_results)
        )
    write_json(out / "results.json", summary)
    (out / "gate_weights.png").write_bytes(gate_png(details))
    (out / "results.md").write_text(sage_bench_report(summary, quick))
    return summary


def sage_quick_checks(summary: dict, full: dict | None, source: str) -> dict[str, Any]:
    """Per target: every variant's mAP against a random ranking's (chance), and the variants'
    order against the full bench's on the same target."""
    checks: dict[str, Any] = {"targets": {}, "lines": []}
    for target in [t for t in summary if t in REID_DOMAINS]:
        splits = load_reid_data(target)
        chance = random_ranking_map(
            splits.query.ids, splits.gallery.ids, splits.query.cams, splits.gallery.cams
        )
        scores = {name: v["mAP"] for name, v in summary[target].items()}
        se = {name: v.get("mAP_se", float("inf")) for name, v in summary[target].items()}
        there = (full or {}).get(target)
        full_scores = {name: v["mAP"] for name, v in there.items()} if there else None
        check = chance_check(scores, chance, what="mAP", full=full_scores)
        order = ordering_agreement(scores, se, full_scores, source)
        checks["targets"][target] = {"chance_mAP": chance, "chance": check, "order": order}
        checks["lines"].append(
            f"- {target}: chance is a random ranking's mAP. {check['line']} {order['line']}"
        )
    return checks


def goals(results: dict, details: dict, vit_b: dict | None) -> dict[str, Any]:
    """The issue's goals, checked on the measured numbers."""
    per_target = {}
    for target, variants in results.items():
        gated = variants["gated"]["mAP"]
        others = [v["mAP"] for n, v in variants.items() if n.startswith("lora/") or n == "uniform"]
        best_direct = max(v["mAP"] for n, v in variants.items() if n.startswith("direct/"))
        per_target[target] = {
            "gated_beats_every_lora_and_uniform": gated > max(others),
            "gated_light_beats_every_lora_and_uniform": variants["gated-light"]["mAP"]
            > max(others),
            "gated_minus_best_direct": gated - best_direct,
            "gated_light_minus_best_direct": variants["gated-light"]["mAP"] - best_direct,
            "light_minus_published": variants["gated-light"]["mAP"] - gated,
        }
    wins = sum(t["gated_beats_every_lora_and_uniform"] for t in per_target.values())
    light_wins = sum(t["gated_light_beats_every_lora_and_uniform"] for t in per_target.values())
    return {
        "per_target": per_target,
        "gated_wins": wins,
        "gated_light_wins": light_wins,
        "targets": len(per_target),
        "bench_model_time_ratio": {
            t: d["costs"]["time_ratio_to_single"] for t, d in details.items()
        },
        "vit_b_time_ratio": vit_b["ratio_to_single"] if vit_b else None,
        "light_gate_share_of_backbone": {
            "bench model": next(iter(details.values()))["costs"]["gate_share_of_backbone"][
                "gated-light"
            ]
            if details
            else None,
            "vit-b": vit_b["gate_share_of_backbone"]["gated-light"] if vit_b else None,
        },
    }
