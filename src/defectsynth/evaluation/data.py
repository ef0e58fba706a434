"""Real images for detectors: a split's ids loaded at the run's resolution as tensors.

Detectors train on real normals plus streamed synthetic pairs, choose checkpoints on the
validation ids and are scored on the test ids; this module only loads what it is asked for, so the
job decides (and a test checks) which ids each phase ever reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from defectsynth.core.resize import resize_image, resize_mask
from defectsynth.storage.imageio import ImageItem, load_item
from defectsynth.storage.records import NORMAL, ProductData


@dataclass(frozen=True)
class RealImages:
    """Images of one product as tensors, with their ground truth."""

    image_ids: list[str]
    images: torch.Tensor  # N x 3 x H x W float in [0, 1]
    masks: torch.Tensor  # N x 1 x H x W float in {0, 1}
    labels: np.ndarray  # N int, 0 normal / 1 anomalous
    defect_types: list[str]
    foregrounds: torch.Tensor | None = None  # N x 1 x H x W float in {0, 1}; None when no image has one

    def __len__(self) -> int:
        return len(self.image_ids)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W float in [0, 1] (clamped) -> B x H x W x 3 uint8, the inverse of ``to_tensor``."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def load_real(product: ProductData, image_ids: Sequence[str], resolution: int) -> RealImages:
    """Load the given ids of a product, resized to ``resolution`` (masks nearest-neighbour)."""
    items = [load_item(product.record(image_id)) for image_id in image_ids]
    images = [to_tensor(resize_image(item.image, resolution)) for item in items]
    masks = [torch.from_numpy(resize_mask(item.gt_mask, resolution)).float()[None] for item in items]
    empty = torch.zeros(0, 3, resolution, resolution)
    return RealImages(
        foregrounds=_foregrounds(items, resolution),
        image_ids=list(image_ids),
        images=torch.stack(images) if images else empty,
        masks=torch.stack(masks) if masks else empty[:, :1],
        labels=np.array([item.gt_label for item in items], dtype=np.int64),
        defect_types=[item.defect_type for item in items],
    )


def with_normals(real: RealImages, image_ids: Sequence[str], images: torch.Tensor) -> RealImages:
    """``real`` followed by more normal ``images`` (N x 3 x H x W in [0, 1]): empty masks, whole-image foregrounds."""
    if images.shape[1:] != real.images.shape[1:]:
        msg = f"normals shaped {tuple(images.shape[1:])} cannot join images shaped {tuple(real.images.shape[1:])}"
        raise ValueError(msg)
    count, side = len(images), images.shape[-1]
    foregrounds = real.foregrounds
    if foregrounds is not None:
        foregrounds = torch.cat([foregrounds, torch.ones(count, 1, side, side)])
    return RealImages(
        image_ids=[*real.image_ids, *image_ids],
        images=torch.cat([real.images, images]),
        masks=torch.cat([real.masks, torch.zeros(count, 1, side, side)]),
        labels=np.concatenate([real.labels, np.zeros(count, np.int64)]),
        defect_types=[*real.defect_types, *[NORMAL] * count],
        foregrounds=foregrounds,
    )


def _foregrounds(items: Sequence[ImageItem], resolution: int) -> torch.Tensor | None:
    """The items' foreground masks; an item without one counts as all foreground (textures)."""
    if not any(item.foreground is not None for item in items):
        return None
    full = np.ones((resolution, resolution), dtype=bool)
    masks = [full if item.foreground is None else resize_mask(item.foreground, resolution) for item in items]
    return torch.from_numpy(np.stack(masks)).float()[:, None]


def batches(real: RealImages, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, masks) in order, ``size`` at a time."""
    for start in range(0, len(real), size):
        yield real.images[start : start + size], real.masks[start : start + size]
