"""Reading images and masks with validation: every failure names the file and the problem."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.records import ImageRecord

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 64 * 1024 * 1024  # default limit per image (data.max_pixels): 8192 x 8192


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file with an image suffix (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _open_decoded(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, so truncated files fail here and not later.

    The pixel count is checked from the header first: an image past ``max_pixels`` is refused before
    any of it is decoded (a decompression bomb never reaches memory).
    """
    if not path.is_file():
        raise DatasetError(path, "file is missing")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                problem = (
                    f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} (data.max_pixels)"
                )
                raise DatasetError(path, f"{problem}; refused before decoding")
            image.load()
            return image.copy()
    except DatasetError:
        raise
    except Image.DecompressionBombError as err:
        raise DatasetError(path, f"refused before decoding: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"unreadable or truncated image ({err})") from err


def _as_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB: 16-bit grey scaled to 8 bits (Pillow's convert would clip it), alpha dropped."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint32)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise DatasetError(path, f"{kind} image (mode {image.mode}): save it as an 8- or 16-bit image")
    return np.asarray(image.convert("RGB"))


def read_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB (grey, 16-bit grey and RGBA images are converted; see ``_as_rgb``)."""
    return _as_rgb(_open_decoded(path, max_pixels), path)


def read_mask(path: Path, *, labels_allowed: bool = False, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a mask as an HxW bool array.

    A binary mask holds 0 and at most one other value (MVTec: 255; LOCO: a per-defect value).
    With ``labels_allowed`` (VisA's masks carry several region labels) any non-zero value counts.
    """
    image = _open_decoded(path, max_pixels)
    if image.mode not in ("1", "L", "P", "I", "I;16", "RGB", "RGBA", "LA"):
        raise DatasetError(path, f"unsupported mask mode {image.mode!r}")
    values = np.asarray(image.convert("L") if image.mode in ("1", "P", "RGB", "RGBA", "LA") else image)
    if image.mode in ("RGB", "RGBA"):
        channels = np.asarray(image.convert("RGB"))
        if not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 1], channels[..., 2])
        ):
            raise DatasetError(path, "mask has colour: expected a single-channel binary mask")
    nonzero = np.unique(values[values != 0])
    if nonzero.size > 1 and not labels_allowed:
        shown = ", ".join(str(v) for v in nonzero[:6])
        raise DatasetError(path, f"mask is not binary: non-zero values {shown}{'...' if nonzero.size > 6 else ''}")
    return values != 0


def merge_masks(
    paths: Sequence[Path], size: tuple[int, int], *, labels_allowed: bool = False, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Union of several mask files, each checked to be binary and of ``size`` (width, height)."""
    merged = np.zeros((size[1], size[0]), dtype=bool)
    for path in paths:
        mask = read_mask(path, labels_allowed=labels_allowed, max_pixels=max_pixels)
        if (mask.shape[1], mask.shape[0]) != size:
            raise DatasetError(
                path, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {size[0]}x{size[1]}"
            )
        merged |= mask
    return merged


@dataclass(frozen=True)
class ImageItem:
    """One loaded image with its label and masks, in the field names anomalib uses."""

    image: np.ndarray  # HxWx3 uint8
    gt_mask: np.ndarray  # HxW bool; all False for normal images
    gt_label: int
    defect_type: str
    image_id: str
    image_path: Path
    foreground: np.ndarray | None = None  # HxW bool where the product is, when the dataset has it


def load_item(record: ImageRecord, *, max_pixels: int = MAX_PIXELS) -> ImageItem:
    """Load and check one record: image decodes, masks are binary, sized like it, and non-empty."""
    image = read_image(record.path, max_pixels=max_pixels)
    size = (image.shape[1], image.shape[0])
    gt_mask = merge_masks(record.mask_paths, size, labels_allowed=record.mask_is_label_map, max_pixels=max_pixels)
    if record.label == 1 and not gt_mask.any():
        where = record.mask_paths[0] if record.mask_paths else record.path
        raise DatasetError(where, f"mask of defect image {record.image_id!r} is empty")
    foreground = None
    if record.foreground_path is not None:
        foreground = merge_masks((record.foreground_path,), size, max_pixels=max_pixels)
    return ImageItem(
        image=image,
        gt_mask=gt_mask,
        gt_label=record.label,
        defect_type=record.defect_type,
        image_id=record.image_id,
        image_path=record.path,
        foreground=foreground,
    )
