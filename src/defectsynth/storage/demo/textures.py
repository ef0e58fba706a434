"""Normal renderers for texture products: woven fabric and wood grain."""

from __future__ import annotations

import numpy as np

from defectsynth.storage.demo.lighting import lighting_field, to_uint8
from defectsynth.storage.demo.noise import fractal_noise, value_noise
from defectsynth.storage.demo.scene import Scene
from defectsynth.storage.demo.shapes import grid

FABRIC_COLOUR = (96, 114, 152)  # one product, one dye lot: normals vary only slightly around it
WOOD_COLOURS = ((210, 166, 116), (148, 97, 56))  # earlywood, latewood


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], spread: float) -> np.ndarray:
    """A colour with each channel shifted by up to ``spread`` grey levels."""
    return np.asarray(colour, dtype=np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32)


def render_fabric(rng: np.random.Generator, size: int) -> Scene:
    """Plain-weave fabric: warp and weft threads alternating over/under, with dye and fibre variation."""
    ys, xs = grid(size)
    period = size / rng.uniform(11.0, 14.0)
    wobble = fractal_noise(rng, size, size, (3.0, 3.0), octaves=2) * period * 0.12
    u_coord = (xs + rng.uniform(0.0, 2.0 * period) + wobble) / period
    v_coord = (ys + rng.uniform(0.0, 2.0 * period) - wobble) / period
    col, row = np.floor(u_coord).astype(np.int64), np.floor(v_coord).astype(np.int64)
    u, v = u_coord - col, v_coord - row
    warp_on_top = (col + row) % 2 == 0
    across_warp, across_weft = np.sin(np.pi * u) ** 0.6, np.sin(np.pi * v) ** 0.6
    profile = np.where(
        warp_on_top,
        across_warp * (0.72 + 0.28 * np.sin(np.pi * v)),
        across_weft * (0.72 + 0.28 * np.sin(np.pi * u)),
    )
    # Per-thread dye variation: each warp column and weft row gets its own slight gain.
    cols, rows = col - col.min(), row - row.min()
    warp_dye = rng.normal(1.0, 0.035, int(cols.max()) + 1).astype(np.float32)[cols]
    weft_dye = rng.normal(1.0, 0.035, int(rows.max()) + 1).astype(np.float32)[rows]
    base = _jitter(rng, FABRIC_COLOUR, 7.0)
    warp_colour, weft_colour = base * rng.uniform(0.9, 1.0), base * rng.uniform(1.0, 1.08)
    colour = np.where(warp_on_top[..., None], warp_colour * warp_dye[..., None], weft_colour * weft_dye[..., None])
    fibres = 1.0 + 0.06 * fractal_noise(rng, size, size, (size / 3.0, size / 3.0), octaves=2)
    shade = (0.42 + 0.58 * profile) * fibres * lighting_field(rng, size)
    return Scene(image=to_uint8(colour * shade[..., None]))


def render_wood(rng: np.random.Generator, size: int) -> Scene:
    """Wood: growth rings around a far-away pith, warped by noise, with fine grain streaks along them."""
    ys, xs = grid(size)
    pith_y = size * rng.uniform(-0.6, 1.6)
    pith_x = -size * rng.uniform(0.8, 2.5) if rng.random() < 0.5 else size * rng.uniform(1.8, 3.5)
    stretch = rng.uniform(0.04, 0.12)  # rings elongated along x, as on a flat-sawn board
    radius = np.sqrt((xs - pith_x) ** 2 * stretch + (ys - pith_y) ** 2)
    warp = fractal_noise(rng, size, size, (1.5, 2.0), octaves=3, persistence=0.35)
    radius += warp * size * rng.uniform(0.05, 0.09)
    period = size / rng.uniform(7.0, 11.0)
    ring = (radius / period + rng.random()) % 1.0
    # Earlywood is light; latewood darkens gradually, then the next ring starts abruptly light again.
    darkening = np.clip((ring - 0.55) / 0.3, 0.0, 1.0) ** 1.5
    latewood = np.where(ring < 0.92, darkening, np.clip((1.0 - ring) / 0.08, 0.0, 1.0))
    grain = fractal_noise(rng, size, size, (size / 2.5, 3.0), octaves=2)
    pores = np.clip((value_noise(rng, size, size, (size / 1.5, size / 12.0)) - 0.72) / 0.28, 0.0, 1.0)
    light_c, dark_c = _jitter(rng, WOOD_COLOURS[0], 9.0), _jitter(rng, WOOD_COLOURS[1], 9.0)
    mix = np.clip(latewood * 0.85 + 0.12 * grain + 0.35 * pores, 0.0, 1.0)[..., None]
    colour = light_c * (1.0 - mix) + dark_c * mix
    shade = (1.0 + 0.05 * grain) * lighting_field(rng, size)
    return Scene(image=to_uint8(colour * shade[..., None]))
