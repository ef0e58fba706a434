"""Image-mask consistency checks of a generated dataset, computed on every run (no pretrained network).

A generated sample is a normal *source* image with a defect painted inside its *mask*. Paper 000's method
(AnomalyDiffusion) blends the latent so that, by construction, only the mask changes; later papers criticise
it and others for masks that do not match the drawn defect (SeaS, CADiff) and for defects off the object or
masks filled completely (BADG). These checks measure exactly those failures:

- :func:`mask_alignment`: the share of the change ``|generated - source|`` (summed over channels, per pixel)
  that lies inside the mask. 1 = everything that changed is inside the mask; 0 = the defect landed elsewhere.
  When nothing changed at all the share is undefined: the function raises
  :class:`~defectsynth.evaluation.metrics.UndefinedMetricError` (an unchanged sample is a failed generation,
  not a perfectly aligned one) and :class:`AlignmentAccumulator` counts such samples separately.
- :func:`psnr_outside`: PSNR of the generated image against its source over the pixels *outside* the mask,
  ``10 log10(255² / MSE)`` with the MSE over those pixels and all channels. It tells how much the background
  was disturbed (blending artefacts, VAE round-trip loss). Identical backgrounds give ``math.inf``; pass a
  value through :func:`finite_or_none` before logging it.
- :func:`mask_sanity`: counts of empty masks, tiny masks (``0 < area < tiny_area``) and masks mostly off the
  object (less than half their area on the foreground, counted only where a foreground mask exists).
- :func:`mask_iou`: intersection over union of two masks; :meth:`AlignmentAccumulator.add_conditioning` uses
  it to compare a sample's refined mask with its conditioning mask (the one the generator was given), with the
  share of the conditioning mask that the refined mask still covers.

Input convention (the one of :class:`~defectsynth.storage.sample.Sample`): images are ``uint8`` arrays, ``H x W
x C`` or ``H x W``, peak value 255; masks are ``H x W`` and boolean (``bool``, or integers in {0, 1} or
{0, 255}, as decoded from a mask PNG). Other dtypes are refused rather than guessed.

Example:
    >>> import numpy as np
    >>> source = np.zeros((4, 4, 3), np.uint8)
    >>> generated = source.copy(); generated[0, 0] = 200
    >>> mask = np.zeros((4, 4), bool); mask[0, 0] = True
    >>> mask_alignment(generated, source, mask), psnr_outside(generated, source, mask)
    (1.0, inf)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from defectsynth.evaluation.metrics import UndefinedMetricError

PEAK = 255.0  # PSNR peak of uint8 images


def finite_or_none(value: float) -> float | None:
    """``value`` if it is finite, else None: a PSNR of ``inf`` (identical images) is logged as absent."""
    return value if math.isfinite(value) else None


def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        msg = f"{name} must be H x W, got shape {mask.shape}"
        raise ValueError(msg)
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.integer):
        msg = f"{name} must be bool or integer 0/1 or 0/255, got {mask.dtype}"
        raise ValueError(msg)
    values = np.unique(mask)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        msg = f"{name} must hold 0/1 or 0/255 only, found {values[:5].tolist()}"
        raise ValueError(msg)
    return mask != 0


def _mask_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    """Two ``H x W`` masks as bool arrays, validated and of the same shape; errors call them ``names``."""
    a, b = _as_mask(a, names[0]), _as_mask(b, names[1])
    if a.shape != b.shape:
        msg = f"masks {names[0]} {a.shape} and {names[1]} {b.shape} differ in shape"
        raise ValueError(msg)
    return a, b


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``H x W`` masks, in [0, 1].

    Raises:
        ValueError: a malformed mask, or masks of different shapes.
        UndefinedMetricError: both masks are empty (nothing to compare, not a perfect match).
    """
    a, b = _mask_pair(a, b)
    union = int((a | b).sum())
    if union == 0:
        msg = "mask IoU is undefined: both masks are empty"
        raise UndefinedMetricError(msg)
    return int((a & b).sum()) / union


def _check_pair(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``H x W x C`` int64 difference ``generated - source`` and the ``H x W`` bool mask, validated."""
    generated, source = np.asarray(generated), np.asarray(source)
    for name, image in (("generated", generated), ("source", source)):
        if image.dtype != np.uint8:
            msg = f"{name} must be a uint8 image (0-255), got {image.dtype}"
            raise ValueError(msg)
        if image.ndim not in (2, 3):
            msg = f"{name} must be H x W or H x W x C, got shape {image.shape}"
            raise ValueError(msg)
    if generated.shape != source.shape:
        msg = f"generated {generated.shape} and source {source.shape} differ in shape"
        raise ValueError(msg)
    mask = _as_mask(mask)
    if mask.shape != generated.shape[:2]:
        msg = f"mask {mask.shape} does not match the image size {generated.shape[:2]}"
        raise ValueError(msg)
    difference = generated.astype(np.int64) - source.astype(np.int64)
    if difference.ndim == 2:
        difference = difference[..., None]
    return difference, mask


def mask_alignment(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Share of the change from the source image that falls inside the mask.

    The change of a pixel is ``sum_c |generated - source|``; the result is the change inside the mask over
    the total change.

    Args:
        generated: the generated image, uint8.
        source: the normal image it was drawn on, uint8, same shape.
        mask: ``H x W`` defect mask.

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: malformed inputs.
        UndefinedMetricError: the generated image equals the source (nothing changed).
    """
    difference, mask = _check_pair(generated, source, mask)
    change = np.abs(difference).sum(axis=2)
    total = int(change.sum())
    if total == 0:
        msg = "mask alignment is undefined: the generated image equals its source"
        raise UndefinedMetricError(msg)
    return int(change[mask].sum()) / total


def psnr_outside(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255) of the generated image against its source over the pixels outside the mask.

    Args:
        generated: the generated image, uint8.
        source: the normal image it was drawn on, uint8, same shape.
        mask: ``H x W`` defect mask.

    Returns:
        ``10 log10(255² / MSE)``; ``math.inf`` when the outside is identical (see :func:`finite_or_none`).

    Raises:
        ValueError: malformed inputs.
        UndefinedMetricError: the mask covers the whole image (no pixel outside).
    """
    difference, mask = _check_pair(generated, source, mask)
    outside = difference[~mask]  # P x C
    if outside.size == 0:
        msg = "PSNR outside the mask is undefined: the mask covers the whole image"
        raise UndefinedMetricError(msg)
    mse = float(np.mean(np.square(outside, dtype=np.float64)))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(PEAK**2 / mse)


@dataclass(frozen=True)
class MaskSanity:
    """Counts of suspicious masks in a generated dataset.

    Attributes:
        total: masks checked.
        empty: masks with no pixel set.
        tiny: masks with ``0 < area < tiny_area``.
        outside_foreground: non-empty masks with less than half their area on the foreground; only masks
            that have a foreground mask are counted (textures have none).
    """

    total: int
    empty: int
    tiny: int
    outside_foreground: int

    def as_metrics(self) -> dict[str, float]:
        """The counts under their logged names (``masks_total``, ``masks_empty``, ...)."""
        return {f"masks_{name}": float(value) for name, value in asdict(self).items()}


def mask_sanity(
    masks: Sequence[np.ndarray],
    foregrounds: Sequence[np.ndarray | None] | None,
    *,
    tiny_area: int,
) -> MaskSanity:
    """Count empty, tiny and off-object masks.

    Args:
        masks: ``H x W`` defect masks.
        foregrounds: one ``H x W`` foreground mask (or None) per mask, or None when no image has one.
        tiny_area: masks with ``0 < area < tiny_area`` pixels count as tiny.

    Returns:
        The counts.

    Raises:
        ValueError: ``tiny_area < 1``, a length mismatch, or a malformed or mis-sized mask.
    """
    if tiny_area < 1:
        msg = f"tiny_area must be at least 1, got {tiny_area}"
        raise ValueError(msg)
    if foregrounds is None:
        foregrounds = [None] * len(masks)
    if len(foregrounds) != len(masks):
        msg = f"{len(masks)} masks but {len(foregrounds)} foregrounds"
        raise ValueError(msg)
    empty = tiny = outside = 0
    for index, (raw_mask, raw_foreground) in enumerate(zip(masks, foregrounds, strict=True)):
        mask = _as_mask(raw_mask, f"masks[{index}]")
        area = int(mask.sum())
        if area == 0:
            empty += 1
            continue
        if area < tiny_area:
            tiny += 1
        if raw_foreground is not None:
            foreground = _as_mask(raw_foreground, f"foregrounds[{index}]")
            if foreground.shape != mask.shape:
                msg = f"foregrounds[{index}] {foreground.shape} does not match masks[{index}] {mask.shape}"
                raise ValueError(msg)
            if 2 * int((mask & foreground).sum()) < area:
                outside += 1
    return MaskSanity(total=len(masks), empty=empty, tiny=tiny, outside_foreground=outside)


class AlignmentAccumulator:
    """Streaming means of :func:`mask_alignment`, :func:`psnr_outside` and refined-vs-conditioning mask overlap.

    Only sums and counts are kept, so a job can stream thousands of samples, and accumulators of several
    workers combine with :meth:`merge`.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.alignment_sum = 0.0
        self.alignment_count = 0
        self.unchanged = 0  # samples equal to their source: alignment undefined
        self.psnr_sum = 0.0
        self.psnr_count = 0
        self.identical_outside = 0  # PSNR infinite
        self.full_masks = 0  # no pixel outside: PSNR undefined
        self.cond_iou_sum = 0.0
        self.cond_iou_count = 0  # pairs with a non-empty union: IoU defined
        self.cond_coverage_sum = 0.0
        self.cond_coverage_count = 0  # pairs with a non-empty conditioning mask: coverage defined

    def add(self, generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> None:
        """Add one sample (same conventions as :func:`mask_alignment`)."""
        self.samples += 1
        try:
            self.alignment_sum += mask_alignment(generated, source, mask)
            self.alignment_count += 1
        except UndefinedMetricError:
            self.unchanged += 1
        try:
            psnr = psnr_outside(generated, source, mask)
        except UndefinedMetricError:
            self.full_masks += 1
            return
        if math.isinf(psnr):
            self.identical_outside += 1
        else:
            self.psnr_sum += psnr
            self.psnr_count += 1

    def add_conditioning(self, refined: np.ndarray, cond: np.ndarray) -> None:
        """Add one sample's refined mask and the conditioning mask its generator was given (``H x W`` each)."""
        refined, cond = _mask_pair(refined, cond, ("refined", "cond"))
        overlap, union, cond_area = int((refined & cond).sum()), int((refined | cond).sum()), int(cond.sum())
        if cond_area:
            self.cond_coverage_sum += overlap / cond_area
            self.cond_coverage_count += 1
        if union:  # both empty: IoU undefined (see mask_iou), the pair is left out
            self.cond_iou_sum += overlap / union
            self.cond_iou_count += 1

    def merge(self, other: AlignmentAccumulator) -> AlignmentAccumulator:
        """Add the samples of ``other`` (e.g. another worker's) to this accumulator; returns self."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def result(self) -> dict[str, float]:
        """The metrics so far.

        Returns:
            ``mask_alignment_samples`` (samples added), ``mask_alignment`` (mean over the samples that changed;
            absent if none did), ``mask_alignment_unchanged`` (samples equal to their source),
            ``psnr_outside`` (mean dB over samples with a finite PSNR; absent if none),
            ``psnr_outside_identical`` (samples whose outside equals the source: PSNR infinite) and
            ``psnr_outside_full_mask`` (samples with no pixel outside the mask); from the pairs of
            :meth:`add_conditioning`, ``refined_cond_iou`` (mean IoU of refined and conditioning mask over
            the pairs where it is defined) and ``refined_cond_coverage`` (mean ``|refined & cond| / |cond|``
            over the pairs with a non-empty conditioning mask), each absent if no pair qualifies.
        """
        out = {
            "mask_alignment_samples": float(self.samples),
            "mask_alignment_unchanged": float(self.unchanged),
            "psnr_outside_identical": float(self.identical_outside),
            "psnr_outside_full_mask": float(self.full_masks),
        }
        if self.alignment_count:
            out["mask_alignment"] = self.alignment_sum / self.alignment_count
        if self.psnr_count:
            out["psnr_outside"] = self.psnr_sum / self.psnr_count
        if self.cond_iou_count:
            out["refined_cond_iou"] = self.cond_iou_sum / self.cond_iou_count
        if self.cond_coverage_count:
            out["refined_cond_coverage"] = self.cond_coverage_sum / self.cond_coverage_count
        return out
