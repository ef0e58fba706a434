"""DRAEM's Perlin noise and the anomaly masks thresholded from it, for any image size.

Example:
    >>> rng = np.random.default_rng(0)
    >>> mask = perlin_mask((64, 64), rng, min_area=16)
    >>> mask.dtype, mask.shape, bool(mask.sum() >= 16)
    (dtype('bool'), (64, 64), True)
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from defectsynth.core.resize import Shape, as_shape


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3: zero first and second derivatives at lattice points."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_scale(rng: np.random.Generator, exponents: tuple[int, int] = (0, 6)) -> Shape:
    """Lattice cells per axis, (2^ky, 2^kx) with each k drawn from [low, high) as in DRAEM."""
    low, high = exponents
    if not 0 <= low < high:
        msg = f"Perlin scale exponents must satisfy 0 <= low < high, got {exponents}"
        raise ValueError(msg)
    ky, kx = rng.integers(low, high, size=2)
    return 2 ** int(ky), 2 ** int(kx)


def perlin_noise(shape: int | Shape, rng: np.random.Generator, scale: float | tuple[float, float]) -> np.ndarray:
    """Gradient (Perlin) noise of ``shape`` with ``scale`` lattice cells per axis (may be fractional), about [-1, 1].

    Random unit gradients sit on a (cells+1)^2 lattice; each pixel blends the dot products of its four
    corner gradients with its offsets from them through the quintic fade (DRAEM's ``rand_perlin_2d_np``,
    for any image size).
    """
    height, width = as_shape(shape)
    cells_y, cells_x = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
    if min(height, width) < 1 or min(cells_y, cells_x) <= 0:
        msg = f"Perlin noise needs a positive shape and scale, got shape {shape} and scale {scale}"
        raise ValueError(msg)
    lattice = (math.ceil(cells_y) + 1, math.ceil(cells_x) + 1)
    angles = rng.uniform(0.0, 2.0 * np.pi, size=lattice)
    gradients = np.stack([np.sin(angles), np.cos(angles)], axis=-1)  # (cy+1, cx+1, [dy, dx])
    ys = np.arange(height) * (cells_y / height)
    xs = np.arange(width) * (cells_x / width)
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        grad = gradients[iy + dy][:, ix + dx]  # (H, W, 2)
        return grad[..., 0] * (fy - dy) + grad[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1.0 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1.0 - wx) + corner(1, 1) * wx
    return (np.sqrt(2.0) * (top * (1.0 - wy) + bottom * wy)).astype(np.float32)


def rotated_perlin_noise(shape: Shape, rng: np.random.Generator, scale: Shape, angle: float) -> np.ndarray:
    """Perlin noise rotated by ``angle`` degrees: drawn on a canvas the frame fits in at any angle, then cropped.

    DRAEM rotates the noise field itself, which leaves empty corners; the larger canvas has none.
    """
    height, width = shape
    side = math.ceil(math.hypot(height, width)) + 2
    canvas = perlin_noise(side, rng, (scale[0] * side / height, scale[1] * side / width))
    turned = np.asarray(Image.fromarray(canvas, mode="F").rotate(angle, Image.Resampling.BILINEAR))
    top, left = (side - height) // 2, (side - width) // 2
    return turned[top : top + height, left : left + width]


def perlin_mask(
    shape: int | Shape,
    rng: np.random.Generator,
    *,
    threshold: float = 0.5,
    foreground: np.ndarray | None = None,
    min_area: int = 16,
    scale_exponents: tuple[int, int] = (0, 6),
    max_attempts: int = 50,
) -> np.ndarray:
    """A DRAEM-style anomaly mask: rotated Perlin noise above ``threshold``, restricted to ``foreground``.

    Draws fresh noise (new scale, new rotation) until the mask has at least ``min_area`` pixels (and at
    least one), and raises ValueError after ``max_attempts`` fields.
    """
    shape = as_shape(shape)
    needed = max(int(min_area), 1)
    if foreground is not None:
        if foreground.shape != shape:
            msg = f"foreground of shape {foreground.shape} does not match the mask shape {shape}"
            raise ValueError(msg)
        if int(foreground.sum()) < needed:
            msg = f"foreground has {int(foreground.sum())} px, fewer than the {needed} px a Perlin mask needs"
            raise ValueError(msg)
    for _ in range(max_attempts):
        scale = perlin_scale(rng, scale_exponents)
        mask = rotated_perlin_noise(shape, rng, scale, float(rng.uniform(-90.0, 90.0))) > threshold
        if foreground is not None:
            mask &= foreground
        if int(mask.sum()) >= needed:
            return mask
    where = "" if foreground is None else f" on a foreground of {int(foreground.sum())} px"
    msg = (
        f"no Perlin mask of at least {needed} px{where} after {max_attempts} attempts "
        f"(threshold {threshold}); lower the threshold or min_area"
    )
    raise ValueError(msg)
