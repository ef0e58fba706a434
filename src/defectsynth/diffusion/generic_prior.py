"""A generic visual prior for the tiny base: marks on images and binary shapes, drawn during pretraining.

Stable Diffusion has seen lines, spots, stains and silhouettes of every kind before anyone fine-tunes it on
a few defects; a tiny base trained from scratch on a handful of normal products has not, so its VAE cannot
encode a thin dark line and its U-Net cannot draw one, whatever embedding a method learns. This module
stands in for that prior with marks that belong to no product and no defect type:

- ``line``: a straight or bent polyline 1-4 px wide in a random colour;
- ``spot``: a filled ellipse or polygon in a random colour, opaque or translucent;
- ``patch``: a texture swap, a polygon of the image replaced by a shifted, flipped copy of the image;
- ``stain``: an area whose colour shifts towards a random colour, strongest at its centre, the texture kept
  underneath (a spot covers the texture, a stain tints it);
- ``mask``: the whole image replaced by a binary shape (union of lines, ellipses and polygons, white on
  black), which is what AnomalyDiffusion's mask model and other mask generators draw.

Each mark comes with its caption (``a photo of wood with a line``, ``a mask``), so the U-Net learns them as
concepts that a method's learned tokens can reach. With ``described`` captions a mark's colour is drawn by
name and the caption says how it looks (``a faint thin black line``, ``a green spot``), as the captions of
Stable Diffusion's photos do (the README measures whether a tiny base learns them). Everything is drawn from a
seeded generator.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import NamedTuple, get_args

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from defectsynth.diffusion.pretrain import generic_prompt
from defectsynth.diffusion.settings import MarkKind

MARK_KINDS: tuple[MarkKind, ...] = get_args(MarkKind)
SHAPE_PROMPT = "a mask"
# Each colour name's (hue degrees, saturation, value) ranges; hue None: any.
COLOUR_RANGES: dict[str, tuple[tuple[float, float] | None, tuple[float, float], tuple[float, float]]] = {
    "black": (None, (0.0, 1.0), (0.0, 0.18)),
    "white": (None, (0.0, 0.12), (0.88, 1.0)),
    "grey": (None, (0.0, 0.12), (0.3, 0.75)),
    "brown": ((18, 38), (0.5, 0.9), (0.25, 0.5)),
    "red": ((-10, 10), (0.55, 1.0), (0.55, 1.0)),
    "orange": ((20, 38), (0.6, 1.0), (0.75, 1.0)),
    "yellow": ((48, 62), (0.5, 1.0), (0.75, 1.0)),
    "green": ((85, 145), (0.45, 1.0), (0.4, 1.0)),
    "cyan": ((172, 192), (0.45, 1.0), (0.6, 1.0)),
    "blue": ((215, 245), (0.5, 1.0), (0.45, 1.0)),
    "purple": ((265, 290), (0.45, 1.0), (0.4, 0.9)),
    "pink": ((315, 340), (0.25, 0.55), (0.85, 1.0)),
}
FAINT_BELOW = 0.6  # opacity under which a described mark is "faint"
STAIN_RIM = 0.5  # a stain's strength at its rim, relative to its centre
THIN_UP_TO = 2  # line width (px) up to which a described line is "thin"; wider is "thick"


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


def draw_region(rng: np.random.Generator, size: int, kind: str, width: int | None = None) -> np.ndarray:
    """The binary region of one primitive: a ``line`` (``width`` px, drawn 1-4 if None), or an area otherwise."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "line":
        points = _polyline(rng, size)
        draw.line(points, fill=255, width=width or int(rng.integers(1, 5)), joint="curve")
    else:
        draw.polygon(_ellipse(rng, size) if rng.random() < 0.5 else _polygon(rng, size), fill=255)
    return np.asarray(canvas) > 0


def draw_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """A binary shape image for mask models: the union of 1-3 lines and areas, as a bool (size, size) array."""
    shape = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        shape |= draw_region(rng, size, "line" if rng.random() < 0.5 else "spot")
    return shape


def stain_strength(region: np.ndarray) -> np.ndarray:
    """Per pixel of ``region``, a stain's relative strength: 1 deep inside, falling to ``STAIN_RIM`` at the rim."""
    radius = max(1.0, 0.1 * float(np.sqrt(region.sum())))
    blurred = Image.fromarray(region.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius))
    inside = np.asarray(blurred, dtype=np.float32) / 255.0
    return np.where(region, STAIN_RIM + (1 - STAIN_RIM) * np.clip(2 * inside - 1, 0.0, 1.0), 0.0)


def draw_colour(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A colour drawn by name (each of ``COLOUR_RANGES`` equally often): RGB in [-1, 1] and the name."""
    name = list(COLOUR_RANGES)[int(rng.integers(len(COLOUR_RANGES)))]
    hue, saturation, value = COLOUR_RANGES[name]
    h = rng.uniform(0, 360) if hue is None else rng.uniform(*hue) % 360
    rgb = colorsys.hsv_to_rgb(h / 360, rng.uniform(*saturation), rng.uniform(*value))
    return np.asarray(rgb, dtype=np.float32) * 2 - 1, name


def draw_mark(
    rng: np.random.Generator, image: np.ndarray, kind: str, *, described: bool = False
) -> tuple[np.ndarray, str, np.ndarray]:
    """``image`` (H x W x 3 float in [-1, 1]) with one mark of ``kind`` (``MARK_KINDS``), its words and region.

    The region is an H x W bool array. The words are the kind alone, or with ``described`` its look: ``faint``
    under ``FAINT_BELOW`` opacity, ``thin``/``thick`` for a line, and the colour's name (a patch keeps the image's
    own colours). A stain adds to the image the step from its in-region mean towards the colour, weighted by
    ``stain_strength``, so the texture stays.
    """
    size = image.shape[0]
    width = int(rng.integers(1, 5)) if described and kind == "line" else None
    region = np.zeros((size, size), dtype=bool)
    while not region.any():
        region = draw_region(rng, size, kind, width)
    words = [kind]
    if kind == "patch":
        shift = rng.integers(size // 8, size - size // 8, 2)
        source = np.roll(image, tuple(int(s) for s in shift), axis=(0, 1))[:, ::-1]
        alpha = 1.0
    elif kind == "stain":
        colour, name = draw_colour(rng) if described else (rng.uniform(-1.0, 1.0, 3).astype(np.float32), "")
        strength = rng.uniform(0.3, 1.0)
        step = strength * stain_strength(region)[..., None] * (colour - image[region].mean(0))
        source, alpha = np.clip(image + step, -1.0, 1.0), 1.0
        if described:
            words = ["faint"] * (strength < FAINT_BELOW) + [name, kind]
    elif described:
        colour, name = draw_colour(rng)
        source = np.broadcast_to(colour, image.shape)
        alpha = rng.uniform(0.3, 1.0)
        thickness = [] if width is None else ["thin" if width <= THIN_UP_TO else "thick"]
        words = ["faint"] * (alpha < FAINT_BELOW) + thickness + [name, kind]
    else:
        source = np.broadcast_to(rng.uniform(-1.0, 1.0, 3).astype(np.float32), image.shape)
        alpha = rng.uniform(0.5, 1.0)
    out = image.copy()
    out[region] = (1 - alpha) * image[region] + alpha * source[region]
    return out, " ".join(words), region


class PriorBatch(NamedTuple):
    """A pretraining batch after the generic prior: images, one caption each, and where each mark was drawn."""

    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]
    marks: torch.Tensor  # (B, 1, H, W) float, 1 inside the image's mark (zeros for unmarked images and shapes)


def apply_generic_prior(
    images: torch.Tensor,
    products: Sequence[str],
    generator: torch.Generator,
    *,
    marks: float,
    shapes: float,
    described: bool = False,
    kinds: Sequence[str] = MARK_KINDS,
) -> PriorBatch:
    """Marks on a share ``marks`` of a batch, binary shapes instead of a share ``shapes``; with captions and regions.

    Args:
        images: (B, 3, H, W) in [-1, 1].
        products: each image's product, for the captions of unchanged and marked images.
        generator: the step's random source (one draw seeds the numpy drawing).
        marks: probability that an image gets one generic mark.
        shapes: probability that an image is replaced by a binary shape (checked first).
        described: captions say how a mark looks, not only its kind (see ``draw_mark``).
        kinds: the mark kinds drawn from, equally often.

    Returns:
        The new batch, one caption per image (``a photo of <product>[ with a <words>]`` or ``a mask``), and the
        marks' regions.
    """
    size = images.shape[-2:]
    if marks == 0 and shapes == 0:
        unmarked = torch.zeros(len(images), 1, *size, device=images.device)
        return PriorBatch(images, [generic_prompt(product) for product in products], unmarked)
    rng = np.random.default_rng(int(torch.randint(0, 1 << 62, (1,), generator=generator)))
    pixels = images.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
    out, captions, regions = [], [], np.zeros((len(pixels), 1, *size), dtype=np.float32)
    for index, (image, product) in enumerate(zip(pixels, products, strict=True)):
        draw = rng.random()
        if draw < shapes:
            shape = draw_shape(rng, image.shape[0]).astype(np.float32) * 2 - 1
            out.append(np.repeat(shape[..., None], 3, axis=-1))
            captions.append(SHAPE_PROMPT)
        elif draw < shapes + marks:
            kind = kinds[int(rng.integers(len(kinds)))]
            marked, words, region = draw_mark(rng, image, kind, described=described)
            regions[index, 0] = region
            out.append(marked)
            captions.append(f"{generic_prompt(product)} with a {words}")
        else:
            out.append(image)
            captions.append(generic_prompt(product))
    batch = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return PriorBatch(batch.to(images.device, images.dtype), captions, torch.from_numpy(regions).to(images.device))
