"""Markdown tables and heat-map PNGs for reports a person reads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(matrix: np.ndarray, row_names: list[str], col_names: list[str]) -> str:
    """A Markdown matrix of accuracies in percent; the diagonal (own domain) is bold."""
    rows = []
    for i, name in enumerate(row_names):
        cells = [
            f"**{100 * v:.1f}**" if i == j else f"{100 * v:.1f}" for j, v in enumerate(matrix[i])
        ]
        rows.append([name, *cells])
    return markdown_table(["trained on \\ tested on", *col_names], rows)


def heatmap_png(
    matrix: np.ndarray, row_names: list[str], col_names: list[str], path: str | Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(
        figsize=(1.3 * len(col_names) + 2.2, 0.7 * len(row_names) + 1.6), dpi=110
    )
    im = ax.imshow(100 * matrix, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(col_names)), col_names, rotation=20, ha="right")
    ax.set_yticks(range(len(row_names)), row_names)
    ax.set_xlabel("tested on")
    ax.set_ylabel("expert trained on")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = 100 * matrix[i, j]
            ax.text(
                j,
                i,
                f"{value:.1f}",
                ha="center",
                va="center",
                color="black" if value > 60 else "white",
                fontsize=9,
            )
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (written later, e.g. inside an atomic directory); the
    figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def curve_png(history: list[dict], title: str) -> bytes:
    """Training loss and accuracy per epoch, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, [h["loss"] for h in history], "o-", label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(
        epochs, [h["train_accuracy"] for h in history], "s--", color="tab:orange", label="accuracy"
    )
    ax2.set_ylabel("train accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def grouped_bars_png(
    values: dict[str, dict[str, float]], path: str | Path, title: str, ylabel: str = "accuracy (%)"
) -> None:
    """One group of bars per row key (a method), one bar per column key (a task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(values)
    cols = list(next(iter(values.values())))
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 3, 3.6), dpi=110)
    for j, col in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [values[r][col] for r in rows], width, label=col)
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=min(len(cols), 5), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
