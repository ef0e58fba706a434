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
