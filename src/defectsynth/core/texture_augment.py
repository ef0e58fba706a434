"""DRAEM's texture augmentation: three random colour operations, then a random flip and turn."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


# DRAEM's colour augmenters: three distinct ones are applied to every texture.
def _gamma(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    gamma = float(rng.uniform(0.5, 2.0))
    return image.point([round(255.0 * (value / 255.0) ** gamma) for value in range(256)] * 3)


def _brightness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    factor, offset = float(rng.uniform(0.8, 1.2)), float(rng.uniform(-30.0, 30.0))
    return Image.fromarray(np.clip(np.asarray(image) * factor + offset, 0, 255).astype(np.uint8))


def _sharpness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Sharpness(image).enhance(float(rng.uniform(0.0, 2.0)))


def _hue_saturation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-36, 37))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


def _solarize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.solarize(image, int(rng.integers(32, 129)))


def _posterize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.posterize(image, int(rng.integers(2, 5)))


def _invert(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.invert(image)


def _autocontrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.equalize(image)


COLOUR_OPS: tuple[Callable[[Image.Image, np.random.Generator], Image.Image], ...] = (
    _gamma,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, *, shift: bool) -> np.ndarray:
    """Three distinct random colour operations, then a random flip and quarter turn (and roll if ``shift``).

    ``shift`` rolls the texture by a random offset, so a self texture shows another region of the image.
    """
    image = Image.fromarray(texture)
    for index in rng.choice(len(COLOUR_OPS), size=3, replace=False):
        image = COLOUR_OPS[int(index)](image, rng)
    pixels = np.asarray(image)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    pixels = np.rot90(pixels, int(rng.integers(4)))
    if shift:
        offsets = (int(rng.integers(pixels.shape[0])), int(rng.integers(pixels.shape[1])))
        pixels = np.roll(pixels, offsets, axis=(0, 1))
    return np.ascontiguousarray(pixels)
