"""Scene lighting: a global gain and a linear gradient, so normals vary as real captures do."""

from __future__ import annotations

import numpy as np

from defectsynth.storage.demo.shapes import grid


def lighting_field(rng: np.random.Generator, size: int, *, gain: tuple[float, float] = (0.88, 1.12)) -> np.ndarray:
    """Multiplicative HxW light field: a random global gain times a gentle gradient in a random direction."""
    ys, xs = grid(size)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    slope = rng.uniform(0.0, 0.14)
    ramp = ((xs - size / 2.0) * np.cos(angle) + (ys - size / 2.0) * np.sin(angle)) / size
    return (rng.uniform(*gain) * (1.0 + slope * ramp)).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip a float image to uint8."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
