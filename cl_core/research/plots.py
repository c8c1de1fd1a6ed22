"""Plots of forgetting experiments: the matrix as a heatmap, and each task's accuracy over the sequence.

matplotlib with the Agg backend (files only, no display); every function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_core.research.forgetting import ExperimentResult


def _pyplot():  # imported lazily: matplotlib is slow to import and only plotting needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def heatmap(result: ExperimentResult, path: str | Path, title: str | None = None) -> Path:
    """`matrix[i][j]` (score on task i after learning task j) as a heatmap with the numbers written in."""
    plt = _pyplot()
    n = len(result.tasks)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 0.9 * n), dpi=120)
    data = [[math.nan if v is None else v for v in row] for row in result.matrix]
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            value = data[i][j]
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                        fontsize=9)
    labels = [_short(t) for t in result.tasks]
    ax.set_xticks(range(n), [f"after {label}" for label in labels], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_ylabel("score on task")
    m = result.metrics
    ax.set_title(title or f"{'+'.join(result.methods)}: AA {m.get('average_accuracy', math.nan):.2f}, "
                          f"BWT {m.get('backward_transfer', math.nan):+.2f}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, plt, path)


def accuracy_curves(results: Sequence[ExperimentResult], labels: Sequence[str], path: str | Path) -> Path:
    """Average accuracy over the tasks seen so far, after each task, one line per run, and the multitask bound."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for result, label in zip(results, labels, strict=True):
        n = len(result.tasks)
        seen = [sum(result.matrix[i][j] for i in range(j + 1)) / (j + 1) for j in range(n)]
        ax.plot(range(1, n + 1), seen, marker="o", label=label)
    bounds = {r.multitask_average for r in results if r.multitask_average is not None}
    for bound in sorted(bounds):
        ax.axhline(bound, color="gray", linestyle=":", linewidth=1.2, label=f"multitask upper bound ({bound:.2f})")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("mean accuracy on tasks seen so far")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, len(results[0].tasks) + 1) if results else [])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
