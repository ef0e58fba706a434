"""Resizing images and masks to a model's resolution: bicubic for images, nearest (never erasing) for masks."""

from __future__ import annotations

import numpy as np
from PIL import Image

Shape = tuple[int, int]  # (height, width), numpy order


def as_shape(shape: int | Shape) -> Shape:
    """``shape`` as (height, width); an int is a square."""
    return (shape, shape) if isinstance(shape, int) else (int(shape[0]), int(shape[1]))


def resize_image(image: np.ndarray, shape: int | Shape) -> np.ndarray:
    """Resize an HxWx3 uint8 image to ``shape`` (height, width; an int is square) with bicubic filtering."""
    height, width = as_shape(shape)
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, shape: int | Shape) -> np.ndarray:
    """Resize a bool mask to ``shape`` with nearest-neighbour sampling, so it stays binary.

    A thin mask that nearest sampling would erase entirely keeps every pixel it touches instead.
    """
    height, width = as_shape(shape)
    if mask.shape == (height, width):
        return mask.astype(bool)
    pixels = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = np.asarray(pixels.resize((width, height), Image.Resampling.NEAREST)) > 0
    if mask.any() and not resized.any():
        resized = np.asarray(pixels.resize((width, height), Image.Resampling.BOX)) > 0
    return resized
