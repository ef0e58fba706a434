"""Rendering one demo image deterministically: its own RNG from (seed, product, split, type, index)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from defectsynth.storage.demo.compose import apply_defect
from defectsynth.storage.demo.defects import DEFECT_DRAWERS
from defectsynth.storage.demo.products import DEMO_PRODUCTS, RENDERERS

GOOD = "good"
SPLITS = ("train", "test")
MIN_SIZE = 32


@dataclass(frozen=True)
class DemoSample:
    """One rendered image with the normal it was drawn on.

    Attributes:
        normal: HxWx3 uint8, the same render before the defect.
        image: HxWx3 uint8, equal to ``normal`` for good images.
        mask: HxW bool defect mask, all False for good images.
        foreground: HxW bool object silhouette for objects, None for textures.
    """

    normal: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    foreground: np.ndarray | None


def image_seed(seed: int, product: str, split: str, defect_type: str, index: int) -> np.random.SeedSequence:
    """A seed sequence for one image, stable across runs and processes (crc32 of names, not ``hash()``)."""
    names = [zlib.crc32(name.encode("utf-8")) for name in (product, split, defect_type)]
    return np.random.SeedSequence([seed % 2**64, *names, index])


def check_size(size: int) -> None:
    """Reject image sizes too small for the procedural shapes to read."""
    if size < MIN_SIZE:
        msg = f"size must be at least {MIN_SIZE} px, got {size}"
        raise ValueError(msg)


def check_request(product: str, split: str, defect_type: str, index: int) -> None:
    """Reject unknown products, splits and defect types, and defects asked for in train."""
    if product not in DEMO_PRODUCTS:
        msg = f"unknown demo product {product!r}; known: {', '.join(DEMO_PRODUCTS)}"
        raise ValueError(msg)
    if split not in SPLITS:
        msg = f"unknown split {split!r}; expected one of {', '.join(SPLITS)}"
        raise ValueError(msg)
    allowed = (GOOD, *DEMO_PRODUCTS[product].defect_types) if split == "test" else (GOOD,)
    if defect_type not in allowed:
        expected = ", ".join(allowed)
        msg = f"defect type {defect_type!r} is not valid for {product}/{split}; expected one of {expected}"
        raise ValueError(msg)
    if index < 0:
        msg = f"index must be >= 0, got {index}"
        raise ValueError(msg)


def render_sample(product: str, split: str, defect_type: str, index: int, *, seed: int, size: int) -> DemoSample:
    """Render one image of ``product``; ``defect_type`` "good" gives a normal with an empty mask."""
    check_size(size)
    check_request(product, split, defect_type, index)
    normal_seq, defect_seq = image_seed(seed, product, split, defect_type, index).spawn(2)
    scene = RENDERERS[product](np.random.default_rng(normal_seq), size)
    if defect_type == GOOD:
        mask = np.zeros((size, size), dtype=bool)
        return DemoSample(normal=scene.image, image=scene.image.copy(), mask=mask, foreground=scene.foreground)
    mask, appearance = DEFECT_DRAWERS[defect_type](np.random.default_rng(defect_seq), scene)
    image = apply_defect(scene.image, appearance, mask)
    return DemoSample(normal=scene.image, image=image, mask=mask, foreground=scene.foreground)
