"""Training pairs of the diffusion generators: the real defects, their masks, and augmentations that keep them.

Shared by every method that fine-tunes on the split's generator-training defects (AnomalyDiffusion, SeaS, CADiff, BADG):
loading them at the model's resolution, augmenting image and mask together with the defect kept in the
frame, turning images into a model batch and masks into latent-grid masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field

from defectsynth.core.resize import resize_image, resize_mask
from defectsynth.storage.imageio import load_item
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import ProductSplit


def rotation_field() -> Any:
    """The ``rotation`` setting of a method that augments its training anomalies: on by default."""
    return Field(
        True,
        description="flip and turn the training anomalies and masks by quarters (AnomalyDiffusion's and CADiff's "
        "rotation augmentation); off for products whose orientation is part of them (wood grain, upright pills)",
    )


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    crop_range: tuple[float, float],
    *,
    orient: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop (keeping the defect inside), flip and turn an image and its mask together; back to the input size.

    The crop's side is drawn from ``crop_range`` of the image side, grown to the mask's bounding box when that
    is larger, and placed at random among the positions that contain the whole box (translation). Without
    ``orient`` the crop alone: no flips or quarter turns, for products whose orientation is part of them.
    """
    side = image.shape[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = int(round(side * rng.uniform(*crop_range)))
    crop = min(side, max(crop, bottom - top, right - left))
    y = int(rng.integers(max(0, bottom - crop), min(top, side - crop) + 1))
    x = int(rng.integers(max(0, right - crop), min(left, side - crop) + 1))
    image, mask = image[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]
    image = resize_image(image, side)
    mask = resize_mask(mask, side)
    if not orient:
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)
    image, mask = random_orientation([image, mask], rng)
    return image, mask


def augmented_batch(
    defects: TrainingDefects,
    picks: Sequence[int],
    rng: np.random.Generator,
    crop_range: tuple[float, float],
    orient: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The picked training defects through ``augment_pair``: images (B, 3, H, W) in [-1, 1], masks (B, 1, H, W) 0/1."""
    pairs = [augment_pair(defects.images[i], defects.masks[i], rng, crop_range, orient=orient) for i in picks]
    masks = torch.from_numpy(np.stack([mask for _, mask in pairs])[:, None].astype(np.float32))
    return to_model_range([image for image, _ in pairs]), masks


def random_orientation(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flips (left-right, up-down) and quarter turn applied to every array (H x W [x C])."""
    flip_lr, flip_ud, turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(4))
    out = []
    for array in arrays:
        array = array[:, ::-1] if flip_lr else array
        array = array[::-1] if flip_ud else array
        out.append(np.ascontiguousarray(np.rot90(array, turns)))
    return out


DefectKey = tuple[str, str]  # (product, defect type): what one e_a and one e_m stand for


@dataclass(frozen=True)
class TrainingDefects:
    """The generator-training defects of one or more products at the model's resolution."""

    images: list[np.ndarray]  # H x W x 3 uint8
    masks: list[np.ndarray]  # H x W bool
    keys: list[DefectKey]


def load_training_defects(products: Sequence[tuple[ProductData, ProductSplit]], resolution: int) -> TrainingDefects:
    """Every generator-training defect of the products (never a held-out one) and its mask, resized."""
    images, masks, keys = [], [], []
    for data, split in products:
        if not any(split.generator_train.values()):
            msg = f"{data.name}: no generator-training defects in the split"
            raise ValueError(msg)
        for defect_type, ids in sorted(split.generator_train.items()):
            for image_id in ids:
                item = load_item(data.record(image_id))
                images.append(resize_image(item.image, resolution))
                masks.append(resize_mask(item.gt_mask, resolution))
                keys.append((data.name, defect_type))
    return TrainingDefects(images, masks, keys)


def latent_mask(masks: torch.Tensor, latent_side: int) -> torch.Tensor:
    """Image-resolution masks (B, 1, H, W) to the latent grid, a cell set when any of its pixels is (thin defects)."""
    return F.adaptive_max_pool2d(masks.float(), latent_side)


def defect_loss_weights(masks: torch.Tensor, latent_side: int, weight: float) -> torch.Tensor | None:
    """Per latent cell, 1 + ``weight`` on the mask's cells (None at 0): a short fit's noise loss leaning on the defect.

    Ours, for CPU fits of a few hundred steps, where a defect of a few percent of the image barely moves the
    whole-image loss.
    """
    if not weight:
        return None
    return 1 + weight * latent_mask(masks, latent_side)


def to_model_range(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 images to a (B, 3, H, W) float batch in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float()
    return batch / 127.5 - 1.0
