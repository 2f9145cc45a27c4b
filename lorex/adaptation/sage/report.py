"""The Markdown table and the gate-weight plot of a SAGE run."""

from __future__ import annotations

from typing import Any

import numpy as np

from lorex.report import markdown_table, png_bytes


def ordered_variants(variants: dict[str, Any]) -> list[str]:
    order = ("direct/", "averaged", "lora/", "uniform", "gated", "gated-light")
    return sorted(
        variants,
        key=lambda v: next(
            (i for i, p in enumerate(order) if v == p or (p.endswith("/") and v.startswith(p))),
            len(order),
        ),
    )


def variant_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in ordered_variants(metrics["variants"]):
        v = metrics["variants"][name]
        rows.append(
            [
                name,
                f"{100 * v['mAP']:.1f}",
                f"{100 * v['rank1']:.1f}",
                f"{100 * v['rank5']:.1f}",
                f"{100 * v['mINP']:.1f}",
                f"{v['params']:,}",
                f"{v['infer_ms_per_image']:.3f}",
            ]
        )
    return rows


def gate_objective(sage_settings: dict[str, Any]) -> str:
    """What the gates trained on, from a run's ``SageConfig`` as a dict."""
    camera = sage_settings.get("gate_camera", False)
    return "pseudo-labels and the camera term" if camera else "pseudo-labels only"


def sage_report(metrics: dict[str, Any]) -> str:
    costs = metrics["costs"]
    table = markdown_table(
        ["variant", "mAP", "rank-1", "rank-5", "mINP", "parameters", "ms / image"],
        variant_rows(metrics),
    )
    ratio = costs["time_ratio_to_single"]
    objective = gate_objective(metrics.get("config", {}))
    return f"""# SAGE-reID: {", ".join(metrics["names"])} -> {metrics["target"]}

Scores in %, on the target's query vs gallery (reporting only: nothing was selected on them).
The model in this directory is the `{metrics["gate"]}` gate's; the gates trained on {objective}.

{table}

- Inference time against one plain model (the averaged backbone), measured side by side:
  uniform {ratio["uniform"]:.2f}x, published gate {ratio["gated"]:.2f}x, light gate
  {ratio["gated-light"]:.2f}x; an ensemble of the {len(metrics["names"])} LoRA experts
  {costs["ensemble_time_ratio_to_single"]:.2f}x.
- Gate parameters: published {costs["gate_params"]["gated"]:,}
  ({100 * costs["gate_share_of_backbone"]["gated"]:.2f}% of the backbone), light
  {costs["gate_params"]["gated-light"]:,}
  ({100 * costs["gate_share_of_backbone"]["gated-light"]:.2f}%); LoRA
  {costs["lora_params_per_expert"]:,} per expert.
- Gate weights per layer: `gate_weights.png`.
"""


def gate_weights_png(
    weights: dict[str, dict[str, list[float]]],
    names: list[str] | dict[str, list[str]],
    title: str,
) -> bytes:
    """One panel per entry of ``weights``: the mean weight of each expert (rows, ``names``, one
    list for all panels or one per panel) at each gated layer (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(weights)
    layers = list(weights[panels[0]])
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6, 0.32 * len(layers) + 2), 1.6 * len(panels) + 1.2), dpi=100
    )
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels, strict=True):
        rows = names[panel] if isinstance(names, dict) else names
        matrix = np.array([weights[panel][layer] for layer in layers]).T
        im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(len(layers)), [_short(layer) for layer in layers], rotation=90)
        ax.set_title(f"{panel}: mean weight per expert", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.025)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def _short(layer: str) -> str:
    return layer.replace("blocks.", "b").replace("attn.", "").replace("mlp.", "")
