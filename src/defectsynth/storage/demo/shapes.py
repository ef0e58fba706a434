"""Binary shape masks (irregular blobs, strokes) and mask morphology, all hard-edged by design.

Defect masks are computed before any pixel is drawn, so they must be exact: no anti-aliasing anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as float32 arrays of shape (size, size)."""
    axis = np.arange(size, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="ij")


def blob_field(
    rng: np.random.Generator,
    size: int,
    center: tuple[float, float],
    radius: float,
    irregularity: float = 0.25,
) -> np.ndarray:
    """Normalised distance to an irregular blob: < 1 inside, 0 at its centre.

    The outline is a circle whose radius is modulated by a few random angular harmonics.
    """
    ys, xs = grid(size)
    dy, dx = ys - center[0], xs - center[1]
    angle = np.arctan2(dy, dx)
    outline = np.ones_like(angle)
    for harmonic in range(2, 6):
        amplitude = irregularity * rng.uniform(0.3, 1.0) / (harmonic - 1)
        outline += amplitude * np.cos(harmonic * angle + rng.uniform(0.0, 2.0 * np.pi))
    outline = np.maximum(outline, 0.35) * radius
    return np.sqrt(dy * dy + dx * dx) / outline


def blob_mask(
    rng: np.random.Generator,
    size: int,
    center: tuple[float, float],
    radius: float,
    irregularity: float = 0.25,
) -> np.ndarray:
    """Irregular blob as a bool mask (see ``blob_field``)."""
    return blob_field(rng, size, center, radius, irregularity) < 1.0


def stroke_mask(size: int, points: Sequence[tuple[float, float]], width: int) -> np.ndarray:
    """A polyline of (y, x) points drawn ``width`` px wide without anti-aliasing, as a bool mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    xy = [(float(x), float(y)) for y, x in points]
    draw.line(xy, fill=255, width=max(1, int(width)), joint="curve")
    if width > 2:  # round caps, so thick strokes do not end in square stubs
        r = width / 2.0
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas) > 0


def random_walk(
    rng: np.random.Generator,
    start: tuple[float, float],
    heading: float,
    steps: int,
    step_length: float,
    turn: float,
) -> list[tuple[float, float]]:
    """Points of a random walk from ``start`` whose heading wanders by up to ``turn`` radians a step."""
    points = [start]
    y, x = start
    for _ in range(steps):
        heading += rng.uniform(-turn, turn)
        y, x = y + step_length * np.sin(heading), x + step_length * np.cos(heading)
        points.append((y, x))
    return points


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erode a bool mask by a square of half-width ``radius``; outside the image counts as empty.

    A pixel survives when its window holds no empty pixel, counted with a summed-area table (O(pixels)).
    """
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    side = 2 * radius + 1
    empty = np.pad(~mask, radius, constant_values=True).astype(np.int32)
    table = np.pad(empty.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    window = (
        table[side : side + height, side : side + width]
        - table[:height, side : side + width]
        - table[side : side + height, :width]
        + table[:height, :width]
    )
    return window == 0


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch its outside (the one-pixel inner rim)."""
    return mask & ~erode(mask, 1)


def random_point(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    """A uniformly chosen (y, x) pixel of a non-empty bool ``region``."""
    flat = np.flatnonzero(region)
    if flat.size == 0:
        msg = "cannot pick a point in an empty region"
        raise ValueError(msg)
    y, x = divmod(int(flat[rng.integers(flat.size)]), region.shape[1])
    return float(y), float(x)
