"""Fidelity of generated defects to the real defects of their type: per-sample features, per-type distances.

Each defect (real or generated) gets mask-shape features (:func:`shape_features`) and in-mask appearance
features against a ring around the mask (:func:`appearance_features`); :func:`fidelity_distances` compares a
type's generated and real values feature by feature with the 1-D Wasserstein distance over the product's
spread of real values. Definitions, and why this form with so few real references: ``docs/quality_tier.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, stats

SHAPE_FEATURES = ("log_area", "mean_width", "log_elongation", "log_components", "foreground_share", "centre_offset")
APPEARANCE_FEATURES = (
    "delta_red", "delta_green", "delta_blue", "luminance_contrast", "texture", "edge_sharpness",
)  # fmt: skip
FLOORS = {
    "log_area": 0.1,
    "mean_width": 0.25,  # px
    "log_elongation": 0.1,
    "log_components": math.log(2.0),  # one piece vs two
    "foreground_share": 0.1,
    "centre_offset": 0.1,
    "delta_red": 2.0,  # grey levels
    "delta_green": 2.0,
    "delta_blue": 2.0,
    "luminance_contrast": 2.0,
    "texture": 0.1,
    "edge_sharpness": 0.1,
}
RING = 3  # px of surroundings the appearance is compared with
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
SQUARE = np.ones((3, 3), dtype=bool)  # 8-neighbourhood
PIXEL_SPREAD = 1.0 / 12.0  # variance of a uniform unit interval: a pixel's own second moment per axis


def _bool_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """An ``H x W`` mask as bool; anything else is refused."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        msg = f"{name} must be H x W, got shape {mask.shape}"
        raise ValueError(msg)
    return mask.astype(bool, copy=False)


def _region(foreground: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The foreground as bool, or the whole frame when there is none (textures) or it is empty."""
    if foreground is None:
        return np.ones(shape, dtype=bool)
    region = _bool_mask(foreground, "foreground")
    if region.shape != shape:
        msg = f"foreground {region.shape} does not match the mask {shape}"
        raise ValueError(msg)
    return region if region.any() else np.ones(shape, dtype=bool)


def _perimeter(mask: np.ndarray) -> int:
    """Pixel edges between the mask and the rest, the frame border included."""
    padded = np.pad(mask, 1)
    return int((padded[1:] != padded[:-1]).sum() + (padded[:, 1:] != padded[:, :-1]).sum())


def _moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (y, x) and the 2x2 covariance of the pixel centres, plus a pixel's own spread."""
    points = np.stack(np.nonzero(mask)).astype(np.float64)
    centre = points.mean(axis=1)
    offsets = points - centre[:, None]
    return centre, offsets @ offsets.T / points.shape[1] + PIXEL_SPREAD * np.eye(2)


def _centre_and_radius(region: np.ndarray) -> tuple[np.ndarray, float]:
    """Centroid (y, x) of a region and its equivalent radius ``sqrt(2 tr cov)``, from its row and column sums."""
    weights = (region.sum(axis=1), region.sum(axis=0))
    count = float(weights[0].sum())
    centre, variance = np.zeros(2), 2 * PIXEL_SPREAD
    for axis, counts in enumerate(weights):
        position = np.arange(counts.size, dtype=np.float64)
        centre[axis] = counts @ position / count
        variance += counts @ (position - centre[axis]) ** 2 / count
    return centre, math.sqrt(2.0 * variance)


def shape_features(mask: np.ndarray, foreground: np.ndarray | None = None) -> dict[str, float] | None:
    """The mask-shape features of one defect (docs/quality_tier.md); None for an empty mask."""
    mask = _bool_mask(mask)
    area = int(mask.sum())
    if area == 0:
        return None
    region = _region(foreground, mask.shape)
    window = _window(mask, 1)
    piece = mask[window]
    centre, covariance = _moments(piece)
    centre += (window[0].start, window[1].start)
    low, high = np.linalg.eigvalsh(covariance)
    region_centre, radius = _centre_and_radius(region)
    _, components = ndimage.label(piece, structure=SQUARE)
    return {
        "log_area": math.log(area / mask.size),
        "mean_width": 2.0 * area / _perimeter(piece),
        "log_elongation": 0.5 * math.log(high / low),
        "log_components": math.log(components),
        "foreground_share": int((mask & region).sum()) / area,
        "centre_offset": float(np.linalg.norm(centre - region_centre)) / radius,
    }


def luminance(image: np.ndarray) -> np.ndarray:
    """``H x W x 3`` RGB (0-255) -> ``H x W`` float64 luminance (BT.601 weights)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        msg = f"image must be H x W x 3 RGB, got shape {image.shape}"
        raise ValueError(msg)
    return image.astype(np.float64) @ LUMA


def _log_ratio(a: float, b: float) -> float:
    """``ln((a + 1) / (b + 1))`` for non-negative a and b."""
    return math.log((a + 1.0) / (b + 1.0))


def _window(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The mask's bounding box grown by ``margin`` px, clipped to the frame (a non-empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, height)),
        slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, width)),
    )


def appearance_features(image: np.ndarray, mask: np.ndarray, ring: int = RING) -> dict[str, float] | None:
    """The in-mask appearance of one defect relative to a ``ring``-px band around it (docs/quality_tier.md).

    Returns:
        The features; None when the mask is empty or leaves no ring (it covers the frame).
    """
    mask, image = _bool_mask(mask), np.asarray(image)
    if image.shape[:2] != mask.shape:
        msg = f"image {image.shape[:2]} and mask {mask.shape} differ in size"
        raise ValueError(msg)
    if ring < 1:
        msg = f"ring must be at least 1 px, got {ring}"
        raise ValueError(msg)
    if not mask.any():
        luminance(image)  # a malformed image is an error even with an empty mask
        return None
    window = _window(mask, ring + 2)  # every pixel the features read, and the neighbours of their gradients
    mask, pixels = mask[window], image[window].astype(np.float64)
    luma = luminance(pixels)
    around = ndimage.binary_dilation(mask, SQUARE, iterations=ring) & ~mask
    if not around.any():
        return None
    band = ndimage.binary_dilation(mask, SQUARE) & ~mask
    far = around & ~band if (around & ~band).any() else around
    edge = mask & ~ndimage.binary_erosion(mask, SQUARE, border_value=1)
    edge = edge if edge.any() else mask
    gradient = np.hypot(*np.gradient(luma))
    inside, outside = pixels[mask].mean(axis=0), pixels[around].mean(axis=0)
    return {
        "delta_red": float(inside[0] - outside[0]),
        "delta_green": float(inside[1] - outside[1]),
        "delta_blue": float(inside[2] - outside[2]),
        "luminance_contrast": float(luma[mask].mean() - luma[around].mean()),
        "texture": _log_ratio(float(luma[mask].std()), float(luma[around].std())),
        "edge_sharpness": _log_ratio(float(gradient[edge].mean()), float(gradient[far].mean())),
    }


@dataclass
class DefectFeatures:
    """Feature values of a set of defects, by defect type and feature name (undefined features are left out)."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, defect_type: str, image: np.ndarray, mask: np.ndarray, foreground: np.ndarray | None = None) -> None:
        """Measure one defect: ``H x W x 3`` image (0-255), ``H x W`` mask, the product's foreground or None."""
        shape, appearance = shape_features(mask, foreground), appearance_features(image, mask)
        row = self.values.setdefault(defect_type, {})
        for name, value in {**(shape or {}), **(appearance or {})}.items():
            row.setdefault(name, []).append(value)

    @classmethod
    def of_defects(
        cls, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], defect_types: Sequence[str]
    ) -> DefectFeatures:
        """The features of defects given as parallel sequences (images 0-255, masks, their types), no foreground."""
        features = cls()
        for image, mask, defect_type in zip(images, masks, defect_types, strict=True):
            features.add(defect_type, image, mask)
        return features

    def of(self, defect_type: str, feature: str) -> np.ndarray:
        """The values of one feature for one type (empty if none)."""
        return np.asarray(self.values.get(defect_type, {}).get(feature, []), dtype=np.float64)

    def pooled(self, feature: str) -> np.ndarray:
        """The values of one feature over every type."""
        return np.concatenate([self.of(defect_type, feature) for defect_type in self.values] or [np.zeros(0)])


def feature_scales(real: DefectFeatures) -> dict[str, float]:
    """Per feature, the std of its values over every real defect of the product, floored by ``FLOORS``."""
    scales = {}
    for name, floor in FLOORS.items():
        values = real.pooled(name)
        scales[name] = max(float(values.std()) if values.size else 0.0, floor)
    return scales


def group_distance(
    generated: DefectFeatures,
    real: DefectFeatures,
    defect_type: str,
    features: tuple[str, ...],
    scales: dict[str, float],
) -> float | None:
    """Mean over ``features`` of ``W1(generated, real) / scale`` for one type; None if no feature has both sides."""
    distances = []
    for name in features:
        ours, theirs = generated.of(defect_type, name), real.of(defect_type, name)
        if ours.size and theirs.size:
            distances.append(stats.wasserstein_distance(ours, theirs) / scales[name])
    return float(np.mean(distances)) if distances else None


def fidelity_distances(generated: DefectFeatures, real: DefectFeatures) -> dict[str, float]:
    """``mask_shape_distance`` and ``appearance_distance``, overall and ``.<type>`` (docs/quality_tier.md).

    Types with no generated or no real defect are left out, as is an overall key with no type measured.
    """
    scales = feature_scales(real)
    metrics: dict[str, float] = {}
    for key, features in (("mask_shape_distance", SHAPE_FEATURES), ("appearance_distance", APPEARANCE_FEATURES)):
        per_type = {}
        for defect_type in sorted(set(generated.values) & set(real.values)):
            distance = group_distance(generated, real, defect_type, features, scales)
            if distance is not None:
                per_type[defect_type] = distance
        if per_type:
            metrics[key] = float(np.mean(list(per_type.values())))
            metrics.update({f"{key}.{defect_type}": value for defect_type, value in per_type.items()})
    return metrics
