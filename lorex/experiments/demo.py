"""``lorex demo``: pretrain a base, fine-tune one expert per digit domain, show the domain shift.

Each finished stage is kept on disk and reused, so an interrupted demo resumes where it stopped.
After the experts, the demo merges them (``merge_bench``) and runs the SAGE and cross-modal
benches at a small size; ``demo_report`` writes what came out.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from lorex.adapters.lora import LoraConfig
from lorex.data import load_dataset
from lorex.experiments import cross_modal_bench, sage_bench
from lorex.experiments.demo_report import DemoResults, write_report
from lorex.experiments.merge_bench import METHOD_ORDER, score_merges
from lorex.experiments.settings import FULL, QUICK, DemoSettings
from lorex.experiments.stages import cached_stage, ensure_base, say, short
from lorex.io import read_json, write_json
from lorex.models import load_model
from lorex.training.config import TrainConfig
from lorex.training.evaluation import evaluate_classifier
from lorex.training.expert_jobs import train_expert
from lorex.training.methods import TRAINING_METHODS
from lorex.training.records import run_record


def run_demo(
    out: str | Path,
    quick: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    settings: DemoSettings | None = None,
    preset: str | None = None,
) -> Path:
    """Run the whole story and write ``out/report.md``; returns its path."""
    out = Path(out)
    s = settings or (QUICK if quick else FULL)
    if preset is not None:
        s = replace(s, preset=preset)
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "run.json", run_record("demo", None, quick=quick, seed=seed, settings=asdict(s))
    )
    r = DemoResults()
    base = ensure_base(s, seed, out, device, r.timings)
    train_experts(out, base, s, seed, device, r)
    train_frozen_head_experts(out, base, s, seed, device, r)
    evaluate_experts(out, s, seed, device, r)
    merge_experts(out, s, device, r)
    if s.reid:
        start = time.perf_counter()
        say("re-ID: adapting two source experts to unlabelled reid/a (SAGE) ...")
        r.reid = sage_bench.run_sage_bench(
            out / "reid", seed=seed, device=device, settings=sage_bench.DEMO
        )
        r.timings["re-ID adaptation (SAGE)"] = round(time.perf_counter() - start, 2)
    if s.cross_modal:
        start = time.perf_counter()
        say("cross-modal: an RGB source to unlabelled depth of another sensor (TGMB + TGKT) ...")
        r.cross = cross_modal_bench.run_cross_modal_bench(
            out / "cross_modal",
            seed=seed,
            device=device,
            settings=cross_modal_bench.DEMO,
            base=base,
        )
        r.timings["cross-modal transfer"] = round(time.perf_counter() - start, 2)
    return write_report(out, s, seed, base, r)


def train_experts(
    out: Path, base: Path, s: DemoSettings, seed: int, device: torch.device, r: DemoResults
) -> None:
    """Per domain: a linear probe, a full, a LoRA and a LoSA expert (``r.experts``)."""
    for domain in s.domains:
        r.experts[domain] = {}
        for method, epochs, lr in (
            ("linear", s.linear_epochs, s.linear_lr),
            ("full", s.expert_epochs, s.full_lr),
            ("lora", s.lora_epochs or s.expert_epochs, s.lora_lr),
            ("losa", s.expert_epochs, s.losa_lr),
        ):
            trainer = _method(method, s)
            cfg = _config(s, epochs, lr, seed)
            target = out / "experts" / short(domain) / method
            stamp = {
                "stage": "train",
                "domain": domain,
                "method": method,
                "config": cfg.to_dict(),
                "base": read_json(base / "stage.json"),
            }
            if method == "lora":  # its recipe (alpha, targets) decides whether a stage is reusable
                stamp["options"] = trainer.options()
            cached_stage(
                target,
                stamp,
                lambda c=cfg, d=domain, m=trainer, t=target: train_expert(base, d, m, t, c, device),
                f"{method} expert on {domain} ({epochs} epochs)",
                r.timings,
            )
            r.experts[domain][method] = read_json(target / "metrics.json")
            adapter = target / "adapter" / "adapter_model.safetensors"
            if adapter.is_file():
                r.experts[domain][method]["adapter_bytes"] = adapter.stat().st_size


def train_frozen_head_experts(
    out: Path, base: Path, s: DemoSettings, seed: int, device: torch.device, r: DemoResults
) -> None:
    """Full experts under their domain's frozen probe head, when the settings ask for them."""
    frozen_kinds = [("frozen-head", s.full_lr)] if s.frozen_head_experts else []
    if s.small_lr is not None:
        frozen_kinds.append(("frozen-head-small-lr", s.small_lr))
    for kind, lr in frozen_kinds:
        cfg = _config(s, s.expert_epochs, lr, seed)
        for domain in s.domains:
            probe = out / "experts" / short(domain) / "linear"
            target = out / "experts" / short(domain) / kind
            stamp = {
                "stage": "train",
                "domain": domain,
                "method": "full, frozen probe head",
                "config": cfg.to_dict(),
                "base": read_json(base / "stage.json"),
                "probe": read_json(probe / "stage.json"),
            }
            cached_stage(
                target,
                stamp,
                lambda d=domain, p=probe, t=target, c=cfg: train_expert(
                    base, d, TRAINING_METHODS["full"](), t, c, device, head_from=p, freeze_head=True
                ),
                f"full expert under the probe's frozen head on {domain}"
                + ("" if kind == "frozen-head" else f", lr {lr:g}"),
                r.timings,
            )
            r.experts[domain][kind] = read_json(target / "metrics.json")


def evaluate_experts(
    out: Path, s: DemoSettings, seed: int, device: torch.device, r: DemoResults
) -> None:
    """Every full expert on every domain (``r.matrix``), each linear probe on its own."""
    say("evaluating every expert on every domain ...")
    start = time.perf_counter()
    tests = {d: load_dataset(d, "test", s.test_samples, seed) for d in s.domains}
    r.matrix = np.zeros((len(s.domains), len(s.domains)))
    for i, trained in enumerate(s.domains):
        model = load_model(out / "experts" / short(trained) / "full", device)
        for j, tested in enumerate(s.domains):
            r.matrix[i, j] = evaluate_classifier(model, tests[tested], device)
    r.probe = np.array(
        [
            evaluate_classifier(
                load_model(out / "experts" / short(d) / "linear", device), tests[d], device
            )
            for d in s.domains
        ]
    )
    r.timings["evaluation"] = round(time.perf_counter() - start, 2)


def merge_experts(out: Path, s: DemoSettings, device: torch.device, r: DemoResults) -> None:
    """Each kind of expert merged with every method of the settings (``r.merges``)."""
    for kind in s.merge_kinds:
        start = time.perf_counter()
        say(f"merging the {kind} experts with every method ...")
        methods = tuple(
            m for m in METHOD_ORDER if s.merge_methods is None or m[0] in s.merge_methods
        )
        r.merges[kind] = score_merges(
            out,
            out / "merged",
            list(s.domains),
            kind,
            methods=methods,
            device=device,
            test_samples=s.test_samples,
        )
        r.timings[f"merge the {kind} experts"] = round(time.perf_counter() - start, 2)


def _config(s: DemoSettings, epochs: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=s.batch_size, lr=lr, seed=seed, max_samples=s.expert_samples
    )


def _method(name: str, s: DemoSettings):
    """The training method for one demo stage; LoRA takes the settings' rank-8 recipe."""
    if name != "lora":
        return TRAINING_METHODS[name]()
    options = {"lora_alpha": s.lora_alpha or 8.0}
    if s.lora_targets:
        options["target_modules"] = s.lora_targets
    return TRAINING_METHODS["lora"](LoraConfig(r=8, **options), backbone_targets=not s.lora_targets)


__all__ = ["FULL", "QUICK", "DemoResults", "DemoSettings", "replace", "run_demo"]
