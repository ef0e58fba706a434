"""Fractal value noise in numpy: the shared source of texture, warps and irregular shapes."""

from __future__ import annotations

import numpy as np


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic smoothstep, so interpolated noise has no visible grid creases."""
    return t * t * (3.0 - 2.0 * t)


def value_noise(rng: np.random.Generator, height: int, width: int, cells: tuple[float, float]) -> np.ndarray:
    """One octave of value noise in [0, 1]: random lattice values, smoothly interpolated.

    ``cells`` is the number of lattice cells along (y, x); unequal counts give streaky, anisotropic noise.
    """
    cy, cx = max(float(cells[0]), 1e-3), max(float(cells[1]), 1e-3)
    lattice = rng.random((int(np.ceil(cy)) + 2, int(np.ceil(cx)) + 2)).astype(np.float32)
    ys = np.arange(height, dtype=np.float32) * (cy / height) + rng.random(dtype=np.float32)
    xs = np.arange(width, dtype=np.float32) * (cx / width) + rng.random(dtype=np.float32)
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = _smoothstep(ys - iy)[:, None], _smoothstep(xs - ix)[None, :]
    rows = lattice[:, ix] * (1.0 - fx) + lattice[:, ix + 1] * fx  # (lattice rows, width)
    return rows[iy] * (1.0 - fy) + rows[iy + 1] * fy


def fractal_noise(
    rng: np.random.Generator,
    height: int,
    width: int,
    cells: tuple[float, float] = (4.0, 4.0),
    *,
    octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of value-noise octaves (doubling frequency, ``persistence`` amplitude), scaled to about [-1, 1]."""
    total = np.zeros((height, width), dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = 2.0**octave
        total += amplitude * value_noise(rng, height, width, (cells[0] * scale, cells[1] * scale))
        norm += amplitude
        amplitude *= persistence
    return (total / norm - 0.5) * 2.0
