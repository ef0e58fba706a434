"""Conditioning masks shared by every method: Perlin noise masks and jointly augmented real masks.

The generation job builds each request's conditioning mask with ``conditioning_mask``: mask source
``"perlin"`` thresholds gradient Perlin noise (DRAEM: scale 2^k per axis, rotated, threshold 0.5) on
the request's foreground; ``"real"`` takes a training defect's mask and moves it with a random flip,
rotation, scale and translation (``augment_jointly`` applies the same transform to an image patch, which
is how crop-and-paste moves its cut-outs). Randomness always comes from an explicit generator;
``request_rngs`` derives the mask stream from the request seed alone, so every method given the same
request draws the same conditioning mask.

Example:
    >>> rng = np.random.default_rng(0)
    >>> mask = perlin_mask((64, 64), rng, min_area=16)
    >>> mask.dtype, mask.shape, bool(mask.sum() >= 16)
    (dtype('bool'), (64, 64), True)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from defectsynth.storage.imageio import read_image, read_mask

if TYPE_CHECKING:
    from defectsynth.generators.base import Request

logger = logging.getLogger(__name__)

Shape = tuple[int, int]  # (height, width), numpy order


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


def _as_shape(shape: int | Shape) -> Shape:
    return (shape, shape) if isinstance(shape, int) else (int(shape[0]), int(shape[1]))


def resize_image(image: np.ndarray, shape: int | Shape) -> np.ndarray:
    """Resize an HxWx3 uint8 image to ``shape`` (height, width; an int is square) with bicubic filtering."""
    height, width = _as_shape(shape)
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, shape: int | Shape) -> np.ndarray:
    """Resize a bool mask to ``shape`` with nearest-neighbour sampling, so it stays binary.

    A thin mask that nearest sampling would erase entirely keeps every pixel it touches instead.
    """
    height, width = _as_shape(shape)
    if mask.shape == (height, width):
        return mask.astype(bool)
    pixels = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = np.asarray(pixels.resize((width, height), Image.Resampling.NEAREST)) > 0
    if mask.any() and not resized.any():
        resized = np.asarray(pixels.resize((width, height), Image.Resampling.BOX)) > 0
    return resized


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
    height, width = _as_shape(shape)
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
    shape = _as_shape(shape)
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
    frame = _as_shape(shape if shape is not None else mask.shape)
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
