"""The paper's figures: heatmaps of phi(i, j) in its layout (i, the first adapter's top-i directions, down the rows
from 1 at the top, j, the second's, along the columns, colour 0..1; Figure 3 compares A_{r=8} with A_{r=64},
Figure 4 two seeds at r = 64 against a random Gaussian control), and Figure 2's metric-against-parameters curves.

matplotlib is imported here only, with the Agg backend, so the numerical analyses never need it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Panel = tuple[str, np.ndarray]  # (title, phi of shape (r1, r2))


def _ticks(n: int, most: int = 8) -> np.ndarray:
    """0-based positions of about `most` 1-based tick labels, always including 1 and n."""
    return np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(int))


def heatmap_grid(
    rows: Sequence[Sequence[Panel]],
    path: str | os.PathLike,
    crop: int | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Save a grid of phi heatmaps (one list of panels per row) to a PNG; returns the figure (closed).

    crop: show only i, j <= crop, like the paper's zoomed lower-left panels.
    """
    if not rows or not all(rows):
        raise ValueError("heatmap_grid needs at least one panel in every row.")
    nrows, ncols = len(rows), max(len(row) for row in rows)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols + 0.8, 2.8 * nrows + 0.5), squeeze=False, layout="constrained"
    )
    image = None
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            name, phi = row[c]
            phi = np.asarray(phi)
            if crop is not None:
                phi = phi[:crop, :crop]
            image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(_ticks(phi.shape[1]), [str(t + 1) for t in _ticks(phi.shape[1])])
            ax.set_yticks(_ticks(phi.shape[0]), [str(t + 1) for t in _ticks(phi.shape[0])])
            ax.set_xlabel("j")
            ax.set_ylabel("i")
            ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label=r"$\phi(i, j)$")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig


def figure3(
    at_layer: Mapping[str, np.ndarray],
    mean: Mapping[str, np.ndarray],
    layer: Any,
    path: str | os.PathLike,
    labels: tuple[str, str] = ("A1", "A2"),
    crop: int | None = None,
) -> Figure:
    """phi(A1, A2) per weight kind (columns): one layer (top row) and the mean over layers (bottom row)."""
    first = [(f"{kind}, layer {layer}", phi) for kind, phi in at_layer.items()]
    second = [(f"{kind}, mean over layers", phi) for kind, phi in mean.items()]
    title = f"phi({labels[0]}, {labels[1]}, i, j)"
    return heatmap_grid([first, second], Path(path), crop=crop, title=title)


def figure4(
    at_layer: Mapping[str, np.ndarray],
    control: np.ndarray,
    layer: Any,
    path: str | os.PathLike,
    labels: tuple[str, str] = ("A1", "A2"),
    crop: int | None = None,
) -> Figure:
    """phi(A1, A2) per weight kind at one layer, beside the same for two random Gaussian matrices."""
    panels = [(f"{kind}, layer {layer}", phi) for kind, phi in at_layer.items()]
    panels.append(("random Gaussian", control))
    title = f"phi({labels[0]}, {labels[1]}, i, j) vs random"
    return heatmap_grid([panels], Path(path), crop=crop, title=title)


def scaling_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    ylabel: str,
    title: str | None = None,
    dpi: int = 120,
) -> Figure:
    """Figure 2's layout: one line per method through its (trainable parameters, metric) points, the parameter
    axis logarithmic, so methods of very different sizes share one plot."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for name, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig
