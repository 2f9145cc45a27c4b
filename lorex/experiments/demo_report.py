"""The demo's results, and their report: ``metrics.json``, ``report.md`` and the accuracy
matrix's heatmap. The demo's stages fill a ``DemoResults``; this module only lays it out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lorex.experiments.merge_bench import merge_table
from lorex.experiments.settings import DemoSettings
from lorex.experiments.stages import SHIPPED_BASE, base_recipe, short
from lorex.io import read_json, write_json
from lorex.pretrained import find_shipped, recipe_of
from lorex.report import accuracy_table, heatmap_png, markdown_table
from lorex.version import __version__


@dataclass
class DemoResults:
    """What the demo's stages measured, for its report and metrics.json."""

    experts: dict[str, dict[str, dict]] = field(default_factory=dict)  # domain -> method -> metrics
    matrix: np.ndarray | None = None  # full experts: trained domain x tested domain
    probe: np.ndarray | None = None  # each domain's linear probe on its own test set
    merges: dict[str, dict] = field(default_factory=dict)  # expert kind -> merge_bench's scores
    timings: dict[str, float] = field(default_factory=dict)  # stage label -> seconds
    reid: dict | None = None
    cross: dict | None = None


def _samples(limit: int | None) -> str:
    return f"at most {limit}" if limit else "all"


def write_report(out: Path, s: DemoSettings, seed: int, base: Path, r: DemoResults) -> Path:
    """``metrics.json``, ``accuracy_matrix.png`` and ``report.md`` in ``out``; returns the
    report's path."""
    names = [short(d) for d in s.domains]
    heatmap_png(
        r.matrix,
        names,
        names,
        out / "accuracy_matrix.png",
        "Full fine-tuned experts: accuracy on every domain",
    )
    base_metrics = read_json(base / "metrics.json")
    write_json(out / "metrics.json", _metrics(s, seed, base_metrics, r))
    text = _report_text(s, seed, base_metrics, r)
    (out / "report.md").write_text(text, encoding="utf-8")
    return out / "report.md"


def _off_domain(matrix: np.ndarray) -> np.ndarray:
    """Each expert's mean accuracy on the other domains."""
    return (matrix.sum(1) - np.diag(matrix)) / max(1, len(matrix) - 1)


def _metrics(s: DemoSettings, seed: int, base_metrics: dict, r: DemoResults) -> dict:
    diagonal = np.diag(r.matrix)
    return {
        "lorex_version": __version__,
        "seed": seed,
        "settings": asdict(s),
        "domains": list(s.domains),
        "accuracy_matrix": r.matrix.tolist(),
        "own_domain_accuracy": dict(zip(s.domains, diagonal.tolist(), strict=True)),
        "mean_off_domain_accuracy": dict(
            zip(s.domains, _off_domain(r.matrix).tolist(), strict=True)
        ),
        "base_linear_probe_accuracy": dict(zip(s.domains, r.probe.tolist(), strict=True)),
        "base_pretrain_accuracy": base_metrics["accuracy"],
        "experts": r.experts,
        "merge": r.merges,
        "reid": {t: v for t, v in (r.reid or {}).items() if t.startswith("reid/")},
        "cross_modal": _cross_tasks(r.cross),
        "stage_seconds": r.timings,
    }


def _expert_rows(s: DemoSettings, r: DemoResults) -> list[list[str]]:
    """Per domain: the probe, the full expert against it, its costs, and the LoRA expert."""
    experts = r.experts
    return [
        [
            short(dom),
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
        for dom, p, d, o in zip(
            s.domains, r.probe, np.diag(r.matrix), _off_domain(r.matrix), strict=True
        )
    ]


EXPERT_COLUMNS = [
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
]


def _report_text(s: DemoSettings, seed: int, base_metrics: dict, r: DemoResults) -> str:
    names = [short(d) for d in s.domains]
    shipped = _shipped_line(s, seed)
    return f"""# Lorex demo: one expert per digit domain

Base: `{s.preset}` pretrained on `pretrain/chars` ({base_metrics["train_samples"]} images,
{s.pretrain_epochs} epochs; {100 * base_metrics["accuracy"]:.1f}% on its own test split).{shipped}
Each domain gets a linear probe of the frozen base, a fully fine-tuned expert, a LoRA expert
(rank 8 on every block's qkv, proj, fc1, fc2, saved as a PEFT adapter) and a LoSA side network
(docs/losa.md; all three {s.expert_epochs} epochs,
{_samples(s.expert_samples)} training images).
Test sets: {_samples(s.test_samples)} images per domain. Seed {seed}, lorex {__version__}.

## Experts against the base's linear probe (own domain)

{markdown_table(EXPERT_COLUMNS, _expert_rows(s, r))}

## Accuracy matrix of the full experts

Rows: the domain an expert was fine-tuned on. Columns: the domain it is tested on.
The diagonal is the expert's own domain; off-diagonal cells show the domain shift.

{accuracy_table(r.matrix, names, names)}

![accuracy matrix](accuracy_matrix.png)

## Efficiency of each way to adapt (mean over the domains)

{_efficiency_table(r.experts, s.domains)}

{_merge_section(r.merges)}
{_reid_section(r.reid)}
{_cross_modal_section(r.cross)}
{_timing_section(r.timings)}
Per-run details (loss curves, parameters, memory, time) are in `experts/<domain>/<method>/`.
Memory figures there compare only between runs in separate processes (`lorex train`):
within one demo process, later stages reuse memory that earlier ones already took.
"""


def _shipped_line(s: DemoSettings, seed: int) -> str:
    """Says so when these settings are those of the base shipped with lorex."""
    if find_shipped(SHIPPED_BASE, base_recipe(s, seed)) is None:
        return ""
    command = recipe_of(SHIPPED_BASE)["command"]
    return f"\nIt is the base shipped with lorex; `{command}` reproduces it bit for bit."


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
