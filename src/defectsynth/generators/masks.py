"""Conditioning masks shared by every method: Perlin noise masks and jointly augmented real masks.

The generation job builds each request's conditioning mask with ``conditioning_mask``: mask source
``"perlin"`` thresholds gradient Perlin noise (:func:`~defectsynth.core.perlin_noise.perlin_mask`; DRAEM:
scale 2^k per axis, rotated, threshold 0.5) on the request's foreground; ``"real"`` takes a training
defect's mask and moves it with a random flip, rotation, scale and translation (``augment_jointly``
applies the same transform to an image patch, which is how crop-and-paste moves its cut-outs).
Randomness always comes from an explicit generator; ``request_rngs`` derives the mask stream from the
request seed alone, so every method given the same request draws the same conditioning mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from defectsynth.core.perlin_noise import perlin_mask
from defectsynth.core.resize import Shape, as_shape, resize_image, resize_mask
from defectsynth.storage.imageio import read_image, read_mask

if TYPE_CHECKING:
    from defectsynth.generators.base import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentOptions:
    """Joint geometric augmentation of a mask (and its image patch) before it is placed in a frame."""

    flip: bool = True  # random horizontal and vertical flips
    rotate90: bool = True  # random multiple of 90 degrees
    max_angle: float = 15.0  # then a small rotation in [-max_angle, max_angle] degrees
    scale_range: tuple[float, float] = (0.8, 1.2)
    min_inside: float = 0.9  # with a foreground: share of the mask that should land on it
    max_attempts: int = 20  # placements tried to reach min_inside; the best one is kept


@dataclass(frozen=True)
class MaskOptions:
    """How ``conditioning_mask`` draws Perlin masks and augments real ones."""

    threshold: float = 0.5  # Perlin noise (about [-1, 1]) above this is the mask, as in DRAEM
    scale_exponents: tuple[int, int] = (0, 6)  # Perlin cells per axis 2^k, k in [low, high)
    min_area: int = 16  # pixels a Perlin mask needs after restriction to the foreground
    max_attempts: int = 50  # fresh noise fields tried before giving up
    augment: AugmentOptions = field(default_factory=AugmentOptions)


def request_rngs(request: Request) -> tuple[np.random.Generator, np.random.Generator]:
    """(mask stream, sample stream), both spawned from ``np.random.default_rng(request.seed)``.

    The mask stream depends on nothing but the seed, so two methods given the same request draw the
    same conditioning mask; what a method draws afterwards never shifts it.
    """
    mask_rng, sample_rng = np.random.default_rng(request.seed).spawn(2)
    return mask_rng, sample_rng


def _bbox_crop(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _affine(
    image: np.ndarray | None, mask: np.ndarray, *, angle: float, scale: float
) -> tuple[np.ndarray | None, np.ndarray]:
    """Scale then rotate a patch and its mask by the same geometry (image bicubic, mask bilinear > 0.5).

    The result is never empty for a non-empty mask.
    """
    height, width = mask.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    alpha = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    coverage = np.asarray(alpha.rotate(angle, Image.Resampling.BILINEAR, expand=True))
    moved = coverage > 127
    if not moved.any():  # a mask thinner than a pixel after scaling keeps every pixel it touches
        moved = coverage > 0
    if image is None:
        return None, moved
    pixels = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(pixels.rotate(angle, Image.Resampling.BICUBIC, expand=True)), moved


def _transform(
    image: np.ndarray | None, mask: np.ndarray, rng: np.random.Generator, shape: Shape, options: AugmentOptions
) -> tuple[np.ndarray | None, np.ndarray]:
    """Crop to the mask, flip, rotate, scale, re-crop, and shrink to fit ``shape`` if needed."""
    # Every draw is made whatever the options, so options never shift the stream that follows.
    flips = rng.random(2) < 0.5
    quarter_turns = int(rng.integers(4))
    angle = float(rng.uniform(-1.0, 1.0)) * options.max_angle
    scale = float(rng.uniform(*options.scale_range))
    rows, cols = _bbox_crop(mask)
    mask = mask[rows, cols]
    image = None if image is None else image[rows, cols]
    axes = [axis for axis, flip in zip((1, 0), flips, strict=True) if options.flip and flip]
    turns = quarter_turns if options.rotate90 else 0
    mask = np.rot90(np.flip(mask, axis=axes) if axes else mask, turns)
    if image is not None:
        image = np.ascontiguousarray(np.rot90(np.flip(image, axis=axes) if axes else image, turns))
    moved_image, moved = _affine(image, np.ascontiguousarray(mask), angle=angle, scale=scale)
    if moved.any():
        rows, cols = _bbox_crop(moved)
        image, mask = (None if moved_image is None else moved_image[rows, cols]), moved[rows, cols]
    fit = min(1.0, shape[0] / mask.shape[0], shape[1] / mask.shape[1])
    if fit < 1.0:
        image, mask = _affine(image, np.ascontiguousarray(mask), angle=0.0, scale=fit * 0.999)
        rows, cols = _bbox_crop(mask)
        image, mask = (None if image is None else image[rows, cols]), mask[rows, cols]
    return image, mask.astype(bool)


def _place(
    mask: np.ndarray, shape: Shape, rng: np.random.Generator, foreground: np.ndarray | None, options: AugmentOptions
) -> tuple[int, int]:
    """Top-left corner for a patch mask inside the frame; on a foreground, aim at a random foreground pixel."""
    height, width = mask.shape
    free_y, free_x = shape[0] - height, shape[1] - width
    targets = None if foreground is None else np.argwhere(foreground)
    if targets is None or len(targets) == 0:
        return int(rng.integers(free_y + 1)), int(rng.integers(free_x + 1))
    area = max(int(mask.sum()), 1)
    best, best_inside = (0, 0), -1.0
    for _ in range(options.max_attempts):
        cy, cx = targets[rng.integers(len(targets))]
        y, x = int(np.clip(cy - height // 2, 0, free_y)), int(np.clip(cx - width // 2, 0, free_x))
        inside = float(foreground[y : y + height, x : x + width][mask].sum()) / area
        if inside > best_inside:
            best, best_inside = (y, x), inside
        if inside >= options.min_inside:
            break
    if best_inside < options.min_inside:
        logger.debug(
            "placed a mask with %.0f%% on the foreground (wanted %.0f%%)", 100 * best_inside, 100 * options.min_inside
        )
    return best


def augment_jointly(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    shape: int | Shape | None = None,
    foreground: np.ndarray | None = None,
    options: AugmentOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Move a mask and its image patch together into a frame of ``shape`` (default: the mask's shape).

    Both are cropped to the mask's bounding box, flipped, turned by a multiple of 90 degrees, rotated by
    a small angle, scaled, and translated so the mask lies wholly inside the frame (and, given a
    ``foreground``, mostly on it). Returns (image, mask) of the frame size; the image is zero outside
    the moved patch and is meaningful only where the returned mask is set.
    """
    if image.shape[:2] != mask.shape:
        msg = f"image of shape {image.shape} and mask of shape {mask.shape} must have the same height and width"
        raise ValueError(msg)
    moved_image, moved_mask = _move(image, mask, rng, shape, foreground, options)
    assert moved_image is not None
    return moved_image, moved_mask


def augment_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    shape: int | Shape | None = None,
    foreground: np.ndarray | None = None,
    options: AugmentOptions | None = None,
) -> np.ndarray:
    """``augment_jointly`` for a mask alone: the same random transform, no image carried."""
    return _move(None, mask, rng, shape, foreground, options)[1]


def _move(
    image: np.ndarray | None,
    mask: np.ndarray,
    rng: np.random.Generator,
    shape: int | Shape | None,
    foreground: np.ndarray | None,
    options: AugmentOptions | None,
) -> tuple[np.ndarray | None, np.ndarray]:
    frame = as_shape(shape if shape is not None else mask.shape)
    options = options or AugmentOptions()
    if not mask.any():
        msg = "cannot augment an empty mask"
        raise ValueError(msg)
    if foreground is not None and foreground.shape != frame:
        msg = f"foreground of shape {foreground.shape} does not match the frame {frame}"
        raise ValueError(msg)
    patch, patch_mask = _transform(image, mask.astype(bool), rng, frame, options)
    y, x = _place(patch_mask, frame, rng, foreground, options)
    height, width = patch_mask.shape
    out_mask = np.zeros(frame, dtype=bool)
    out_mask[y : y + height, x : x + width] = patch_mask
    if patch is None:
        return None, out_mask
    out_image = np.zeros((*frame, *patch.shape[2:]), dtype=patch.dtype)
    out_image[y : y + height, x : x + width] = patch
    return out_image, out_mask


def load_source(request: Request) -> np.ndarray:
    """The request's source normal as HxWx3 uint8 at ``request.resolution``."""
    return resize_image(read_image(Path(request.source_path)), request.resolution)


def load_foreground(request: Request) -> np.ndarray | None:
    """The request's foreground at ``request.resolution``, or None when it has none."""
    if request.foreground_path is None:
        return None
    return resize_mask(read_mask(Path(request.foreground_path)), request.resolution)


def load_real_mask(request: Request) -> np.ndarray:
    """Union of the request's mask files (a training defect's mask) at ``request.resolution``."""
    if not request.mask_paths:
        where = f"{request.product}/{request.defect_type}#{request.sample_index}"
        msg = f"request {where}: mask source 'real' needs mask_paths (a training defect's mask files)"
        raise ValueError(msg)
    masks = [read_mask(Path(path), labels_allowed=True) for path in request.mask_paths]
    merged = np.logical_or.reduce([resize_mask(mask, request.resolution) for mask in masks])
    if not merged.any():
        msg = f"the masks of {request.mask_image or request.mask_paths[0]!r} are empty"
        raise ValueError(msg)
    return merged


def conditioning_mask(request: Request, rng: np.random.Generator, options: MaskOptions | None = None) -> np.ndarray:
    """The request's conditioning mask, a bool array of resolution x resolution.

    ``"perlin"``: ``perlin_mask`` on the request's foreground (the whole frame when it has none);
    ``"real"``: the training defect's mask from ``request.mask_paths``, jointly augmented and placed
    mostly on the foreground; ``"learned"`` raises ValueError, since only a method with a mask model can
    draw one. Pass the mask stream of ``request_rngs`` so every method draws the same mask.
    """
    options = options or MaskOptions()
    foreground = load_foreground(request)
    if request.mask_source == "perlin":
        return perlin_mask(
            request.resolution,
            rng,
            threshold=options.threshold,
            foreground=foreground,
            min_area=options.min_area,
            scale_exponents=options.scale_exponents,
            max_attempts=options.max_attempts,
        )
    if request.mask_source == "real":
        return augment_mask(load_real_mask(request), rng, foreground=foreground, options=options.augment)
    if request.mask_source == "learned":
        msg = "mask source 'learned' needs a method with its own mask model; this one has none (use 'real' or 'perlin')"
        raise ValueError(msg)
    msg = f"unknown mask source {request.mask_source!r}; expected 'perlin', 'real' or 'learned'"
    raise ValueError(msg)
