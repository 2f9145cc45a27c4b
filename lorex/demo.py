"""``lorex demo``: pretrain a base, fine-tune one expert per digit domain, show the domain shift.

Each finished stage is kept on disk and reused, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lorex import __version__
from lorex.data import DIGIT_DOMAINS, cache_dir, load_dataset
from lorex.io import atomic_directory, read_json, write_json
from lorex.merging.bench import METHOD_ORDER, merge_table, score_merges
from lorex.models import is_model_dir, load_model
from lorex.pretrained import find_shipped, install_shipped, recipe_of
from lorex.report import accuracy_table, heatmap_png, markdown_table
from lorex.training.loop import TrainConfig
from lorex.training.methods import TRAINING_METHODS as METHODS
from lorex.training.run import evaluate, pretrain, run_record, train_expert

log = logging.getLogger("lorex")

#: The quick base shipped as package data (``lorex.pretrained``; recipe.json says how to remake it).
SHIPPED_BASE = "chars-vit-micro"


@dataclass(frozen=True)
class DemoSettings:
    preset: str
    pretrain_samples: int | None
    pretrain_epochs: int
    pretrain_lr: float
    pretrain_augment: bool
    expert_samples: int | None
    expert_epochs: int
    full_lr: float
    linear_lr: float
    linear_epochs: int
    test_samples: int | None
    lora_lr: float = 5e-3  # rank 8 on every block's qkv, proj, fc1, fc2 (docs/lora.md)
    lora_epochs: int | None = None  # default: expert_epochs
    lora_alpha: float | None = None  # default: the rank (scaling 1)
    lora_targets: str | None = None  # default: the backbone's own (default_targets)
    losa_lr: float = 5e-3  # the side network's zero up-projections take large steps (docs/losa.md)
    batch_size: int = 64
    merge_kinds: tuple[str, ...] = ("full",)  # which experts the merge table merges
    merge_methods: tuple[str, ...] | None = None  # labels from METHOD_ORDER; None: all of them
    # Also fine-tune each domain's backbone under its linear probe's frozen head ("frozen-head"
    # experts, the way Task Arithmetic's experts are made): they merge better (docs/merging.md).
    frozen_head_experts: bool = False
    # And frozen-head experts fine-tuned at this smaller step ("frozen-head-small-lr"): they stay
    # closer to the base and merge better still (docs/merging.md). None: not trained.
    small_lr: float | None = None
    domains: tuple[str, ...] = tuple(DIGIT_DOMAINS)
    # A small SAGE-reID run (two re-ID source experts adapted to reid/a; docs/sage.md).
    reid: bool = True
    # A small cross-modal transfer (RGB source of sensor k1 -> k2 depth; docs/cross_modal.md).
    cross_modal: bool = True


# Sized for a short tour, under 5 minutes on 2 cores from an empty cache with data generation
# (benchmarks/results/demo_quick.md): the base is the one shipped with lorex (lorex.pretrained).
# DOGE and WUDI take seconds per merge on the quick experts (benchmarks/results/merge): the
# quick demo's merge table leaves them to `lorex bench merge`.
QUICK_MERGES = ("average", "task-arithmetic", "ties", "dare", "dare-ties", "iso-c", "tsv-m")
QUICK = DemoSettings(
    preset="vit-micro",
    pretrain_samples=None,
    pretrain_epochs=5,
    pretrain_lr=5e-4,
    pretrain_augment=False,
    expert_samples=2000,
    expert_epochs=5,
    full_lr=1e-3,
    linear_lr=5e-3,
    linear_epochs=30,
    test_samples=None,
    merge_methods=QUICK_MERGES,
)
FULL = DemoSettings(
    preset="vit-micro",
    pretrain_samples=None,
    pretrain_epochs=12,
    pretrain_lr=5e-4,
    pretrain_augment=True,
    expert_samples=None,
    expert_epochs=10,
    full_lr=1e-3,
    linear_lr=5e-3,
    linear_epochs=40,
    test_samples=None,
)


def _samples(limit: int | None) -> str:
    return f"at most {limit}" if limit else "all"


def short(domain: str) -> str:
    return domain.split("/")[-1]


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _done(out: Path, stamp: dict) -> bool:
    """A stage is reusable when its model exists and was made with the same settings."""
    return (
        is_model_dir(out)
        and (out / "stage.json").is_file()
        and read_json(out / "stage.json") == stamp
    )


def _stage(
    out: Path, stamp: dict, make, label: str, timings: dict[str, float], keep: bool = True
) -> None:
    """Make one stage's model unless a reusable one exists; ``timings[label]`` gets its seconds
    (data generation included, 0 when reused): metrics.json shows where a run's time went.

    With ``keep`` a finished stage is also kept in the cache, keyed by its settings and by
    lorex's own code, so another run with the same settings (the quick benches after the quick
    demo) copies it instead of training it again."""
    kept = cache_dir() / "stages" / f"{_settings_hash(stamp)}-{code_fingerprint()}"
    if _done(out, stamp):
        _say(f"{label}: reusing {out}")
        timings[label] = 0.0
        if keep and not _done(kept, stamp):
            _copy_dir(out, kept)
        return
    if keep and _done(kept, stamp):
        _say(f"{label}: reusing the cached {kept}")
        _copy_dir(kept, out)
        timings[label] = 0.0
        return
    _say(f"{label} ...")
    start = time.perf_counter()
    make()
    write_json(out / "stage.json", stamp)
    timings[label] = round(time.perf_counter() - start, 2)
    if keep:
        _copy_dir(out, kept)


def _copy_dir(source: Path, target: Path) -> None:
    """A stage's folder copied whole; a delta model's base path is relative (``../../../base``),
    so the copy finds the same base from the same place in another run's folder."""
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


@functools.cache
def code_fingerprint() -> str:
    """A short hash of lorex's own source files: cached stages are not reused across code edits."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _say(message: str) -> None:
    """Stage lines on stderr: the demo is long, and a progress bar alone does not name its stage."""
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def base_stamp(s: DemoSettings, seed: int) -> dict:
    """What decides the base: equal stamps give the same model, bit for bit, on the CPU."""
    return {
        "stage": "pretrain",
        "preset": s.preset,
        "samples": s.pretrain_samples,
        "epochs": s.pretrain_epochs,
        "lr": s.pretrain_lr,
        "augment": s.pretrain_augment,
        "batch_size": s.batch_size,
        "seed": seed,
        "lorex_version": __version__,
    }


def base_recipe(s: DemoSettings, seed: int) -> dict:
    """The stamp without the version: what a shipped base must have been made with."""
    return {k: v for k, v in base_stamp(s, seed).items() if k != "lorex_version"}


def ensure_base(
    s: DemoSettings, seed: int, out: Path, device: torch.device, timings: dict[str, float]
) -> Path:
    """Pretrain the base once per settings (cached under the cache dir; the shipped base when the
    settings are its recipe's) and copy it into ``out``."""
    stamp = base_stamp(s, seed)
    cached = cache_dir() / "models" / f"base-{s.preset}-{_settings_hash(stamp)}"
    cfg = TrainConfig(
        epochs=s.pretrain_epochs,
        batch_size=s.batch_size,
        lr=s.pretrain_lr,
        seed=seed,
        max_samples=s.pretrain_samples,
        augment=s.pretrain_augment,
    )
    # The shipped base is the same model, bit for bit, without the minutes of pretraining.
    shipped = find_shipped(SHIPPED_BASE, base_recipe(s, seed))
    if shipped is not None:
        label = (
            f"base {s.preset} on pretrain/chars ({s.pretrain_epochs} epochs), shipped with lorex"
        )
        make = lambda: install_shipped(shipped, cached)  # noqa: E731
    else:
        label = f"pretrain {s.preset} on pretrain/chars ({s.pretrain_epochs} epochs)"
        make = lambda: pretrain(s.preset, cached, cfg, device=device)  # noqa: E731
    _stage(cached, stamp, make, label, timings, keep=False)
    target = out / "base"
    if not _done(target, stamp):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(cached, target)
    return target


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
    timings: dict[str, float] = {}
    base = ensure_base(s, seed, out, device, timings)

    experts: dict[str, dict[str, dict]] = {}
    for domain in s.domains:
        experts[domain] = {}
        for method, epochs, lr in (
            ("linear", s.linear_epochs, s.linear_lr),
            ("full", s.expert_epochs, s.full_lr),
            ("lora", s.lora_epochs or s.expert_epochs, s.lora_lr),
            ("losa", s.expert_epochs, s.losa_lr),
        ):
            trainer = _method(method, s)
            cfg = TrainConfig(
                epochs=epochs,
                batch_size=s.batch_size,
                lr=lr,
                seed=seed,
                max_samples=s.expert_samples,
            )
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
            _stage(
                target,
                stamp,
                lambda c=cfg, d=domain, m=trainer, t=target: train_expert(base, d, m, t, c, device),
                f"{method} expert on {domain} ({epochs} epochs)",
                timings,
            )
            experts[domain][method] = read_json(target / "metrics.json")
            adapter = target / "adapter" / "adapter_model.safetensors"
            if adapter.is_file():
                experts[domain][method]["adapter_bytes"] = adapter.stat().st_size

    frozen_kinds = [("frozen-head", s.full_lr)] if s.frozen_head_experts else []
    if s.small_lr is not None:
        frozen_kinds.append(("frozen-head-small-lr", s.small_lr))
    for kind, lr in frozen_kinds:
        cfg = TrainConfig(
            epochs=s.expert_epochs,
            batch_size=s.batch_size,
            lr=lr,
            seed=seed,
            max_samples=s.expert_samples,
        )
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
            _stage(
                target,
                stamp,
                lambda d=domain, p=probe, t=target, c=cfg: train_expert(
                    base, d, METHODS["full"](), t, c, device, head_from=p, freeze_head=True
                ),
                f"full expert under the probe's frozen head on {domain}"
                + ("" if kind == "frozen-head" else f", lr {lr:g}"),
                timings,
            )
            experts[domain][kind] = read_json(target / "metrics.json")

    _say("evaluating every expert on every domain ...")
    start = time.perf_counter()
    tests = {d: load_dataset(d, "test", s.test_samples, seed) for d in s.domains}
    matrix = np.zeros((len(s.domains), len(s.domains)))
    for i, trained in enumerate(s.domains):
        model = load_model(out / "experts" / short(trained) / "full", device)
        for j, tested in enumerate(s.domains):
            matrix[i, j] = evaluate(model, tests[tested], device)
    probe = np.array(
        [
            evaluate(load_model(out / "experts" / short(d) / "linear", device), tests[d], device)
            for d in s.domains
        ]
    )
    timings["evaluation"] = round(time.perf_counter() - start, 2)
    merges = {}
    for kind in s.merge_kinds:
        start = time.perf_counter()
        _say(f"merging the {kind} experts with every method ...")
        methods = tuple(
            m for m in METHOD_ORDER if s.merge_methods is None or m[0] in s.merge_methods
        )
        merges[kind] = score_merges(
            out,
            out / "merged",
            list(s.domains),
            kind,
            methods=methods,
            device=device,
            test_samples=s.test_samples,
        )
        timings[f"merge the {kind} experts"] = round(time.perf_counter() - start, 2)
    reid = None
    if s.reid:
        from lorex.adaptation.sage.bench import DEMO as SAGE_DEMO
        from lorex.adaptation.sage.bench import run_sage_bench

        start = time.perf_counter()
        _say("re-ID: adapting two source experts to unlabelled reid/a (SAGE) ...")
        reid = run_sage_bench(out / "reid", seed=seed, device=device, settings=SAGE_DEMO)
        timings["re-ID adaptation (SAGE)"] = round(time.perf_counter() - start, 2)
    cross = None
    if s.cross_modal:
        from lorex.adaptation.cross_modal.bench import DEMO as CROSS_DEMO
        from lorex.adaptation.cross_modal.bench import run_cross_modal_bench

        start = time.perf_counter()
        _say("cross-modal: an RGB source to unlabelled depth of another sensor (TGMB + TGKT) ...")
        cross = run_cross_modal_bench(
            out / "cross_modal", seed=seed, device=device, settings=CROSS_DEMO, base=base
        )
        timings["cross-modal transfer"] = round(time.perf_counter() - start, 2)
    return _write_report(out, s, seed, base, experts, matrix, probe, merges, timings, reid, cross)


def _shipped_line(s: DemoSettings, seed: int) -> str:
    """Says so when these settings are those of the base shipped with lorex."""
    if find_shipped(SHIPPED_BASE, base_recipe(s, seed)) is None:
        return ""
    command = recipe_of(SHIPPED_BASE)["command"]
    return f"\nIt is the base shipped with lorex; `{command}` reproduces it bit for bit."


def _write_report(
    out: Path,
    s: DemoSettings,
    seed: int,
    base: Path,
    experts: dict,
    matrix: np.ndarray,
    probe: np.ndarray,
    merges: dict[str, dict] | None = None,
    timings: dict[str, float] | None = None,
    reid: dict | None = None,
    cross: dict | None = None,
) -> Path:
    names = [short(d) for d in s.domains]
    heatmap_png(
        matrix,
        names,
        names,
        out / "accuracy_matrix.png",
        "Full fine-tuned experts: accuracy on every domain",
    )
    diagonal = np.diag(matrix)
    off = (matrix.sum(1) - diagonal) / max(1, len(names) - 1)
    base_metrics = read_json(base / "metrics.json")
    metrics = {
        "lorex_version": __version__,
        "seed": seed,
        "settings": asdict(s),
        "domains": list(s.domains),
        "accuracy_matrix": matrix.tolist(),
        "own_domain_accuracy": dict(zip(s.domains, diagonal.tolist(), strict=True)),
        "mean_off_domain_accuracy": dict(zip(s.domains, off.tolist(), strict=True)),
        "base_linear_probe_accuracy": dict(zip(s.domains, probe.tolist(), strict=True)),
        "base_pretrain_accuracy": base_metrics["accuracy"],
        "experts": experts,
        "merge": merges or {},
        "reid": {t: v for t, v in (reid or {}).items() if t.startswith("reid/")},
        "cross_modal": _cross_tasks(cross),
        "stage_seconds": timings or {},
    }
    write_json(out / "metrics.json", metrics)
    rows = [
        [
            n,
            f"{100 * p:.1f}",
            f"{100 * d:.1f}",
            f"{100 * (d - p):+.1f}",
            f"{100 * o:.1f}",
            f"{experts[dom]['linear']['trainable_params']:,}",
            f"{experts[dom]['full']['trainable_params']:,}",
            f"{experts[dom]['full']['train_seconds']:.0f}",
            f"{100 * experts[dom]['lora']['accuracy']:.1f}",
            f"{experts[dom]['lora']['trainable_params']:,}",
            f"{experts[dom]['lora']['adapter_bytes'] / 1024:.0f}",
        ]
        for n, dom, p, d, o in zip(names, s.domains, probe, diagonal, off, strict=True)
    ]
    shipped = _shipped_line(s, seed)
    text = f"""# Lorex demo: one expert per digit domain

Base: `{s.preset}` pretrained on `pretrain/chars` ({base_metrics["train_samples"]} images,
{s.pretrain_epochs} epochs; {100 * base_metrics["accuracy"]:.1f}% on its own test split).{shipped}
Each domain gets a linear probe of the frozen base, a fully fine-tuned expert, a LoRA expert
(rank 8 on every block's qkv, proj, fc1, fc2, saved as a PEFT adapter) and a LoSA side network
(docs/losa.md; all three {s.expert_epochs} epochs,
{_samples(s.expert_samples)} training images).
Test sets: {_samples(s.test_samples)} images per domain. Seed {seed}, lorex {__version__}.

## Experts against the base's linear probe (own domain)

{
        markdown_table(
            [
                "domain",
                "linear probe %",
                "full expert %",
                "gain",
                "expert off-domain mean %",
                "probe params",
                "expert params",
                "expert train s",
                "LoRA r8 %",
                "LoRA params",
                "adapter KiB",
            ],
            rows,
        )
    }

## Accuracy matrix of the full experts

Rows: the domain an expert was fine-tuned on. Columns: the domain it is tested on.
The diagonal is the expert's own domain; off-diagonal cells show the domain shift.

{accuracy_table(matrix, names, names)}

![accuracy matrix](accuracy_matrix.png)

## Efficiency of each way to adapt (mean over the domains)

{_efficiency_table(experts, s.domains)}

{_merge_section(merges or {})}
{_reid_section(reid)}
{_cross_modal_section(cross)}
{_timing_section(timings or {})}
Per-run details (loss curves, parameters, memory, time) are in `experts/<domain>/<method>/`.
Memory figures there compare only between runs in separate processes (`lorex train`):
within one demo process, later stages reuse memory that earlier ones already took.
"""
    (out / "report.md").write_text(text, encoding="utf-8")
    return out / "report.md"


def _timing_section(timings: dict[str, float]) -> str:
    """Seconds per stage: where a first run's time goes (0 for a stage reused from disk)."""
    if not timings:
        return ""
    rows = [[label, f"{seconds:.1f}"] for label, seconds in timings.items()]
    rows.append(["all stages", f"{sum(timings.values()):.1f}"])
    return f"""## Where the time went

Seconds per stage in this run (data generation counts in the first stage that loads each
dataset; a stage reused from an earlier run shows 0; start-up and this report are not counted).

{markdown_table(["stage", "seconds"], rows)}
"""


def _reid_section(reid: dict | None) -> str:
    """The small SAGE-reID run: every variant on the target, details in reid/results.md."""
    if not reid:
        return ""
    rows = [
        [t, name, f"{100 * v['mAP']:.1f}", f"{100 * v['rank1']:.1f}", f"{100 * v['mINP']:.1f}"]
        for t, variants in reid.items()
        if t.startswith("reid/")
        for name, v in variants.items()
    ]
    table = markdown_table(["target", "variant", "mAP %", "rank-1 %", "mINP %"], rows)
    return f"""## Re-ID: source-free adaptation with gated LoRA experts (SAGE, small)

Two re-ID source experts (reid/b, reid/d) adapted to unlabelled reid/a: each becomes a LoRA expert
trained on the target's pseudo-labels, and a gate mixes them per sample on the averaged backbone
(docs/sage.md; `lorex bench sage` runs the full leave-one-domain-out version). Scores on reid/a's
query vs gallery; no target label is used to train or select anything.

{table}

Details, costs and gate weights: `reid/results.md`, `reid/gate_weights.png`.
"""


def _cross_tasks(cross: dict | None) -> dict:
    return (cross or {}).get("tasks", {})


def _cross_modal_section(cross: dict | None) -> str:
    """The small cross-modal run: each method's accuracy, details in cross_modal/results.md."""
    tasks = _cross_tasks(cross)
    if not tasks:
        return ""
    rows = [
        [t, name, f"{100 * v['accuracy']:.1f}"]
        for t, methods in tasks.items()
        for name, v in methods.items()
    ]
    table = markdown_table(["task", "method", "accuracy %"], rows)
    return f"""## Cross-modal: an RGB model to depth, without its RGB data (TGMB + TGKT, small)

An RGB source model of sensor k1's six shape classes adapted to unlabelled depth images of
sensor k2, using only RGB-depth pairs of four other classes (docs/cross_modal.md;
`lorex bench cross-modal` runs every task and the ablations). Accuracy on the unlabelled
target images.

{table}

Details and the translated images: `cross_modal/results.md`, `cross_modal/translations.png`.
"""


def _efficiency_table(experts: dict, domains: tuple[str, ...]) -> str:
    """Accuracy against the four costs LoSA's paper compares (docs/losa.md), per method."""
    rows = []
    for method in ("linear", "full", "lora", "losa"):
        runs = [experts[d][method] for d in domains if method in experts[d]]
        if not runs:
            continue

        def mean(key: str, runs: list = runs) -> float:
            values = [r[key] for r in runs if r.get(key) is not None]
            return sum(values) / max(1, len(values))

        rows.append(
            [
                method,
                f"{100 * mean('accuracy'):.1f}",
                f"{int(mean('trainable_params')):,}",
                f"{mean('peak_train_mb'):.0f}",
                f"{mean('train_seconds'):.1f}",
                "on" if all(r.get("feature_cache") for r in runs) else "off",
                f"{mean('infer_ms_per_image'):.3f}",
            ]
        )
    header = ["method", "accuracy %", "trainable params", "peak train MB", "train s"]
    header += ["feature cache", "infer ms/img"]
    return markdown_table(header, rows)


def _method(name: str, s: DemoSettings):
    """The training method for one demo stage; LoRA takes the settings' rank-8 recipe."""
    if name != "lora":
        return METHODS[name]()
    from lorex.adapters.lora import LoraConfig

    options = {"lora_alpha": s.lora_alpha or 8.0}
    if s.lora_targets:
        options["target_modules"] = s.lora_targets
    return METHODS["lora"](LoraConfig(r=8, **options), backbone_targets=not s.lora_targets)


def _merge_section(merges: dict[str, dict]) -> str:
    if not merges:
        return ""
    parts = [
        "## One model for every domain: merging the experts without data\n",
        "Each merged model keeps every expert's head and is scored on each domain with that "
        "domain's head. Normalised: merged accuracy / the domain's own expert, averaged. "
        "Default settings of each method (`lorex merge --help`, docs/merging.md).\n",
    ]
    for kind, results in merges.items():
        parts.append(f"### {kind} experts\n\n{merge_table(results)}\n")
        if "doge" not in results:
            parts.append(
                "DOGE (400 Adam steps per weight matrix) is left out of the quick demo to keep "
                "it short: `lorex bench merge --quick` adds it and the LoRA experts.\n"
            )
    return "\n".join(parts) + "\n"


__all__ = ["FULL", "QUICK", "DemoSettings", "replace", "run_demo"]
