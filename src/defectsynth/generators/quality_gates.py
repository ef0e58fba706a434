"""Quality gates: whether a generated anomalous sample enters the dataset, and why not.

``judge`` measures a sample against its source normal (and the product's foreground, for objects) and
names every gate of ``generate.quality`` it fails; ``gated_sample`` writes the measures into the sample's
metadata (``strength``, ``qc.scores``, ``qc.passed``, the ``attempt``, and ``rejected_for`` when rejected).
Normal samples (label 0) have no mask to judge and pass. The measures are computed here for every sample,
whether its mask is refined from the change or the method's own.

Example:
    >>> source = np.zeros((8, 8, 3), dtype=np.uint8)
    >>> measure_defect(source, source, np.ones((8, 8), bool), None, None).in_mask_change
    0.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from pydantic import Field

from defectsynth.core.config_section import ConfigSection
from defectsynth.generators.refine import background_change, measured_strength
from defectsynth.storage.sample import QualityCheck, Sample

MASK_TOO_SMALL = "mask_too_small"
OUTSIDE_FOREGROUND = "outside_foreground"
DEFECT_MISSING = "defect_missing"
BACKGROUND_LEAKED = "background_leaked"
GENERATOR_QC = "generator_qc"  # the generator's own check failed
REASONS = (MASK_TOO_SMALL, OUTSIDE_FOREGROUND, DEFECT_MISSING, BACKGROUND_LEAKED, GENERATOR_QC)


class QualityGates(ConfigSection):
    """What an anomalous sample must meet to enter the dataset (read by ``jobs.generate``).

    Changes are per pixel, the largest channel difference to the source normal over 255, averaged: inside
    the sample's mask, and over the background (outside both its mask and its conditioning mask).
    """

    min_mask_area: int = Field(1, ge=1, description="smallest mask in pixels (an empty mask is never a defect)")
    max_outside_foreground: float = Field(
        1.0, ge=0.0, le=1.0, description="largest share of the mask off the product's foreground (objects only)"
    )
    min_in_mask_change: float = Field(
        0.0, ge=0.0, le=1.0, description="smallest mean change inside the mask; below it the defect is missing"
    )
    max_out_of_mask_change: float = Field(
        1.0, ge=0.0, le=1.0, description="largest mean change of the background; above it the background leaked"
    )
    preview_per_type: int = Field(2, ge=0, description="rejected samples kept under rejected/ per product and type")


@dataclass(frozen=True)
class DefectMeasures:
    """What the gates look at: mask area (pixels), share of it off the foreground, changes in and out of it."""

    mask_area: float
    outside_foreground: float
    in_mask_change: float
    out_of_mask_change: float


@dataclass(frozen=True)
class Verdict:
    """The measures of one sample (None for a normal) and the gates it failed (empty: accepted)."""

    measures: DefectMeasures | None
    reasons: tuple[str, ...]

    @property
    def accepted(self) -> bool:
        """Whether the sample passed every gate."""
        return not self.reasons


def measure_defect(
    source: np.ndarray,
    image: np.ndarray,
    mask: np.ndarray,
    cond_mask: np.ndarray | None,
    foreground: np.ndarray | None,
) -> DefectMeasures:
    """The gate measures of an anomalous sample against its source normal and foreground (None: no foreground).

    The in-mask change is measured here rather than read from the sample's ``strength``: a gate does not
    take a generator's word for its own output.
    """
    mask = mask.astype(bool)
    area = int(mask.sum())
    off = 0.0
    if foreground is not None and area:
        off = float((mask & ~foreground.astype(bool)).sum() / area)
    return DefectMeasures(
        mask_area=float(area),
        outside_foreground=off,
        in_mask_change=measured_strength(source, image, mask),
        out_of_mask_change=background_change(source, image, mask, cond_mask),
    )


def judge(sample: Sample, source: np.ndarray, foreground: np.ndarray | None, gates: QualityGates) -> Verdict:
    """Measure ``sample`` and list the gates it fails, in ``REASONS`` order; a normal sample passes."""
    if sample.metadata.label == 0:
        return Verdict(measures=None, reasons=())
    measures = measure_defect(source, sample.image, sample.mask, sample.cond_mask, foreground)
    failed = {
        MASK_TOO_SMALL: measures.mask_area < gates.min_mask_area,
        OUTSIDE_FOREGROUND: measures.outside_foreground > gates.max_outside_foreground,
        DEFECT_MISSING: measures.in_mask_change < gates.min_in_mask_change,
        BACKGROUND_LEAKED: measures.out_of_mask_change > gates.max_out_of_mask_change,
        GENERATOR_QC: not sample.metadata.qc.passed,
    }
    return Verdict(measures=measures, reasons=tuple(reason for reason in REASONS if failed[reason]))


def gated_sample(sample: Sample, verdict: Verdict, attempt: int) -> Sample:
    """``sample`` with the verdict in its metadata: measures as QC scores, ``strength``, ``attempt``, reasons."""
    metadata = sample.metadata
    scores = dict(metadata.qc.scores)
    update: dict = {"attempt": attempt}
    if verdict.measures is not None:
        scores |= asdict(verdict.measures)
        update["strength"] = verdict.measures.in_mask_change
    update["qc"] = QualityCheck(scores=scores, passed=verdict.accepted)
    if not verdict.accepted:
        update["rejected_for"] = list(verdict.reasons)
    return Sample(
        image=sample.image, mask=sample.mask, metadata=metadata.model_copy(update=update), cond_mask=sample.cond_mask
    )
