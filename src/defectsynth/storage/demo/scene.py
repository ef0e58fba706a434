"""The rendered normal scene that defect drawers paint on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scene:
    """A normal render: the image, and for objects the silhouette and the object-free background.

    Attributes:
        image: HxWx3 uint8 normal image.
        foreground: HxW bool object silhouette, or None for textures.
        background: HxWx3 uint8 image of the same scene without the object, or None for textures.
    """

    image: np.ndarray
    foreground: np.ndarray | None = None
    background: np.ndarray | None = None

    @property
    def region(self) -> np.ndarray:
        """Where defects may be drawn: the foreground for objects, everywhere for textures."""
        if self.foreground is not None:
            return self.foreground
        return np.ones(self.image.shape[:2], dtype=bool)
