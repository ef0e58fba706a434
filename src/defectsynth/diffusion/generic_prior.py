"""A generic visual prior for the tiny base: marks on images and binary shapes, drawn during pretraining.

Stable Diffusion has seen lines, spots, stains and silhouettes of every kind before anyone fine-tunes it on
a few defects; a tiny base trained from scratch on a handful of normal products has not, so its VAE cannot
encode a thin dark line and its U-Net cannot draw one, whatever embedding a method learns. This module
stands in for that prior with marks that belong to no product and no defect type:

- ``line``: a straight or bent polyline 1-4 px wide in a random colour;
- ``spot``: a filled ellipse or polygon in a random colour, opaque or translucent;
- ``patch``: a texture swap, a polygon of the image replaced by a shifted, flipped copy of the image;
- ``mask``: the whole image replaced by a binary shape (union of lines, ellipses and polygons, white on
  black), which is what AnomalyDiffusion's mask model and other mask generators draw.

Each mark comes with its caption word (``a photo of wood with a line``, ``a mask``), so the U-Net learns
them as concepts that a method's learned tokens can reach. Everything is drawn from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from defectsynth.diffusion.pretrain import generic_prompt

MARK_KINDS = ("line", "spot", "patch")
SHAPE_PROMPT = "a mask"


def _polyline(rng: np.random.Generator, size: int) -> list[tuple[float, float]]:
    """2-5 points wandering from a random start: straight when two, bent otherwise."""
    count = int(rng.integers(2, 6))
    length = size * rng.uniform(0.1, 0.6)
    heading = rng.uniform(0, 2 * np.pi)
    x, y = rng.uniform(0, size, 2)
    points = [(float(x), float(y))]
    for _ in range(count - 1):
        heading += rng.uniform(-1.0, 1.0)
        x, y = x + length / (count - 1) * np.cos(heading), y + length / (count - 1) * np.sin(heading)
        points.append((float(x), float(y)))
    return points


def _polygon(rng: np.random.Generator, size: int) -> list[tuple[float, float]]:
    """A random star-shaped polygon (5-12 vertices) of radius 3-20% of the side."""
    count = int(rng.integers(5, 13))
    radius = size * rng.uniform(0.03, 0.2)
    cx, cy = rng.uniform(0, size, 2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.5, 1.0, count)
    return [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii, strict=True)]


def _ellipse(rng: np.random.Generator, size: int) -> list[tuple[float, float]]:
    """A rotated ellipse as a 24-gon, axes 2-15% of the side."""
    a, b = size * rng.uniform(0.02, 0.15, 2)
    cx, cy = rng.uniform(0, size, 2)
    turn = rng.uniform(0, np.pi)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    xs, ys = a * np.cos(t), b * np.sin(t)
    return [
        (float(cx + x * np.cos(turn) - y * np.sin(turn)), float(cy + x * np.sin(turn) + y * np.cos(turn)))
        for x, y in zip(xs, ys, strict=True)
    ]


def draw_region(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """The binary region of one primitive: a ``line``, or an area (ellipse or polygon) for the other kinds."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "line":
        draw.line(_polyline(rng, size), fill=255, width=int(rng.integers(1, 5)), joint="curve")
    else:
        draw.polygon(_ellipse(rng, size) if rng.random() < 0.5 else _polygon(rng, size), fill=255)
    return np.asarray(canvas) > 0


def draw_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """A binary shape image for mask models: the union of 1-3 lines and areas, as a bool (size, size) array."""
    shape = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        shape |= draw_region(rng, size, "line" if rng.random() < 0.5 else "spot")
    return shape


def draw_mark(rng: np.random.Generator, image: np.ndarray, kind: str) -> np.ndarray:
    """``image`` (H x W x 3 float in [-1, 1]) with one generic mark of ``kind`` (see ``MARK_KINDS``)."""
    size = image.shape[0]
    region = np.zeros((size, size), dtype=bool)
    while not region.any():
        region = draw_region(rng, size, kind)
    if kind == "patch":
        shift = rng.integers(size // 8, size - size // 8, 2)
        source = np.roll(image, tuple(int(s) for s in shift), axis=(0, 1))[:, ::-1]
        alpha = 1.0
    else:
        source = np.broadcast_to(rng.uniform(-1.0, 1.0, 3).astype(np.float32), image.shape)
        alpha = rng.uniform(0.5, 1.0)
    out = image.copy()
    out[region] = (1 - alpha) * image[region] + alpha * source[region]
    return out


def apply_generic_prior(
    images: torch.Tensor, products: Sequence[str], generator: torch.Generator, *, marks: float, shapes: float
) -> tuple[torch.Tensor, list[str]]:
    """Marks on a share ``marks`` of a batch, binary shapes instead of a share ``shapes``; with the captions.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        products: each image's product, for the captions of unchanged and marked images.
        generator: the step's random source (one draw seeds the numpy drawing).
        marks: probability that an image gets one generic mark.
        shapes: probability that an image is replaced by a binary shape (checked first).

    Returns:
        The new batch and one caption per image (``a photo of <product>[ with a <kind>]`` or ``a mask``).
    """
    if marks == 0 and shapes == 0:
        return images, [generic_prompt(product) for product in products]
    rng = np.random.default_rng(int(torch.randint(0, 1 << 62, (1,), generator=generator)))
    pixels = images.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
    out, captions = [], []
    for image, product in zip(pixels, products, strict=True):
        draw = rng.random()
        if draw < shapes:
            shape = draw_shape(rng, image.shape[0]).astype(np.float32) * 2 - 1
            out.append(np.repeat(shape[..., None], 3, axis=-1))
            captions.append(SHAPE_PROMPT)
        elif draw < shapes + marks:
            kind = MARK_KINDS[int(rng.integers(len(MARK_KINDS)))]
            out.append(draw_mark(rng, image, kind))
            captions.append(f"{generic_prompt(product)} with a {kind}")
        else:
            out.append(image)
            captions.append(generic_prompt(product))
    batch = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return batch.to(images.device, images.dtype), captions
