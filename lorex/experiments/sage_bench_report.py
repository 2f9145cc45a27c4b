"""``lorex bench sage``'s report: results.md and the gate weights' figure, from its summary."""

from __future__ import annotations

from typing import Any

from lorex.adaptation.sage.report import gate_objective, gate_weights_png
from lorex.adaptation.sage.stages import GATE_VARIANTS
from lorex.data import REID_DOMAINS
from lorex.report import markdown_table


def gate_png(details: dict[str, Any]) -> bytes:
    """Every target's two gates, one panel each."""
    weights, names = {}, {}
    for target, d in details.items():
        for label in GATE_VARIANTS.values():
            weights[f"target {target}, {label}"] = d["gate_weights"][label]
            names[f"target {target}, {label}"] = [f"from {n}" for n in d["names"]]
    return gate_weights_png(weights, names, "SAGE gate weights per layer")


def _quick_section(summary: dict[str, Any]) -> str:
    if "quick_checks" not in summary:
        return ""
    lines = "\n".join(summary["quick_checks"]["lines"])
    return f"\n## What this quick run can show\n\n{lines}\n"


def sage_bench_report(summary: dict[str, Any], quick: bool) -> str:
    targets = [t for t in summary if t in REID_DOMAINS]
    rows = []
    for target in targets:
        for i, (name, v) in enumerate(summary[target].items()):
            rows.append(
                [
                    target if i == 0 else "",
                    name,
                    f"{100 * v['mAP']:.1f}",
                    f"{100 * v['rank1']:.1f}",
                    f"{100 * v['mINP']:.1f}",
                ]
            )
    table = markdown_table(["target", "variant", "mAP", "rank-1", "mINP"], rows)
    g = summary["goals"]
    vit_b = summary["vit_b_timing"]
    goal_rows = [
        [
            t,
            "yes" if p["gated_beats_every_lora_and_uniform"] else "no",
            "yes" if p["gated_light_beats_every_lora_and_uniform"] else "no",
            f"{100 * p['gated_minus_best_direct']:+.1f}",
            f"{100 * p['gated_light_minus_best_direct']:+.1f}",
            f"{100 * p['light_minus_published']:+.1f}",
        ]
        for t, p in g["per_target"].items()
    ]
    goal_table = markdown_table(
        [
            "target",
            "published gate beats every LoRA expert and the uniform mix",
            "light gate beats them",
            "published - best direct (mAP)",
            "light - best direct",
            "light - published",
        ],
        goal_rows,
    )
    cost_rows = [
        [
            t,
            f"{r['uniform']:.2f}",
            f"{r['gated']:.2f}",
            f"{r['gated-light']:.2f}",
            f"{summary['details'][t]['costs']['ensemble_time_ratio_to_single']:.2f}",
        ]
        for t, r in g["bench_model_time_ratio"].items()
    ]
    cost_table = markdown_table(
        ["target", "uniform", "published gate", "light gate", "ensemble of the LoRA experts"],
        cost_rows,
    )
    first = summary["details"][targets[0]]["costs"] if targets else {}
    objective = gate_objective(summary["settings"]["sage"])
    return f"""# SAGE-reID on the synthetic re-ID domains ({"quick" if quick else "full"})

Leave one domain out: each target's three other domains give the source experts. Scores in %,
on the target's query vs gallery; they are reported, never used to select anything.
`direct/X`: X's source expert as it is; `averaged`: the mean of the source backbones;
`lora/X`: X's expert adapted to the target with LoRA on pseudo-labels; `uniform`: the LoRA
experts mixed with equal weights on the averaged backbone (the gate at initialisation);
`gated`: the published gate trained; `gated-light`: the token-pooled gate trained (both on
{objective}, docs/sage.md).

{table}
{_quick_section(summary)}
## Goals

{goal_table}

The published gate beats every LoRA expert and the uniform mix on {g["gated_wins"]} of
{g["targets"]} targets; the light gate on {g["gated_light_wins"]}.

## Inference cost against one plain model, measured side by side

Bench model ({first.get("backbone_params", 0):,} backbone parameters; times relative to the
averaged backbone alone):

{cost_table}

{_vit_b_text(vit_b, first)}

{_digits_text(summary.get("digits") or {})}

Gate weights per target and layer: `gate_weights.png`. Seconds per stage:
{", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items())}.
"""


def _vit_b_text(vit_b: dict | None, first: dict) -> str:
    gate = first.get("gate_params", {})
    share = first.get("gate_share_of_backbone", {})
    text = (
        f"Gate parameters on the bench backbone: published {gate.get('gated', 0):,} "
        f"({100 * share.get('gated', 0):.2f}% of the backbone), light "
        f"{gate.get('gated-light', 0):,} ({100 * share.get('gated-light', 0):.2f}%)."
    )
    if not vit_b:
        return text
    ratio, params, vshare = (
        vit_b["ratio_to_single"],
        vit_b["gate_params"],
        vit_b["gate_share_of_backbone"],
    )
    return (
        text + f" At ViT-B size (768 wide, 12 blocks, 256x128 crops, {vit_b['experts']} experts of "
        f"rank {vit_b['rank']}, batch {vit_b['batch']}, random weights, measured side by side): "
        f"one model {vit_b['ms_per_image']['single']:.1f} ms/image; published gate "
        f"{ratio['gated']:.2f}x, light gate {ratio['gated-light']:.2f}x; an ensemble runs "
        f"{vit_b['experts']} models ({vit_b['ensemble_ratio_to_single']:.0f}x). Gate parameters "
        f"there: published {params['gated']:,} ({100 * vshare['gated']:.1f}% of the backbone), "
        f"light {params['gated-light']:,} ({100 * vshare['gated-light']:.3f}%)."
    )


def _digits_text(digits: dict) -> str:
    if not digits:
        return ""
    rows = [
        [t if i == 0 else "", name, f"{100 * v['accuracy']:.1f}"]
        for t, variants in digits.items()
        for i, (name, v) in enumerate(variants.items())
    ]
    table = markdown_table(["digit target", "variant", "accuracy %"], rows)
    return f"""## The same pipeline on the digit domains (classification)

Leave one digit domain out; the other three domains' full experts (from the characters base) are
adapted with class pseudo-labels (SHOT's centroids, `lorex adapt classify`, docs/sage.md).

{table}
"""
