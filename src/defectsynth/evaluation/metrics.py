"""Detection metrics: image and pixel AUROC, AP, F1-max, pixel AU-PRO and IoU, classification accuracy.

Every threshold metric is read off one cumulative curve: the scores sorted in decreasing order, with the
positive and negative mass predicted positive at each distinct threshold ("positive iff score >=
threshold", scikit-learn's convention). On the same data the values equal scikit-learn's:

- **AUROC**: trapezoidal area under (FPR, TPR) from (0, 0), as ``roc_auc_score``.
- **AP**: ``sum_k (R_k - R_{k-1}) * P_k`` over decreasing thresholds, as ``average_precision_score``.
- **F1-max**: the largest ``2PR / (P + R)`` over the thresholds of the PR curve (the highest threshold wins a
  tie), as the max over ``precision_recall_curve``.
- **IoU** (pixel): ``TP / (TP + FP + FN)`` at the F1-max threshold, pooled over all pixels of the set (not a
  mean of per-image IoUs). At one threshold ``IoU = F1 / (2 - F1)``, so it is also the best pooled IoU.
- **AU-PRO** (pixel): the MVTec AD evaluation's definition. Ground-truth regions are the 8-connected
  components of each mask (``scipy.ndimage.label`` with a 3x3 structure); at each threshold PRO is the mean
  over all regions of the fraction of the region predicted positive, and FPR is taken over all normal
  pixels. The (FPR, PRO) curve, from (0, 0) to (1, 1), is integrated with the trapezoid rule up to
  ``FPR = 0.3`` (interpolating at 0.3) and divided by 0.3, so a perfect map scores 1.
- **Accuracy**: the fraction of images whose predicted defect type is the true one.

Large pixel sets. Up to ``max_exact`` scores (default 2**22, 64 maps of 256x256) the curve is exact (one
sort). Above that it is built from histograms, streamed over the maps in chunks so memory stays bounded:
bin edges are order statistics of a deterministic strided sample (up to 2**20 scores of each class), half of
the ``bins`` edges (default 2**16) placed at quantiles of the positive scores and half at quantiles of the
negative ones, plus the global min and max. Counting the pixels at or above each edge gives *exact* curve
points at those thresholds, so each step between points moves TPR (or PRO) and FPR by about 2 / bins at
most; the tests check every metric stays within 1e-3 of the exact value (measured on 1.2 M pixels: at most
1e-5 with 2**16 bins, 2e-4 with 2**12). Nothing is random, so the same inputs always give the same numbers.
The ROC and PRO curves of one pixel set share the sort (exact) or the binning pass (histogram).

Undefined metrics are never faked: the functions raise :class:`UndefinedMetricError` (AUROC with one class,
AP / F1-max / IoU without positives, AU-PRO without regions or without normal pixels), and
:func:`score_detection` omits the key and logs a warning.

Example:
    >>> import numpy as np
    >>> scores, targets = np.array([0.9, 0.6, 0.4, 0.1]), np.array([1, 0, 1, 0])
    >>> auroc(scores, targets), f1_max(scores, targets)
    (0.75, (0.8, 0.4))
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_MAX_EXACT = 1 << 22  # scores up to which curves are exact (64 maps of 256 x 256)
DEFAULT_BINS = 1 << 16  # thresholds of a histogram curve above DEFAULT_MAX_EXACT
PRO_FPR_LIMIT = 0.3  # AU-PRO integration limit (MVTec AD)
_CHUNK_PIXELS = 1 << 21  # scores handled at once when streaming
_EDGE_SAMPLE = 1 << 20  # scores per class sampled to place histogram edges
_CONNECTIVITY = np.ones((3, 3), dtype=int)  # 8-connected ground-truth regions, as the MVTec AD evaluation

#: The fields each metric reads (anomalib's names) and the MLflow key it is logged under.
METRIC_FIELDS: dict[str, tuple[str, ...]] = {
    "pixel_auroc": ("anomaly_map", "gt_mask"),
    "pixel_ap": ("anomaly_map", "gt_mask"),
    "pixel_f1max": ("anomaly_map", "gt_mask"),
    "pixel_aupro": ("anomaly_map", "gt_mask"),
    "pixel_iou": ("anomaly_map", "gt_mask"),
    "image_auroc": ("pred_score", "gt_label"),
    "image_ap": ("pred_score", "gt_label"),
    "image_f1max": ("pred_score", "gt_label"),
    "cls_accuracy": ("pred_type", "defect_type"),
}
STABLE_METRICS = tuple(METRIC_FIELDS)


class UndefinedMetricError(ValueError):
    """The metric has no value on this data, e.g. AUROC when only one class is present."""


@dataclass(frozen=True)
class Curve:
    """Cumulative masses predicted positive at decreasing thresholds.

    For a ROC curve the masses are pixel (or image) counts: ``pos`` is TP, ``neg`` is FP. For a PRO curve
    ``pos`` sums ``1 / region size`` over covered region pixels.

    Attributes:
        thresholds: ``T`` strictly decreasing thresholds; positive iff score >= threshold.
        pos: ``T`` cumulative positive mass at each threshold.
        neg: ``T`` cumulative negative mass at each threshold.
        total_pos: all positive mass (P; the number of regions for PRO).
        total_neg: all negative mass (N).
        exact: False when the thresholds are histogram edges rather than every distinct score.
    """

    thresholds: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    total_pos: float
    total_neg: float
    exact: bool

    def _need(self, *, positives: bool = True, negatives: bool = False) -> None:
        if positives and self.total_pos <= 0:
            msg = "undefined without positive ground truth"
            raise UndefinedMetricError(msg)
        if negatives and self.total_neg <= 0:
            msg = "undefined without negative ground truth"
            raise UndefinedMetricError(msg)

    def auroc(self) -> float:
        """Area under the ROC curve (needs both classes)."""
        self._need(negatives=True)
        tpr = np.concatenate(([0.0], self.pos / self.total_pos))
        fpr = np.concatenate(([0.0], self.neg / self.total_neg))
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Step-wise area under the PR curve, as scikit-learn (needs positives)."""
        self._need()
        precision = self.pos / (self.pos + self.neg)
        recall_steps = np.diff(np.concatenate(([0.0], self.pos))) / self.total_pos
        return float(np.sum(recall_steps * precision))

    def _f1_index(self) -> int:
        self._need()
        f1 = 2.0 * self.pos / (self.pos + self.neg + self.total_pos)
        return int(np.argmax(f1))  # first = highest threshold among ties

    def f1_max(self) -> tuple[float, float]:
        """The best F1 over thresholds and the threshold reaching it (needs positives)."""
        k = self._f1_index()
        return float(2.0 * self.pos[k] / (self.pos[k] + self.neg[k] + self.total_pos)), float(self.thresholds[k])

    def iou_at_f1_max(self) -> float:
        """``TP / (TP + FP + FN)`` at the F1-max threshold (needs positives)."""
        k = self._f1_index()
        return float(self.pos[k] / (self.neg[k] + self.total_pos))


# ---------------------------------------------------------------- inputs


def _as_stack(array: np.ndarray, name: str) -> np.ndarray:
    """View per-image data as ``N x ...``; a ``N x 1 x H x W`` stack becomes ``N x H x W``."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 0:
        msg = f"{name} must have one entry per image, got a scalar"
        raise ValueError(msg)
    return array


def _as_binary(targets: np.ndarray, name: str) -> np.ndarray:
    if targets.dtype == bool:
        return targets
    binary = targets.astype(bool)
    if not np.array_equal(binary, targets):
        msg = f"{name} must be binary (bool or 0/1); found other values"
        raise ValueError(msg)
    return binary


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = scores.astype(np.float64, copy=False)
    if not np.isfinite(scores).all():
        msg = f"{name} contains NaN or infinite scores"
        raise ValueError(msg)
    return scores


@dataclass(frozen=True)
class _Stack:
    """Scores and binary targets of ``N`` items (images or pixels maps), restricted to ``index``."""

    scores: np.ndarray
    targets: np.ndarray
    index: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray, targets: np.ndarray, index: np.ndarray | None = None) -> _Stack:
        scores, targets = _as_stack(scores, "scores"), _as_stack(targets, "targets")
        if scores.shape != targets.shape:
            msg = f"scores {scores.shape} and targets {targets.shape} differ in shape"
            raise ValueError(msg)
        index = np.arange(len(scores)) if index is None else np.asarray(index, dtype=np.intp)
        return cls(scores, targets, index)

    @property
    def item_size(self) -> int:
        return int(np.prod(self.scores.shape[1:], dtype=np.int64))

    @property
    def size(self) -> int:
        return len(self.index) * self.item_size

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Validated ``(scores float64, targets bool)`` blocks of whole items, in order."""
        per_chunk = max(1, _CHUNK_PIXELS // max(1, self.item_size))
        for start in range(0, len(self.index), per_chunk):
            picked = self.index[start : start + per_chunk]
            yield (
                _check_scores(self.scores[picked], "anomaly scores"),
                _as_binary(self.targets[picked], "ground truth"),
            )


# A weighting turns a block of (scores, targets) into flat (positive mass, negative mass) per score.
_Weigh = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _roc_weights(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = targets.reshape(-1)
    return flat.astype(np.float64), (~flat).astype(np.float64)


def _pro_weights(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each region pixel weighs ``1 / region size``: a region fully predicted positive adds 1 to ``pos``."""
    if targets.ndim != 3:
        msg = f"AU-PRO needs N x H x W maps, got items of shape {targets.shape[1:]}"
        raise ValueError(msg)
    pos = np.empty(targets.shape, dtype=np.float64)
    for i, mask in enumerate(targets):
        labeled, n_regions = ndimage.label(mask, structure=_CONNECTIVITY)
        inverse_size = np.zeros(n_regions + 1)
        inverse_size[1:] = 1.0 / np.bincount(labeled.ravel(), minlength=n_regions + 1)[1:]
        pos[i] = inverse_size[labeled]
    return pos.reshape(-1), (~targets).reshape(-1).astype(np.float64)


# ---------------------------------------------------------------- curves


def _exact_curves(stack: _Stack, weighs: Sequence[_Weigh]) -> list[Curve]:
    """One sort of every score; one cumulative curve per weighting."""
    scores_blocks: list[np.ndarray] = []
    mass_blocks: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for scores, targets in stack.chunks():
        scores_blocks.append(scores.reshape(-1))
        mass_blocks.append([weigh(scores, targets) for weigh in weighs])
    all_scores = np.concatenate(scores_blocks)
    order = np.argsort(all_scores, kind="stable")[::-1]
    all_scores = all_scores[order]
    last_of_tie = np.append(np.diff(all_scores) != 0, True)  # keep the point after all tied scores are in
    curves = []
    for k in range(len(weighs)):
        pos = np.cumsum(np.concatenate([block[k][0] for block in mass_blocks])[order])
        neg = np.cumsum(np.concatenate([block[k][1] for block in mass_blocks])[order])
        thresholds, pos_kept, neg_kept = all_scores[last_of_tie], pos[last_of_tie], neg[last_of_tie]
        curves.append(Curve(thresholds, pos_kept, neg_kept, float(pos[-1]), float(neg[-1]), True))
    return curves


def _spread(sorted_values: np.ndarray, count: int) -> np.ndarray:
    """``count`` order statistics evenly spaced through sorted values, min and max included."""
    if len(sorted_values) == 0:
        return sorted_values
    picks = np.linspace(0, len(sorted_values) - 1, num=min(count, len(sorted_values))).round().astype(np.intp)
    return sorted_values[picks]


def _histogram_edges(stack: _Stack, bins: int) -> np.ndarray:
    """Deterministic bin edges: quantiles of each class's scores (strided samples), plus the min and max."""
    # pass 1: class sizes and the score range
    n_pos, lowest, highest = 0, np.inf, -np.inf
    for scores, targets in stack.chunks():
        n_pos += int(np.count_nonzero(targets))
        lowest, highest = min(lowest, float(scores.min())), max(highest, float(scores.max()))
    n_neg = stack.size - n_pos
    # pass 2: every stride-th score of each class, counted globally so chunking does not matter
    strides = {True: max(1, n_pos // _EDGE_SAMPLE), False: max(1, n_neg // _EDGE_SAMPLE)}
    seen = {True: 0, False: 0}
    samples: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for scores, targets in stack.chunks():
        for cls in (True, False):
            values = scores[targets == cls]
            offset = (-seen[cls]) % strides[cls]
            samples[cls].append(values[offset :: strides[cls]])
            seen[cls] += len(values)
    per_class = max(1, bins // 2)
    edges = [np.array([lowest, highest])]
    edges += [_spread(np.sort(np.concatenate(samples[c])), per_class) for c in (True, False)]
    return np.unique(np.concatenate(edges))


def _histogram_curves(stack: _Stack, weighs: Sequence[_Weigh], bins: int) -> list[Curve]:
    """Shared edges and one binning pass; one curve per weighting, exact at the edges."""
    edges = _histogram_edges(stack, bins)
    masses = [(np.zeros(len(edges)), np.zeros(len(edges))) for _ in weighs]
    # pass 3: mass in each bin [edge_i, edge_i+1); the top bin holds the max
    for scores, targets in stack.chunks():
        which = np.searchsorted(edges, scores.reshape(-1), side="right") - 1
        for (pos_mass, neg_mass), weigh in zip(masses, weighs, strict=True):
            w_pos, w_neg = weigh(scores, targets)
            pos_mass += np.bincount(which, weights=w_pos, minlength=len(edges))
            neg_mass += np.bincount(which, weights=w_neg, minlength=len(edges))
    curves = []
    for pos_mass, neg_mass in masses:
        filled = (pos_mass + neg_mass)[::-1] > 0
        pos, neg = np.cumsum(pos_mass[::-1]), np.cumsum(neg_mass[::-1])
        curves.append(Curve(edges[::-1][filled], pos[filled], neg[filled], float(pos[-1]), float(neg[-1]), False))
    return curves


def _curves(stack: _Stack, weighs: Sequence[_Weigh], max_exact: int, bins: int) -> list[Curve]:
    """Curves of the same scores under several weightings (ROC and PRO share the sort or the binning)."""
    if stack.size == 0:
        msg = "undefined on an empty set"
        raise UndefinedMetricError(msg)
    if bins < 2:
        msg = f"bins must be at least 2, got {bins}"
        raise ValueError(msg)
    if stack.size <= max_exact:
        return _exact_curves(stack, weighs)
    return _histogram_curves(stack, weighs, bins)


def binary_curve(
    scores: np.ndarray, targets: np.ndarray, *, max_exact: int = DEFAULT_MAX_EXACT, bins: int = DEFAULT_BINS
) -> Curve:
    """The ROC/PR curve of scores against binary targets; compute it once, read several metrics off it.

    Args:
        scores: any shape, e.g. ``N`` image scores or ``N x H x W`` anomaly maps.
        targets: the same shape, bool or 0/1.
        max_exact: above this many scores, use the streamed histogram curve (see the module docstring).
        bins: histogram thresholds when streaming.

    Returns:
        The curve, with TP as ``pos`` and FP as ``neg``.
    """
    return _curves(_Stack.of(scores, targets), [_roc_weights], max_exact, bins)[0]


def auroc(scores: np.ndarray, targets: np.ndarray, **approx: int) -> float:
    """Area under the ROC curve; ``approx`` takes ``max_exact`` and ``bins`` (see :func:`binary_curve`)."""
    return binary_curve(scores, targets, **approx).auroc()


def average_precision(scores: np.ndarray, targets: np.ndarray, **approx: int) -> float:
    """Average precision, as scikit-learn's ``average_precision_score``."""
    return binary_curve(scores, targets, **approx).average_precision()


def f1_max(scores: np.ndarray, targets: np.ndarray, **approx: int) -> tuple[float, float]:
    """The maximum F1 over thresholds, and that threshold (predicted positive iff score >= it)."""
    return binary_curve(scores, targets, **approx).f1_max()


def iou_at_f1_max(scores: np.ndarray, targets: np.ndarray, **approx: int) -> float:
    """Pooled ``TP / (TP + FP + FN)`` at the F1-max threshold."""
    return binary_curve(scores, targets, **approx).iou_at_f1_max()


def pro_curve(
    anomaly_maps: np.ndarray,
    gt_masks: np.ndarray,
    *,
    max_exact: int = DEFAULT_MAX_EXACT,
    bins: int = DEFAULT_BINS,
    index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, PRO) curve of the MVTec AD evaluation, from (0, 0) to (1, 1).

    Args:
        anomaly_maps: ``N x H x W`` (or ``N x 1 x H x W``) pixel scores.
        gt_masks: the same shape, bool or 0/1.
        max_exact: above this many pixels, use the streamed histogram curve.
        bins: histogram thresholds when streaming.
        index: the images taking part (all when None).

    Returns:
        Non-decreasing FPR and the PRO at each, both starting at 0 and ending at 1.

    Raises:
        UndefinedMetricError: when there is no ground-truth region or no normal pixel.
    """
    return _pro_points(_curves(_Stack.of(anomaly_maps, gt_masks, index), [_pro_weights], max_exact, bins)[0])


def _pro_points(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) from a curve weighted by :func:`_pro_weights`, with the (0, 0) and (1, 1) ends."""
    if curve.total_pos <= 0 or curve.total_neg <= 0:
        msg = "AU-PRO is undefined without both ground-truth regions and normal pixels"
        raise UndefinedMetricError(msg)
    n_regions = round(curve.total_pos)  # each region contributes exactly 1
    fpr = np.clip(curve.neg / curve.total_neg, None, 1.0)
    pro = np.clip(curve.pos / n_regions, None, 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` on ``[x[0], x_max]``, interpolating ``y`` at ``x_max``."""
    inside = x <= x_max
    area = float(np.trapezoid(y[inside], x[inside]))
    after = int(np.searchsorted(x, x_max, side="right"))
    if 0 < after < len(x) and x[after - 1] < x_max:
        x0, y0, x1, y1 = x[after - 1], y[after - 1], x[after], y[after]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_max) * (x_max - x0)
    return area


def aupro(
    anomaly_maps: np.ndarray,
    gt_masks: np.ndarray,
    *,
    fpr_limit: float = PRO_FPR_LIMIT,
    max_exact: int = DEFAULT_MAX_EXACT,
    bins: int = DEFAULT_BINS,
    index: np.ndarray | None = None,
) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (in [0, 1]).

    Args:
        anomaly_maps: ``N x H x W`` (or ``N x 1 x H x W``) pixel scores.
        gt_masks: the same shape, bool or 0/1; regions are 8-connected components per image.
        fpr_limit: the integration limit (MVTec AD: 0.3).
        max_exact: above this many pixels, use the streamed histogram curve.
        bins: histogram thresholds when streaming.
        index: the images taking part (all when None).

    Returns:
        The normalised AU-PRO.
    """
    _check_fpr_limit(fpr_limit)
    fpr, pro = pro_curve(anomaly_maps, gt_masks, max_exact=max_exact, bins=bins, index=index)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        msg = f"fpr_limit must lie in (0, 1], got {fpr_limit}"
        raise ValueError(msg)


def accuracy(predictions: Sequence[object], targets: Sequence[object]) -> float:
    """The fraction of equal entries.

    Raises:
        UndefinedMetricError: when there is nothing to compare.
    """
    if len(predictions) != len(targets):
        msg = f"{len(predictions)} predictions for {len(targets)} targets"
        raise ValueError(msg)
    if len(targets) == 0:
        msg = "accuracy is undefined without predictions"
        raise UndefinedMetricError(msg)
    return sum(p == t for p, t in zip(predictions, targets, strict=True)) / len(targets)


# ---------------------------------------------------------------- the evaluate job's entry point

_KEY_UNSAFE = re.compile(r"[^\w\-. /]")


def metric_key(metric: str, defect_type: str | None = None) -> str:
    """The MLflow key: ``metric`` or ``metric.<defect type>`` (characters MLflow refuses become ``_``).

    Example:
        >>> metric_key("pixel_ap", "broken_large")
        'pixel_ap.broken_large'
    """
    return metric if defect_type is None else f"{metric}.{_KEY_UNSAFE.sub('_', defect_type)}"


@dataclass(frozen=True)
class _Fields:
    """The validated per-image fields of a test set, under anomalib's names (None when not given)."""

    gt_label: np.ndarray  # N bool
    defect_type: np.ndarray  # N object
    anomaly_map: np.ndarray | None = None  # N x H x W
    gt_mask: np.ndarray | None = None  # N x H x W
    pred_score: np.ndarray | None = None  # N float
    pred_type: np.ndarray | None = None  # N object, None where not predicted

    @classmethod
    def collect(
        cls,
        anomaly_maps: np.ndarray | None,
        gt_masks: np.ndarray | None,
        image_scores: np.ndarray | None,
        labels: np.ndarray,
        defect_types: Sequence[str],
        pred_types: Sequence[str | None] | None,
    ) -> _Fields:
        fields = cls(
            gt_label=_as_binary(np.asarray(labels).reshape(-1), "labels"),
            defect_type=np.asarray(defect_types, dtype=object).reshape(-1),
            anomaly_map=None if anomaly_maps is None else _as_stack(anomaly_maps, "anomaly_maps"),
            gt_mask=None if gt_masks is None else _as_stack(gt_masks, "gt_masks"),
            pred_score=None if image_scores is None else np.asarray(image_scores, dtype=np.float64).reshape(-1),
            pred_type=None if pred_types is None else np.asarray(pred_types, dtype=object).reshape(-1),
        )
        n = fields.n_images
        for name in ("defect_type", "anomaly_map", "gt_mask", "pred_score", "pred_type"):
            value = getattr(fields, name)
            if value is not None and len(value) != n:
                msg = f"{name} has {len(value)} entries for {n} labels"
                raise ValueError(msg)
        if fields.anomaly_map is not None and fields.gt_mask is not None:
            if fields.anomaly_map.shape != fields.gt_mask.shape:
                msg = f"anomaly_maps {fields.anomaly_map.shape} and gt_masks {fields.gt_mask.shape} differ in shape"
                raise ValueError(msg)
        return fields

    @property
    def n_images(self) -> int:
        return len(self.gt_label)

    def missing(self, metric: str) -> list[str]:
        return [f for f in METRIC_FIELDS[metric] if getattr(self, f) is None]

    def predicted(self) -> np.ndarray:
        """Which images carry a predicted defect type."""
        if self.pred_type is None:
            return np.zeros(self.n_images, dtype=bool)
        return np.array([p is not None for p in self.pred_type], dtype=bool)


def _pixel_curves(
    fields: _Fields, index: np.ndarray, with_pro: bool, approx: dict[str, int]
) -> tuple[Curve, Curve | None] | UndefinedMetricError:
    """The ROC curve of the pixels of ``index`` and, when asked, their PRO curve, from one sort or pass."""
    weighs: list[_Weigh] = [_roc_weights, _pro_weights] if with_pro else [_roc_weights]
    try:
        curves = _curves(_Stack.of(fields.anomaly_map, fields.gt_mask, index), weighs, **approx)
    except UndefinedMetricError as err:
        return err
    return curves[0], (curves[1] if with_pro else None)


def _score_subset(
    fields: _Fields, metrics: Sequence[str], index: np.ndarray, cls_index: np.ndarray, approx: dict[str, int]
) -> dict[str, float | str]:
    """Compute metrics on the images in ``index`` (``cls_index`` for accuracy); a reason replaces a failure."""
    out: dict[str, float | str] = {}
    pixel: tuple[Curve, Curve | None] | UndefinedMetricError | None = None  # built once, for all pixel metrics
    for metric in metrics:
        try:
            if metric.startswith("pixel_"):
                if pixel is None:
                    pixel = _pixel_curves(fields, index, "pixel_aupro" in metrics, approx)
                if isinstance(pixel, UndefinedMetricError):
                    raise pixel
                roc, pro = pixel
                if metric == "pixel_aupro" and pro is not None:
                    fpr, overlap = _pro_points(pro)
                    out[metric] = _area_up_to(fpr, overlap, PRO_FPR_LIMIT) / PRO_FPR_LIMIT
                else:
                    out[metric] = _from_curve(roc, metric)
            elif metric.startswith("image_"):
                curve = binary_curve(fields.pred_score[index], fields.gt_label[index], max_exact=max(len(index), 1))
                out[metric] = _from_curve(curve, metric)
            else:  # cls_accuracy
                out[metric] = accuracy(list(fields.pred_type[cls_index]), list(fields.defect_type[cls_index]))
        except UndefinedMetricError as err:
            out[metric] = str(err)
    return out


def _from_curve(curve: Curve, metric: str) -> float:
    kind = metric.split("_", 1)[1]
    if kind == "auroc":
        return curve.auroc()
    if kind == "ap":
        return curve.average_precision()
    if kind == "f1max":
        return curve.f1_max()[0]
    return curve.iou_at_f1_max()


def score_detection(
    anomaly_maps: np.ndarray | None,
    gt_masks: np.ndarray | None,
    image_scores: np.ndarray | None,
    labels: np.ndarray,
    defect_types: Sequence[str],
    *,
    pred_types: Sequence[str | None] | None = None,
    metrics: Sequence[str] | None = None,
    per_type: bool = True,
    max_exact: int = DEFAULT_MAX_EXACT,
    bins: int = DEFAULT_BINS,
) -> dict[str, float]:
    """Score a detector on a test set under the stable MLflow names, overall and per defect type.

    Per-type protocol: ``<metric>.<type>`` is computed on the images of that type together with *all* normal
    images (``labels == 0``), the usual per-category protocol, so a type's image AUROC asks "does this
    defect outscore the normals". ``cls_accuracy.<type>`` uses only that type's images. Types are the
    distinct ``defect_types`` of anomalous images.

    ``cls_accuracy`` compares ``pred_types`` with ``defect_types`` over the images with a prediction (pass
    None for images the classifier did not see, e.g. normals when it only classifies defects).

    Args:
        anomaly_maps: ``N x H x W`` (or ``N x 1 x H x W``) pixel scores, or None.
        gt_masks: ``N x H x W`` bool (or 0/1) masks, all-zero for normal images, or None.
        image_scores: ``N`` image scores (``pred_score``), or None.
        labels: ``N`` labels, 0 normal, 1 anomalous.
        defect_types: ``N`` defect type names (normal images: "good").
        pred_types: ``N`` predicted defect types (None where not predicted), or None.
        metrics: the metrics to compute; by default every stable metric whose fields are given. Naming a
            metric whose fields are missing raises.
        per_type: also compute the ``<metric>.<type>`` breakdown.
        max_exact: pixel sets larger than this use the streamed histogram curve (see the module docstring).
        bins: histogram thresholds when streaming.

    Returns:
        ``{key: value}``; undefined metrics (e.g. AUROC on one class) are omitted and logged as warnings.

    Raises:
        ValueError: on a missing field for a requested metric, an unknown metric or inconsistent shapes.
    """
    fields = _Fields.collect(anomaly_maps, gt_masks, image_scores, labels, defect_types, pred_types)
    if metrics is None:
        metrics = [m for m in STABLE_METRICS if not fields.missing(m)]
    unknown = sorted(set(metrics) - set(METRIC_FIELDS))
    if unknown:
        msg = f"unknown metrics {unknown}; known: {list(METRIC_FIELDS)}"
        raise ValueError(msg)
    for metric in metrics:
        if missing := fields.missing(metric):
            msg = f"{metric} reads the fields {list(METRIC_FIELDS[metric])}; missing: {missing}"
            raise ValueError(msg)

    # (subset name, images for detection metrics, images for cls_accuracy)
    predicted, anomalous = fields.predicted(), fields.gt_label
    subsets = [(None, np.arange(fields.n_images), np.flatnonzero(predicted))]
    if per_type:
        for defect_type in sorted({str(t) for t in fields.defect_type[anomalous]}):
            of_type = anomalous & (fields.defect_type == defect_type)
            subsets.append((defect_type, np.flatnonzero(of_type | ~anomalous), np.flatnonzero(of_type & predicted)))

    approx = {"max_exact": max_exact, "bins": bins}
    scores: dict[str, float] = {}
    for defect_type, index, cls_index in subsets:
        for metric, value in _score_subset(fields, metrics, index, cls_index, approx).items():
            key = metric_key(metric, defect_type)
            if isinstance(value, str):
                logger.warning("omitting %s: %s", key, value)
            else:
                scores[key] = value
    return scores
