"""A person's view of a cross-modal run: the accuracy table and the translated images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lorex.report import markdown_table, png_bytes


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


#: The columns of ``method_rows``.
METHOD_COLUMNS = [
    "method",
    "accuracy %",
    "test accuracy %",
    "source on translations %",
    "TGKT teacher %",
    "s",
    "what",
]


def method_rows(methods: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [
            name,
            _pct(r.get("accuracy")),
            _pct(r.get("test_accuracy")),
            _pct(r.get("translated_accuracy")),
            _pct(r.get("teacher_accuracy")),
            f"{r.get('seconds', 0.0):.0f}",
            r["description"],
        ]
        for name, r in methods.items()
    ]


def cross_modal_report(metrics: dict[str, Any]) -> str:
    table = markdown_table(
        METHOD_COLUMNS,
        method_rows(metrics["methods"]),
    )
    return (
        f"# Cross-modal transfer: {metrics['source']} -> {metrics['target']}\n\n"
        f"RGB source to {metrics['modality']}, {metrics['target_samples']} unlabelled target "
        f"images (accuracy is transductive, on them), {metrics['ti_pairs']} task-irrelevant "
        f"pairs from `{metrics['ti']}`. Source feature statistics: "
        f"{metrics['source_statistics']}. Seed {metrics['seed']}, lorex "
        f"{metrics['lorex_version']}.\n\n{table}\n\n"
        "![translations](translations.png)\n"
    )


def _rows_image(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of images ``(n, C, H, W)`` in [0, 1] tiled into one RGB array."""
    tiles = []
    for row in rows:
        row = row.expand(-1, 3, -1, -1) if row.shape[1] == 1 else row
        tiles.append(torch.cat(list(row.clamp(0, 1)), dim=2))
    return torch.cat(tiles, dim=1).permute(1, 2, 0).numpy()


def translations_png(
    ti_target: torch.Tensor,
    ti_rgb: torch.Tensor,
    ti_translated: torch.Tensor,
    target: torch.Tensor,
    target_translated: torch.Tensor,
) -> bytes:
    """Top: TI target, its translation, the real paired RGB. Bottom: task-relevant target
    images and their translations (no real RGB exists for them during adaptation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(1.0 * len(ti_target) + 1.5, 5.6), dpi=110)
    axes[0].imshow(_rows_image([ti_target, ti_translated, ti_rgb]))
    axes[0].set_title("TI pairs: target modality / translated / real RGB", fontsize=9)
    axes[1].imshow(_rows_image([target, target_translated]))
    axes[1].set_title("task-relevant target: target modality / translated", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return png_bytes(fig)
