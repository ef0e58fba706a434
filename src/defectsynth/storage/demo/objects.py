"""Normal renderers for object products: a metal washer and a two-colour capsule pill."""

from __future__ import annotations

import numpy as np

from defectsynth.storage.demo.lighting import lighting_field, to_uint8
from defectsynth.storage.demo.noise import fractal_noise, value_noise
from defectsynth.storage.demo.scene import Scene
from defectsynth.storage.demo.shapes import grid

PILL_BODY = (178, 36, 42)
PILL_CAP = (228, 220, 198)


def _background(rng: np.random.Generator, size: int, colour: tuple[int, int, int]) -> np.ndarray:
    """A dark, slightly mottled backdrop as an unlit float HxWx3 image."""
    mottle = 1.0 + 0.08 * fractal_noise(rng, size, size, (3.0, 3.0), octaves=3)
    return np.asarray(colour, dtype=np.float32) * mottle[..., None]


def _compose(object_rgb: np.ndarray, backdrop: np.ndarray, foreground: np.ndarray, light: np.ndarray) -> Scene:
    """Light the object and backdrop alike and paste the object over its silhouette."""
    background = to_uint8(backdrop * light[..., None])
    image = np.where(foreground[..., None], to_uint8(object_rgb * light[..., None]), background)
    return Scene(image=image, foreground=foreground, background=background)


def render_washer(rng: np.random.Generator, size: int) -> Scene:
    """A flat metal washer: an annulus with bevelled rims, an angular sheen and circular brushing marks."""
    ys, xs = grid(size)
    shift = size * 0.03
    cy, cx = size / 2.0 + rng.uniform(-shift, shift), size / 2.0 + rng.uniform(-shift, shift)
    outer = size * rng.uniform(0.36, 0.39)
    inner = outer * rng.uniform(0.42, 0.48)
    dy, dx = ys - cy, xs - cx
    radius, theta = np.sqrt(dy * dy + dx * dx), np.arctan2(dy, dx)
    foreground = (radius <= outer) & (radius >= inner)
    t = np.clip((radius - inner) / (outer - inner), 0.0, 1.0)
    bevel = 1.0 - 0.28 * (np.exp(-t / 0.07) + np.exp(-(1.0 - t) / 0.07))
    sheen_angle = rng.uniform(0.0, np.pi)
    sheen = 1.0 + rng.uniform(0.18, 0.3) * np.cos(2.0 * (theta - sheen_angle))
    # Brushing: streaks that follow the circumference, i.e. noise in radius only, plus a faint angular grain.
    rings = value_noise(rng, 1, size * 4, (1.0, size / 1.5))[0]
    brushed = 1.0 + 0.09 * (rings[np.clip((radius * 4).astype(np.int64), 0, size * 4 - 1)] - 0.5) * 2.0
    grain = 1.0 + 0.03 * fractal_noise(rng, size, size, (size / 2.0, size / 2.0), octaves=1)
    tint = np.asarray((158, 160, 166), dtype=np.float32) + rng.uniform(-8.0, 8.0)
    metal = tint * (bevel * sheen * brushed * grain)[..., None]
    backdrop = _background(rng, size, (30, 31, 36))
    return _compose(metal, backdrop, foreground, lighting_field(rng, size))


def render_pill(rng: np.random.Generator, size: int) -> Scene:
    """A capsule pill (red body, cream cap) rotated a few degrees, with rounded shading and a highlight."""
    ys, xs = grid(size)
    shift = size * 0.03
    cy, cx = size / 2.0 + rng.uniform(-shift, shift), size / 2.0 + rng.uniform(-shift, shift)
    angle = np.deg2rad(rng.uniform(-7.0, 7.0))
    half_length, radius = size * rng.uniform(0.2, 0.23), size * rng.uniform(0.135, 0.15)
    along = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    across = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    dist = np.sqrt(np.maximum(np.abs(along) - half_length, 0.0) ** 2 + across**2)
    foreground = dist <= radius
    height = np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0))
    shade = 0.5 + 0.5 * height**0.7
    seam = along - rng.uniform(-0.08, 0.08) * half_length
    body = _jitter_colour(rng, PILL_BODY)
    cap = _jitter_colour(rng, PILL_CAP)
    flip = rng.random() < 0.5
    colour = np.where(((seam < 0) != flip)[..., None], body, cap)
    colour = colour * np.where(np.abs(seam) < max(0.6, size / 200.0), 0.78, 1.0)[..., None]
    speckle = 1.0 + 0.04 * fractal_noise(rng, size, size, (size / 3.0, size / 3.0), octaves=1)
    glint = np.exp(-(((across + 0.45 * radius) / (0.16 * radius)) ** 2)) * (np.abs(along) < half_length + 0.3 * radius)
    surface = colour * (shade * speckle)[..., None] + (70.0 * glint)[..., None]
    backdrop = _background(rng, size, (44, 47, 54))
    return _compose(surface, backdrop, foreground, lighting_field(rng, size))


def _jitter_colour(rng: np.random.Generator, colour: tuple[int, int, int]) -> np.ndarray:
    """A colour with each channel shifted by up to 8 grey levels."""
    return np.asarray(colour, dtype=np.float32) + rng.uniform(-8.0, 8.0, 3).astype(np.float32)
