"""Defect drawers: each returns a binary mask (computed first) and the defect's appearance.

A drawer never touches pixels itself; ``compose.apply_defect`` pastes the appearance inside the mask only.
Every geometric and photometric parameter is drawn from a range with a floor, so defects stay visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from defectsynth.storage.demo.noise import fractal_noise
from defectsynth.storage.demo.scene import Scene
from defectsynth.storage.demo.shapes import (
    blob_field,
    blob_mask,
    boundary,
    erode,
    random_point,
    random_walk,
    stroke_mask,
)

logger = logging.getLogger(__name__)

Drawer = Callable[[np.random.Generator, Scene], tuple[np.ndarray, np.ndarray]]
CONTAMINANTS = ((64, 42, 24), (28, 28, 30), (92, 112, 48), (150, 72, 30), (236, 232, 220))
TINTS = ((1.0, 0.75, -0.55), (-1.0, -0.9, -0.8), (0.9, -0.4, -0.6), (-0.5, -0.2, 0.9), (0.8, 0.8, 0.8))
MIN_PIXELS = 8
MIN_FRACTION = 0.0015  # smallest defect area as a share of the image, so defects stay findable
ATTEMPTS = 24


def _anchor(rng: np.random.Generator, scene: Scene, margin: float) -> tuple[float, float]:
    """A defect centre inside the drawable region, ``margin`` px from its edge where the region allows."""
    region = scene.region
    inner = erode(region, int(margin))
    edge = min(int(margin), region.shape[0] // 4)
    if edge > 0:  # keep textures' anchors off the image border too
        inner[:edge], inner[-edge:], inner[:, :edge], inner[:, -edge:] = False, False, False, False
    return random_point(rng, inner if inner.any() else region)


def _fit(rng: np.random.Generator, scene: Scene, make_mask: Callable[[], np.ndarray]) -> np.ndarray:
    """Draw masks until one keeps enough pixels inside the region; fall back to a small disc."""
    region = scene.region
    wanted = max(MIN_PIXELS, int(region.size * MIN_FRACTION))
    for _ in range(ATTEMPTS):
        mask = make_mask() & region
        if mask.sum() >= wanted:
            return mask
    logger.debug("defect shape kept missing the region; using a fallback disc")
    size = region.shape[0]
    center = random_point(rng, region)
    return (blob_mask(rng, size, center, max(2.0, size * 0.03), 0.0) & region) | _pixel(region.shape, center)


def _back_off(point: tuple[float, float], heading: float, distance: float) -> tuple[float, float]:
    """The point ``distance`` px behind ``point`` along ``heading``, so a stroke is centred on its anchor."""
    return point[0] - distance * np.sin(heading), point[1] - distance * np.cos(heading)


def _pixel(shape: tuple[int, ...], point: tuple[float, float]) -> np.ndarray:
    """A mask holding the single pixel ``point``, so a fallback is never empty."""
    mask = np.zeros(shape[:2], dtype=bool)
    mask[int(point[0]), int(point[1])] = True
    return mask


def _grey(value: np.ndarray | float) -> np.ndarray:
    """Broadcast a per-pixel (or scalar) grey offset to three channels."""
    return np.asarray(value, dtype=np.float32)[..., None] if np.ndim(value) else np.float32(value)


def draw_scratch(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A thin, gently curved line, brighter or darker than the surface."""
    size = scene.image.shape[0]

    def make() -> np.ndarray:
        length, heading = size * rng.uniform(0.2, 0.5), rng.uniform(0, 2 * np.pi)
        steps = int(rng.integers(6, 10))
        start = _back_off(_anchor(rng, scene, size * 0.05), heading, length / 2)
        points = random_walk(rng, start, heading, steps, length / steps, 0.12)
        return stroke_mask(size, points, max(1, round(size / 128 * rng.uniform(1.0, 2.6))))

    mask = _fit(rng, scene, make)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    streak = 1.0 + 0.15 * fractal_noise(rng, size, size, (8.0, 8.0), octaves=1)
    base = scene.image.astype(np.float32)
    return mask, base + sign * _grey(rng.uniform(45.0, 90.0) * streak)


def draw_crack(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A jagged dark line with one or two branches."""
    size = scene.image.shape[0]
    width = max(1, round(size / 128 * rng.uniform(1.0, 2.0)))

    def make() -> np.ndarray:
        step = size * rng.uniform(0.025, 0.04)
        heading = rng.uniform(0, 2 * np.pi)
        steps = int(rng.integers(8, 15))
        start = _back_off(_anchor(rng, scene, size * 0.06), heading, steps * step * 0.4)
        trunk = random_walk(rng, start, heading, steps, step, 0.7)
        mask = stroke_mask(size, trunk, width)
        for _ in range(int(rng.integers(1, 3))):
            fork = trunk[int(rng.integers(1, len(trunk) - 1))]
            turn = rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 1.1)
            branch = random_walk(rng, fork, heading + turn, int(rng.integers(3, 7)), step * 0.8, 0.7)
            mask |= stroke_mask(size, branch, max(1, width - 1))
        return mask

    mask = _fit(rng, scene, make)
    return mask, scene.image.astype(np.float32) * rng.uniform(0.18, 0.42)


def draw_hole(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """An irregular hole: nearly black inside, with a slightly lit, frayed rim."""
    size = scene.image.shape[0]
    field = np.ones(scene.image.shape[:2], dtype=np.float32)

    def make() -> np.ndarray:
        nonlocal field
        radius = size * rng.uniform(0.04, 0.09)
        field = blob_field(rng, size, _anchor(rng, scene, radius), radius, rng.uniform(0.2, 0.4))
        return field < 1.0

    mask = _fit(rng, scene, make)
    depth = 0.08 + 0.35 * np.clip(field, 0.0, 1.0) ** 4
    return mask, scene.image.astype(np.float32) * _grey(depth) + 6.0


def draw_contamination(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A cluster of one to three blobs of foreign matter (dirt, oil, rust, fluff), mottled and semi-opaque."""
    size = scene.image.shape[0]

    def make() -> np.ndarray:
        center = _anchor(rng, scene, size * 0.06)
        mask = np.zeros(scene.image.shape[:2], dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            offset = rng.normal(0.0, size * 0.03, 2)
            spot = (center[0] + offset[0], center[1] + offset[1])
            mask |= blob_mask(rng, size, spot, size * rng.uniform(0.025, 0.07), rng.uniform(0.2, 0.45))
        return mask

    mask = _fit(rng, scene, make)
    colour = np.asarray(CONTAMINANTS[rng.integers(len(CONTAMINANTS))], dtype=np.float32)
    mottle = fractal_noise(rng, size, size, (size / 10.0, size / 10.0), octaves=2)
    alpha = np.clip(rng.uniform(0.65, 0.95) + 0.12 * mottle, 0.4, 1.0)[..., None]
    base = scene.image.astype(np.float32)
    return mask, base * (1.0 - alpha) + colour * (1.0 + 0.2 * mottle)[..., None] * alpha


def draw_discoloration(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A broad stain tinting the surface, strongest at its centre and softer (never invisible) at its rim."""
    size = scene.image.shape[0]
    field = np.ones(scene.image.shape[:2], dtype=np.float32)

    def make() -> np.ndarray:
        nonlocal field
        radius = size * rng.uniform(0.08, 0.16)
        field = blob_field(rng, size, _anchor(rng, scene, radius * 0.5), radius, rng.uniform(0.15, 0.3))
        return field < 1.0

    mask = _fit(rng, scene, make)
    tint = np.asarray(TINTS[rng.integers(len(TINTS))], dtype=np.float32) * rng.uniform(40.0, 70.0)
    weight = 1.0 - 0.5 * np.clip(field, 0.0, 1.0) ** 2
    return mask, scene.image.astype(np.float32) + weight[..., None] * tint


def draw_missing_piece(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A bite out of the object's edge: the bitten silhouette shows the background instead."""
    if scene.foreground is None or scene.background is None:
        msg = "missing_piece needs an object scene (foreground and background)"
        raise ValueError(msg)
    size = scene.image.shape[0]
    rim = boundary(scene.foreground)

    def make() -> np.ndarray:
        radius = size * rng.uniform(0.07, 0.13)
        bite = blob_mask(rng, size, random_point(rng, rim), radius, rng.uniform(0.15, 0.35))
        return bite if (bite & scene.foreground).sum() >= 0.15 * np.pi * radius**2 else np.zeros_like(bite)

    return _fit(rng, scene, make), scene.background.astype(np.float32)


DEFECT_DRAWERS: dict[str, Drawer] = {
    "scratch": draw_scratch,
    "crack": draw_crack,
    "hole": draw_hole,
    "contamination": draw_contamination,
    "discoloration": draw_discoloration,
    "missing_piece": draw_missing_piece,
}
