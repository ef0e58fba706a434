"""Downstream evaluation: detectors trained on real normals plus synthetic pairs, metrics and reports.

- :mod:`~defectsynth.evaluation.detectors`: the three detectors behind one interface (what ``jobs.evaluate``
  trains, selects on validation and tests): :mod:`~defectsynth.evaluation.segmenter` (DRAEM's discriminative
  U-Net), :mod:`~defectsynth.evaluation.classifier` (a ResNet defect-type classifier on
  :mod:`~defectsynth.core.resnet`) and :mod:`~defectsynth.evaluation.diffusionad` (paper 003).
- :mod:`~defectsynth.evaluation.metrics`: AUROC, AP, F1-max, AU-PRO, IoU and accuracy, and
  :func:`score_detection`, which returns them under the stable MLflow names (``pixel_ap``, ``pixel_ap.<type>``).
- :mod:`~defectsynth.evaluation.dataset_quality`: a generated dataset measured on its own:
  :mod:`~defectsynth.evaluation.mask_checks` (mask alignment, sanity counts) always, and
  :mod:`~defectsynth.evaluation.quality` (IS, IC-LPIPS, KID) only with local feature-network weights.
- :mod:`~defectsynth.evaluation.report`: comparison tables, curves and prediction grids, MLflow read-back.
- :mod:`~defectsynth.evaluation.settings`: the detectors' and quality checks' settings as torch-free data.

The metrics need only numpy and scipy; the segmenter names are imported on first use, so importing the
metrics (e.g. for a report) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from defectsynth.evaluation.metrics import (
    METRIC_FIELDS,
    STABLE_METRICS,
    Curve,
    UndefinedMetricError,
    accuracy,
    aupro,
    auroc,
    average_precision,
    binary_curve,
    f1_max,
    iou_at_f1_max,
    metric_key,
    pro_curve,
    score_detection,
)

if TYPE_CHECKING:
    from defectsynth.evaluation.segmenter import (
        DiscriminativeUNet,
        SegmentationOutput,
        SegmenterConfig,
        build_segmenter,
        configure_optimizer,
        focal_loss,
        image_score_from_map,
        predict,
        top_k_mean_score,
        training_step,
    )

_SEGMENTER_NAMES = (
    "DiscriminativeUNet",
    "SegmentationOutput",
    "SegmenterConfig",
    "build_segmenter",
    "configure_optimizer",
    "focal_loss",
    "image_score_from_map",
    "predict",
    "top_k_mean_score",
    "training_step",
)


def __getattr__(name: str) -> Any:
    """Import the segmenter (and torch) only when one of its names is asked for."""
    if name in _SEGMENTER_NAMES:
        return getattr(importlib.import_module("defectsynth.evaluation.segmenter"), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "METRIC_FIELDS",
    "STABLE_METRICS",
    "Curve",
    "DiscriminativeUNet",
    "SegmentationOutput",
    "SegmenterConfig",
    "UndefinedMetricError",
    "accuracy",
    "aupro",
    "auroc",
    "average_precision",
    "binary_curve",
    "build_segmenter",
    "configure_optimizer",
    "f1_max",
    "focal_loss",
    "image_score_from_map",
    "iou_at_f1_max",
    "metric_key",
    "predict",
    "pro_curve",
    "score_detection",
    "top_k_mean_score",
    "training_step",
]
