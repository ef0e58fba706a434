"""Line plots and histograms rendered to images with matplotlib's Agg canvas (no pyplot, no global state).

Matplotlib is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def render(figure: Any) -> np.ndarray:
    """An Agg-rendered matplotlib figure as an ``H x W x 3`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str
) -> np.ndarray:
    """Named ``(x, y)`` series on one plot (a log y axis when every value is positive and they span a decade)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    values = np.concatenate([np.asarray(y, dtype=float) for _, y in series.values()] or [np.ones(1)])
    for label, (x, y) in series.items():
        axes.plot(np.asarray(x), np.asarray(y), linewidth=1.2, label=label)
    if values.size and values.min() > 0 and values.max() / values.min() > 10:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return render(figure)


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 20) -> np.ndarray:
    """A histogram of ``values`` as an image."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.add_subplot()
    axes.hist(np.asarray(values, dtype=float), bins=bins, color="tab:blue", edgecolor="white")
    axes.set(title=title, xlabel=xlabel, ylabel="samples")
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return render(figure)
