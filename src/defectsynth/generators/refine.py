"""Refined masks for methods without their own: the conditioning mask where the image actually changed.

Every anomalous sample carries a refined mask (../shared/DESIGN.md, "Shard format"). A method that
only paints inside a conditioning mask refines it by measuring the change against the source normal,
so a region the method left (almost) untouched is not labelled a defect. ``refined_sample`` packs the
result into a ``Sample`` with the metadata and QC scores every such method records; a method with its
own mask (SeaS's RMP, BADG's attention mask) calls ``measured_sample`` with it instead, and a method
that makes normals returns ``normal_sample``s. The measured change is recorded for all of them.

Example:
    >>> source = np.zeros((4, 4, 3), dtype=np.uint8)
    >>> image = source.copy(); image[0, 0] = 200
    >>> cond = np.ones((4, 4), dtype=bool)
    >>> int(refine_by_change(source, image, cond, threshold=0.1).sum())
    1
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from defectsynth.storage.keys import canonical_json
from defectsynth.storage.sample import GeneratorInfo, QualityCheck, Sample, SampleMetadata

if TYPE_CHECKING:
    from defectsynth.generators.base import Request


def _check_pair(source: np.ndarray, image: np.ndarray, mask: np.ndarray) -> None:
    if source.shape != image.shape or source.ndim != 3 or mask.shape != source.shape[:2]:
        msg = f"source {source.shape}, image {image.shape} and mask {mask.shape} must be HxWx3, HxWx3 and HxW"
        raise ValueError(msg)


def change_map(source: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per-pixel change in [0, 1]: the largest absolute channel difference, over 255."""
    return np.abs(image.astype(np.int16) - source.astype(np.int16)).max(axis=2) / 255.0


def refine_by_change(source: np.ndarray, image: np.ndarray, cond_mask: np.ndarray, *, threshold: float) -> np.ndarray:
    """The conditioning mask intersected with the pixels whose change exceeds ``threshold`` (in [0, 1))."""
    _check_pair(source, image, cond_mask)
    if not 0.0 <= threshold < 1.0:
        msg = f"refine threshold must be in [0, 1), got {threshold}"
        raise ValueError(msg)
    return cond_mask.astype(bool) & (change_map(source, image) > threshold)


def measured_strength(source: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change inside ``mask``, over pixels and channels, in [0, 1]; 0.0 for an empty mask."""
    _check_pair(source, image, mask)
    mask = mask.astype(bool)
    if not mask.any():
        return 0.0
    diff = np.abs(image.astype(np.int16) - source.astype(np.int16))[mask]
    return float(diff.mean() / 255.0)


def background_change(source: np.ndarray, image: np.ndarray, mask: np.ndarray, cond_mask: np.ndarray | None) -> float:
    """Mean per-pixel change (``change_map``) outside both ``mask`` and ``cond_mask``; 0.0 when nothing is outside."""
    _check_pair(source, image, mask)
    inside = mask.astype(bool) if cond_mask is None else mask.astype(bool) | cond_mask.astype(bool)
    if inside.all():
        return 0.0
    return float(change_map(source, image)[~inside].mean())


def settings_digest(settings: BaseModel) -> str:
    """sha256 of the settings' canonical JSON, recorded as the samples' ``config_digest``."""
    return hashlib.sha256(canonical_json(settings.model_dump(mode="json")).encode()).hexdigest()


def refined_sample(
    request: Request,
    *,
    method: str,
    source: np.ndarray,
    image: np.ndarray,
    cond_mask: np.ndarray,
    threshold: float,
    intensity: float | None,
    config_digest: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    base_model: str | None = None,
) -> Sample:
    """A Sample whose mask is ``refine_by_change`` of ``cond_mask``, with metadata and QC filled in.

    ``strength`` is the mean change inside the refined mask; QC records the refined mask's area and that
    strength, and passes when the refined mask is not empty. ``sampler``, ``steps`` and ``base_model`` (the
    diffusion base's registry URI or path) are recorded as given: None for methods that do not sample.
    """
    mask = refine_by_change(source, image, cond_mask, threshold=threshold)
    return measured_sample(
        request,
        method=method,
        source=source,
        image=image,
        mask=mask,
        cond_mask=cond_mask,
        intensity=intensity,
        config_digest=config_digest,
        sampler=sampler,
        steps=steps,
        base_model=base_model,
    )


def measured_sample(
    request: Request,
    *,
    method: str,
    source: np.ndarray,
    image: np.ndarray,
    mask: np.ndarray,
    cond_mask: np.ndarray | None,
    intensity: float | None,
    config_digest: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    base_model: str | None = None,
) -> Sample:
    """An anomalous Sample with ``mask`` as its mask (a refined one, or the method's own) and the measured change.

    ``strength`` is the mean change against ``source`` inside ``mask``; QC records the mask's area and that
    strength, and passes when the mask is not empty. ``cond_mask`` (kept as ``cond.png``) may be None.
    """
    mask = mask.astype(bool)
    strength = measured_strength(source, image, mask)
    qc = QualityCheck(scores={"mask_area": float(mask.sum()), "strength": strength}, passed=bool(mask.any()))
    metadata = _metadata(
        request,
        method,
        label=1,
        strength=strength,
        qc=qc,
        intensity=intensity,
        generator=GeneratorInfo(method=method, base_model=base_model, config_digest=config_digest),
        sampler=sampler,
        steps=steps,
    )
    return Sample(
        image=image, mask=mask, metadata=metadata, cond_mask=None if cond_mask is None else cond_mask.astype(bool)
    )


def normal_sample(
    request: Request,
    *,
    method: str,
    image: np.ndarray,
    intensity: float | None,
    config_digest: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    base_model: str | None = None,
) -> Sample:
    """A normal Sample (label 0) for a label-0 request: an all-zero mask, no conditioning mask, no defect."""
    if request.label != 0:
        msg = f"{method}: normal_sample for an anomalous request ({request.product}/{request.defect_type})"
        raise ValueError(msg)
    metadata = _metadata(
        request,
        method,
        label=0,
        strength=0.0,
        qc=QualityCheck(scores={"mask_area": 0.0}, passed=True),
        intensity=intensity,
        generator=GeneratorInfo(method=method, base_model=base_model, config_digest=config_digest),
        sampler=sampler,
        steps=steps,
    )
    return Sample(image=image, mask=np.zeros(image.shape[:2], dtype=bool), metadata=metadata)


def _metadata(
    request: Request,
    method: str,
    *,
    label: int,
    strength: float,
    qc: QualityCheck,
    intensity: float | None,
    generator: GeneratorInfo,
    sampler: str | None,
    steps: int | None,
) -> SampleMetadata:
    """The metadata every generated sample carries: the request's ids and seed, and what made it."""
    return SampleMetadata(
        key=request.key(method),
        product=request.product,
        defect_type=request.defect_type,
        label=label,
        intensity=intensity,
        strength=strength,
        generator=generator,
        seed=request.seed,
        sampler=sampler,
        steps=steps,
        source_image=request.source_image,
        qc=qc,
    )
