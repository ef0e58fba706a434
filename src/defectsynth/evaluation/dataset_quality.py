"""Measure a generated dataset itself, per product: mask checks and fidelity always, IS/IC-LPIPS/KID with weights.

Alignment compares each sample with the normal image it was drawn on (``source_image`` in its metadata),
loaded at the run's resolution the way the generators load it. Samples with a conditioning mask also compare
their refined mask with it (IoU, and the share of the conditioning mask the refined one covers). Sanity
counts masks that are empty, tiny or mostly off the product. Fidelity (``fidelity.py``) compares the anomalous
samples of each defect type with the real generator-training defects of that type, by mask shape and by
appearance relative to the surroundings (``mask_shape_distance``, ``appearance_distance``, and ``.<type>``). The
feature-network metrics run only on local weights (``evaluate.quality``); otherwise the result says why they were
not computed, and no value is made up. A fidelity sheet (``report.fidelity_sheet``) shows the first real
references and the first generated samples of each type side by side, for the eye.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from defectsynth.core.resize import resize_image, resize_mask
from defectsynth.evaluation.data import RealImages, load_real, to_uint8
from defectsynth.evaluation.fidelity import DefectFeatures, fidelity_distances
from defectsynth.evaluation.mask_checks import AlignmentAccumulator, mask_sanity
from defectsynth.evaluation.quality import QualityNetworks, generation_quality, not_computed_reason
from defectsynth.evaluation.report import SHEET_GENERATED, SHEET_REAL, Defect, fidelity_sheet
from defectsynth.evaluation.settings import QualitySettings
from defectsynth.storage import stream
from defectsynth.storage.imageio import load_item
from defectsynth.storage.records import ProductData


@dataclass(frozen=True)
class DatasetQuality:
    """What :func:`measure_dataset` found; ``not_computed`` says which metrics could not run and why.

    ``sheet``: the fidelity sheet (H x W x 3 uint8), None when neither side has a defect.
    """

    metrics: dict[str, float]
    not_computed: str | None
    sheet: np.ndarray | None = None


@dataclass(frozen=True)
class _Source:
    image: np.ndarray  # H x W x 3 uint8 at the run's resolution
    foreground: np.ndarray | None  # H x W bool


class _Sources:
    """Source normals by image id, loaded once each at the run's resolution."""

    def __init__(self, product: ProductData, resolution: int) -> None:
        self.product, self.resolution = product, resolution
        self._cache: dict[str, _Source] = {}

    def get(self, image_id: str) -> _Source:
        if image_id not in self._cache:
            item = load_item(self.product.record(image_id))
            foreground = None if item.foreground is None else resize_mask(item.foreground, self.resolution)
            self._cache[image_id] = _Source(resize_image(item.image, self.resolution), foreground)
        return self._cache[image_id]


def measure_dataset(
    uri: str,
    product: ProductData,
    *,
    method: str,
    resolution: int,
    reference_ids: Sequence[str],
    settings: QualitySettings,
) -> DatasetQuality:
    """Measure every sample of ``method`` for ``product`` in the dataset at ``uri``.

    Args:
        uri: the dataset (directory or URI).
        product: the product's records, to load the source normals and the references.
        method: the generator whose samples to measure.
        resolution: the run's image side (the generators' input size).
        reference_ids: real defect images the generated ones are compared with (the generator-training
            defects: the test split is read by the test phase only), by fidelity and, with weights, KID and IC-LPIPS.
        settings: weights of the feature networks, how many images they see, what "tiny" is.

    Returns:
        The metrics, the reason when some could not run, and the fidelity sheet of the first real and generated
        defects of each type (the stream's order is deterministic).
    """
    alignment = AlignmentAccumulator()
    sources = _Sources(product, resolution)
    masks, foregrounds, kept = [], [], []
    generated = DefectFeatures()
    shown: dict[str, list[Defect]] = {}
    for sample in stream(uri, products=[product.name], methods=[method]):
        image, mask = to_uint8(sample["image"][None])[0], sample["mask"][0].numpy() > 0.5
        source_id = sample["metadata"].get("source_image")
        source = sources.get(source_id) if source_id else None
        if source is not None:
            alignment.add(image, source.image, mask)
        if "cond_mask" in sample:  # has_cond; samples without a conditioning mask have no pair to compare
            alignment.add_conditioning(mask, sample["cond_mask"][0].numpy() > 0.5)
        masks.append(mask)
        foregrounds.append(None if source is None else source.foreground)
        if sample["metadata"].get("label", 1) == 1:
            defect_type = sample["metadata"]["defect_type"]
            generated.add(defect_type, image, mask, foregrounds[-1])
            if len(shown.setdefault(defect_type, [])) < SHEET_GENERATED:
                shown[defect_type].append((image, mask))
        if len(kept) < settings.max_images:
            kept.append(sample["image"])
    if not masks:
        msg = f"{uri}: no {method} samples of {product.name} to measure"
        raise ValueError(msg)
    metrics = {**alignment.result(), **mask_sanity(masks, foregrounds, tiny_area=settings.tiny_mask_area).as_metrics()}
    references = load_real(product, list(reference_ids), resolution)
    metrics.update(fidelity_distances(generated, real_features(references)))
    reason = not_computed_reason(settings.inception_weights, settings.lpips_weights)
    if settings.inception_weights or settings.lpips_weights:
        networks = QualityNetworks.load(settings.inception_weights, settings.lpips_weights)
        metrics.update(generation_quality(torch.stack(kept), references.images, networks))
    real = real_defects(references, SHEET_REAL)
    sheet = fidelity_sheet(real, shown, method) if real or shown else None
    return DatasetQuality(metrics, reason, sheet)


def real_defects(real: RealImages, per_type: int) -> dict[str, list[Defect]]:
    """The first ``per_type`` anomalous images of each type among ``real``, with their masks."""
    defects: dict[str, list[Defect]] = {}
    for index in np.flatnonzero(real.labels == 1):
        chosen = defects.setdefault(real.defect_types[index], [])
        if len(chosen) < per_type:
            chosen.append((to_uint8(real.images[index : index + 1])[0], real.masks[index, 0].numpy() > 0.5))
    return defects


def real_features(real: RealImages) -> DefectFeatures:
    """Fidelity features of the anomalous images among ``real`` (their masks and foregrounds at their size)."""
    features = DefectFeatures()
    images = to_uint8(real.images)
    for index in np.flatnonzero(real.labels == 1):
        foreground = None if real.foregrounds is None else real.foregrounds[index, 0].numpy() > 0.5
        features.add(real.defect_types[index], images[index], real.masks[index, 0].numpy() > 0.5, foreground)
    return features
