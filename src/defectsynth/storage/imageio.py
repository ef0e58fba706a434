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


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file with an image suffix (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode an image, so truncated files fail here and not later."""
    if not path.is_file():
        raise DatasetError(path, "file is missing")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"unreadable or truncated image ({err})") from err


def read_image(path: Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB (grey and RGBA images are converted)."""
    return np.asarray(_open_decoded(path).convert("RGB"))


def read_mask(path: Path, *, labels_allowed: bool = False) -> np.ndarray:
    """Read a mask as an HxW bool array.

    A binary mask holds 0 and at most one other value (MVTec: 255; LOCO: a per-defect value).
    With ``labels_allowed`` (VisA's masks carry several region labels) any non-zero value counts.
    """
    image = _open_decoded(path)
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


def merge_masks(paths: Sequence[Path], size: tuple[int, int], *, labels_allowed: bool = False) -> np.ndarray:
    """Union of several mask files, each checked to be binary and of ``size`` (width, height)."""
    merged = np.zeros((size[1], size[0]), dtype=bool)
    for path in paths:
        mask = read_mask(path, labels_allowed=labels_allowed)
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


def load_item(record: ImageRecord) -> ImageItem:
    """Load and check one record: image decodes, masks are binary, sized like it, and non-empty."""
    image = read_image(record.path)
    size = (image.shape[1], image.shape[0])
    gt_mask = merge_masks(record.mask_paths, size, labels_allowed=record.mask_is_label_map)
    if record.label == 1 and not gt_mask.any():
        where = record.mask_paths[0] if record.mask_paths else record.path
        raise DatasetError(where, f"mask of defect image {record.image_id!r} is empty")
    foreground = None
    if record.foreground_path is not None:
        foreground = merge_masks((record.foreground_path,), size)
    return ImageItem(
        image=image,
        gt_mask=gt_mask,
        gt_label=record.label,
        defect_type=record.defect_type,
        image_id=record.image_id,
        image_path=record.path,
        foreground=foreground,
    )
