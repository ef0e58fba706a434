"""Small figures logged to MLflow: sample grids with mask overlays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OVERLAY = np.array([255, 0, 0], dtype=np.float32)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the mask tinted red."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * OVERLAY
    return out.round().astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized RGB images into a grid (one list per row; short rows are padded black)."""
    if not rows or not rows[0]:
        msg = "a grid needs at least one image"
        raise ValueError(msg)
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.zeros((len(rows) * (height + pad) + pad, columns * (width + pad) + pad, 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = pad + r * (height + pad), pad + c * (width + pad)
            canvas[y : y + height, x : x + width] = image if image.ndim == 3 else image[..., None]
    return canvas


def sample_grid(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], per_row: int = 8) -> np.ndarray:
    """Pairs of rows: generated images, then the same images with their refined masks overlaid."""
    rows: list[list[np.ndarray]] = []
    for start in range(0, len(images), per_row):
        chunk = list(zip(images[start : start + per_row], masks[start : start + per_row], strict=True))
        rows.append([image for image, _ in chunk])
        rows.append([overlay(image, mask) for image, mask in chunk])
    return grid(rows)


def outline(mask: np.ndarray) -> np.ndarray:
    """The 1-px ring just outside ``mask`` (8-neighbourhood): drawn there, it leaves the mask's pixels untouched."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    padded, grown = np.pad(mask, 1), np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown & ~mask


def zoom(image: np.ndarray, mask: np.ndarray, magnification: tuple[int, int] = (2, 4)) -> tuple[np.ndarray, np.ndarray]:
    """A square crop around the mask, scaled back to the frame's side (nearest), and the mask cropped alike.

    The crop is centred on the mask pixel nearest its centroid (on the defect even when it curves) and spans
    its bounding box with a margin, clamped so the magnification stays within ``magnification``: a thin
    scratch gets wide enough to see, a large blob shows its interior (the whole-frame view shows its extent).
    An empty mask gives the frame's centre at the lowest magnification.
    """
    mask = np.asarray(mask, dtype=bool)
    frame = min(mask.shape)
    low, high = (frame // m for m in magnification)
    points = np.argwhere(mask)
    if len(points):
        centre = points[np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))]
        side = int(np.clip((np.ptp(points, axis=0).max() + 1) * 1.5, high, low))
    else:
        centre, side = np.array(mask.shape) // 2, low
    top, left = (int(np.clip(c - side // 2, 0, n - side)) for c, n in zip(centre, mask.shape, strict=True))
    index = np.arange(frame) * side // frame
    rows, cols = np.ix_(top + index, left + index)
    return image[rows, cols], mask[rows, cols]


def defect_tiles(image: np.ndarray, mask: np.ndarray, alpha: float = 0.8) -> list[np.ndarray]:
    """Two tiles of one defect: the whole frame and a :func:`zoom` on it, each with the mask's outline in red.

    The outline sits just outside the mask, so the defect's own pixels keep their colours; in the zoom it is
    drawn at the tile's scale, a thin line around a magnified defect.
    """
    crop, crop_mask = zoom(image, mask)
    return [overlay(image, outline(mask), alpha), overlay(crop, outline(crop_mask), alpha)]
