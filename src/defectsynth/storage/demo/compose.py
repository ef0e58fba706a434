"""Compose a defect onto a normal so that exactly the mask changes, and visibly so."""

from __future__ import annotations

import numpy as np

from defectsynth.storage.demo.lighting import to_uint8

MIN_CHANGE = 16  # grey levels every mask pixel differs from the normal by, in at least one channel


def _visible_change(normal: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-pixel largest absolute channel difference between two uint8 images."""
    return np.abs(candidate.astype(np.int16) - normal.astype(np.int16)).max(axis=-1)


def enforce_change(normal: np.ndarray, appearance: np.ndarray, min_change: int = MIN_CHANGE) -> np.ndarray:
    """Round ``appearance`` to uint8 and push any pixel that barely differs from ``normal`` away from it.

    A weak pixel is offset by ``min_change`` grey levels in the direction the defect already leans,
    or, where that saturates, towards the side with more room; so every pixel ends up changed.
    """
    drawn = to_uint8(appearance)
    weak = _visible_change(normal, drawn) < min_change
    if not weak.any():
        return drawn
    base = normal.astype(np.float32)
    lean = np.sign((appearance - base).mean(axis=-1, keepdims=True))
    roomy = np.where(base.mean(axis=-1, keepdims=True) < 128.0, 1.0, -1.0)
    leaned = to_uint8(base + np.where(lean == 0, roomy, lean) * min_change)
    pushed = np.where(
        (_visible_change(normal, leaned) >= min_change)[..., None],
        leaned,
        to_uint8(base + roomy * min_change),
    )
    return np.where(weak[..., None], pushed, drawn)


def apply_defect(normal: np.ndarray, appearance: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The defective image: ``appearance`` (made visible) inside ``mask``, ``normal`` bit-exact outside."""
    return np.where(mask[..., None], enforce_change(normal, appearance), normal)
