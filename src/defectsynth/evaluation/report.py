"""Score reports of the evaluate job: text tables, ``scores.md``, curve and prediction figures, MLflow read-back.

Every evaluation is one MLflow run (tags ``job=evaluate``, ``product``, ``method``, ``detector`` and, for a
detector, ``detector_seed``; metrics under the stable names of :mod:`defectsynth.evaluation.metrics`).
:func:`rows_from_mlflow` reads them back as :class:`ResultRow`; the table functions and :func:`markdown_report`
format any list of rows, so the evaluate job can build its report from its own results without a round trip
through MLflow. Rows of one (product, method, detector) from several seeds are one cell, ``mean±std`` over the
seeds; a method's ``mean`` row averages over products per seed first, so its spread is that of the seed-level
means. Missing values print ``-``: metrics that are undefined are absent from a run, never faked.

Importing this module is light (numpy only); matplotlib, PIL and MLflow are imported inside the functions
that need them.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np

from defectsynth.core.figures import defect_tiles, grid, overlay
from defectsynth.core.plots import render
from defectsynth.core.text_table import table
from defectsynth.core.tracking_errors import TrackingStoreError, is_not_found
from defectsynth.evaluation.metrics import STABLE_METRICS, Curve, UndefinedMetricError, binary_curve

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from defectsynth.evaluation.data import RealImages
    from defectsynth.evaluation.detectors import Predictions

logger = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "defectsynth-"
BASELINES = ("none", "perlin", "croppaste")  # listed first, in this order; other methods follow alphabetically
DETECTORS = ("segmenter", "classifier", "diffusionad")  # report order; unknown detectors follow alphabetically
GENERATION = "generation"  # the detector tag of a method's dataset-quality run
QUALITY_METRICS = ("is", "ic_lpips", "kid")
GENERATION_METRICS = (
    "mask_alignment",
    "refined_cond_iou",
    "refined_cond_coverage",
    "mask_shape_distance",
    "appearance_distance",
    "psnr_outside",
    "masks_total",
    "masks_empty",
    "masks_tiny",
    "masks_outside_foreground",
    "ms_per_image",
    *QUALITY_METRICS,
)
FIDELITY_METRICS = ("mask_shape_distance", "appearance_distance")  # also per type: ``<metric>.<type>``
COUNT_METRICS = frozenset({"masks_total", "masks_empty", "masks_tiny", "masks_outside_foreground"})
NOT_COMPUTED_TAG = "quality_not_computed"  # tag of a generation run: why IS / IC-LPIPS / KID are absent
NOTE_TAGS = (NOT_COMPUTED_TAG,)  # run tags copied into ResultRow.notes
TYPE_METRICS = ("pixel_ap", "image_auroc", "cls_accuracy")  # per-type metric of a detector by default: first present
HEADLINE_METRICS = ("pixel_ap", "cls_accuracy", "image_auroc")  # a detector's separation metric: first present
SEED_TAG = "detector_seed"  # tag of a detector's evaluate run: its evaluate.seeds entry
FOLD_TAG = "split_fold"  # tag of an evaluate run under the two-fold protocol: the fold that trained the generator
FOLDS_NOTE = "folds_averaged"  # ResultRow.notes key of a row that average_folds merged from both folds
MISSING = "-"
MEAN = "mean"
TYPE_MEAN = "type_mean"


@dataclass(frozen=True)
class ResultRow:
    """The scores of one (product, method, detector): an evaluate run's metrics and notes.

    Attributes:
        product: the product (``wood``).
        method: the generator (``perlin``), or ``none`` for no synthetic data.
        detector: ``segmenter``, ``classifier``, ``diffusionad``, or ``generation`` for dataset quality.
        metrics: MLflow key to value; undefined metrics are absent.
        run_id: the MLflow run, when the row came from one.
        notes: explanatory run tags, e.g. ``quality_not_computed`` with the reason.
        seed: the detector's ``evaluate.seeds`` entry; None for generation rows and runs without the tag.
        fold: the two-fold protocol's training fold (1 or 2); None outside it, and once ``average_folds`` merged both.
    """

    product: str
    method: str
    detector: str
    metrics: dict[str, float]
    run_id: str | None = None
    notes: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    fold: int | None = None


@dataclass(frozen=True)
class Spread:
    """A value's mean over seeds and its sample standard deviation (None with fewer than two seeds)."""

    mean: float
    std: float | None
    seeds: int

    def cell(self) -> str:
        """``mean±std`` with 3 decimals, or the plain mean when there is no spread."""
        return f"{self.mean:.3f}" if self.std is None else f"{self.mean:.3f}±{self.std:.3f}"


# ---------------------------------------------------------------- ordering and cells


def method_order(methods: Iterable[str]) -> list[str]:
    """Distinct methods with the baselines ``none``, ``perlin``, ``croppaste`` first, then alphabetically."""
    distinct = set(methods)
    return [m for m in BASELINES if m in distinct] + sorted(distinct - set(BASELINES))


def detector_order(detectors: Iterable[str]) -> list[str]:
    """Distinct detectors in report order: segmenter, classifier, diffusionad, then others alphabetically."""
    distinct = set(detectors)
    return [d for d in DETECTORS if d in distinct] + sorted(distinct - set(DETECTORS))


def _seed_key(seed: int | None) -> tuple[bool, int]:
    return seed is not None, seed or 0


def seeds_of(rows: Iterable[ResultRow]) -> list[int | None]:
    """The distinct seeds of ``rows``, ascending; None (not recorded) first."""
    return sorted({r.seed for r in rows}, key=_seed_key)


def _sorted(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Rows by product, then method in :func:`method_order`, then seed."""
    rows = list(rows)
    rank = {m: i for i, m in enumerate(method_order(r.method for r in rows))}
    return sorted(rows, key=lambda r: (r.product, rank[r.method], _seed_key(r.seed)))


def _value(row: ResultRow, key: str) -> float | None:
    value = row.metrics.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def _cell(value: float | None, key: str = "") -> str:
    if value is None:
        return MISSING
    if key in COUNT_METRICS and float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _of(rows: Iterable[ResultRow], detector: str) -> list[ResultRow]:
    return [r for r in rows if r.detector == detector]


# ---------------------------------------------------------------- seeds


def spread(values: Iterable[float | None]) -> Spread | None:
    """Mean and sample standard deviation (ddof 1) of the present values; None when none is present."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return Spread(float(np.mean(present)), std, len(present))


Values = Callable[[ResultRow], Iterable[float | None]]  # the values a row contributes to an average


def seed_spread(rows: Iterable[ResultRow], values: Values) -> Spread | None:
    """Per seed the mean of ``values`` over that seed's rows, then mean±std of those means over the seeds.

    Rows of one (product, method, detector) give a cell; a method's rows of every product give its ``mean``
    row, whose spread is then that of the method's seed-level means over products.
    """
    by_seed: dict[int | None, list[float | None]] = {}
    for r in rows:
        by_seed.setdefault(r.seed, []).extend(values(r))
    return spread(_mean(v) for v in by_seed.values())


def metric_of(key: str) -> Values:
    """The row's value of ``key`` (none when absent)."""
    return lambda r: [_value(r, key)]


def types_of(metric: str) -> Values:
    """The row's ``<metric>.<type>`` values, one per defect type it has."""
    return lambda r: [_value(r, f"{metric}.{t}") for t in defect_types([r], metric)]


def _spread_cell(value: Spread | None) -> str:
    return MISSING if value is None else value.cell()


def _groups(rows: Iterable[ResultRow]) -> dict[tuple[str, str], list[ResultRow]]:
    """Rows by (product, method), in report order; each list holds one row per seed."""
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in _sorted(rows):
        groups.setdefault((r.product, r.method), []).append(r)
    return groups


def method_spreads(rows: Sequence[ResultRow], values: Values) -> dict[str, Spread | None]:
    """Each method's :func:`seed_spread` of ``values`` over all its rows, in :func:`method_order`."""
    return {m: seed_spread([r for r in rows if r.method == m], values) for m in method_order(r.method for r in rows)}


def _pair(high: tuple[str, Spread], low: tuple[str, Spread], over: str = "seed") -> str:
    """Whether two methods' means differ by more than the larger of their spreads over ``over`` (seeds, draws)."""
    (a, sa), (b, sb) = high, low
    difference = sa.mean - sb.mean
    if sa.std is None or sb.std is None:
        lone = a if sa.std is None else b
        unknown = f"but {lone} has one {over}, so no spread is known"
        return f"{a} ~ {b}: difference {difference:.3f}, {unknown}; not a ranking"
    width = max(sa.std, sb.std)
    if difference > width:
        return f"{a} > {b} ({sa.mean:.3f} vs {sb.mean:.3f}, spread {sa.std:.3f}/{sb.std:.3f})"
    return f"{a} ~ {b}: difference {difference:.3f} is within the {over}s' spread {width:.3f}, not a ranking"


def separation_lines(spreads: Mapping[str, Spread | None], over: str = "seed") -> list[str]:
    """For methods ordered by mean, whether each adjacent pair differs by more than the larger std over ``over``.

    Returns:
        One sentence per adjacent pair, or one sentence saying that no spread is known (a single seed) and
        the differences are not a ranking; none with fewer than two methods having a value.
    """
    known = sorted(((m, s) for m, s in spreads.items() if s is not None), key=lambda item: -item[1].mean)
    if len(known) < 2:
        return []
    if all(s.std is None for _, s in known):
        listing = ", ".join(f"{m} {s.mean:.3f}" for m, s in known)
        return [f"single {over}: no spread is known, so the differences ({listing}) are not a ranking"]
    return [_pair(high, low, over) for high, low in pairwise(known)]


DrawSpreads = dict[str, tuple[list[Spread | None], Spread | None]]


def draw_spreads(draws: Sequence[Sequence[ResultRow]], values: Values, detector: str = "segmenter") -> DrawSpreads:
    """Per method: its seed spread of ``values`` in each draw, and mean±std over the draws of those seed means.

    A draw is one whole run of a configuration under another ``seed`` (its base, fits and datasets); the seeds'
    spread inside a run does not cover what changes between draws.
    """
    mine = [_of(rows, detector) for rows in draws]
    spreads: DrawSpreads = {}
    for method in method_order(r.method for rows in mine for r in rows):
        per_draw = [seed_spread([r for r in rows if r.method == method], values) for rows in mine]
        spreads[method] = (per_draw, spread(s.mean if s else None for s in per_draw))
    return spreads


def draws_table(spreads: DrawSpreads, names: Sequence[str]) -> str:
    """One row per method: its mean±std over seeds in each draw (columns ``names``), then over the draws."""
    body = [[m, *(_spread_cell(s) for s in per_draw), _spread_cell(over)] for m, (per_draw, over) in spreads.items()]
    return table(["method", *names, "over draws"], body)


def _seed_count(rows: Iterable[ResultRow]) -> str:
    count = len(seeds_of(rows))
    return f"{count} seed" if count == 1 else f"{count} seeds"


def seeds_line(rows: Sequence[ResultRow]) -> str:
    """How many seeds each detector run had, and what the cells therefore show."""
    seeds = seeds_of(r for r in rows if r.detector != GENERATION)
    if not seeds or seeds == [None]:
        return "Detector seeds not recorded (one run per product, method and detector): no spread is known."
    named = ", ".join(str(s) for s in seeds if s is not None)
    if len(seeds) == 1:
        return (
            f"1 seed ({named}) per detector run: cells are single runs, no spread is known, and differences "
            "between methods are not a ranking."
        )
    return (
        f"{len(seeds)} seeds ({named}) per detector run: cells are mean±std over the seeds (sample std); "
        f"`{MEAN}` rows are computed per seed, then mean±std over the seeds."
    )


# ---------------------------------------------------------------- tables


def comparison_table(rows: Sequence[ResultRow], detector: str, metrics: Sequence[str]) -> str:
    """One detector's scores: product x method rows, then per-method means over the products with the metric.

    A cell is ``mean±std`` over the seeds of its (product, method), a ``mean`` row's over the method's seed-level
    means (:func:`seed_spread`); with one seed, plain values.

    Args:
        rows: results of any detectors; only ``detector``'s are shown.
        detector: the detector tag.
        metrics: the columns (MLflow keys).

    Returns:
        A text table (3 decimals, ``-`` where a run lacks the metric), or a line saying there are no rows.
    """
    mine = _of(rows, detector)
    if not mine:
        return f"no results for detector {detector!r}"
    body = [
        [p, m, *(_spread_cell(seed_spread(g, metric_of(k))) for k in metrics)] for (p, m), g in _groups(mine).items()
    ]
    means = [method_spreads(mine, metric_of(k)) for k in metrics]
    body += [
        [MEAN, method, *(_spread_cell(s[method]) for s in means)] for method in method_order(r.method for r in mine)
    ]
    return table(["product", "method", *metrics], body)


def defect_types(rows: Iterable[ResultRow], metric: str) -> list[str]:
    """The sorted defect types of the ``<metric>.<type>`` keys in ``rows``."""
    prefix = f"{metric}."
    return sorted({k[len(prefix) :] for r in rows for k in r.metrics if k.startswith(prefix)})


def defect_type_table(rows: Sequence[ResultRow], detector: str, metric: str = "pixel_ap") -> str:
    """``metric`` per defect type: one block per product, a row per method, a column per defect type.

    Products have their own defect types, so each block lists only its product's types (from the
    ``<metric>.<type>`` keys), after the overall ``metric``. Cells are ``mean±std`` over seeds, as in
    :func:`comparison_table`. With ``detector="generation"`` it shows a dataset's per-type fidelity distances.

    Returns:
        The blocks separated by blank lines, each headed by the product, or a line saying there are none.
    """
    mine = _of(rows, detector)
    blocks = []
    for product in sorted({r.product for r in mine}):
        of_product = _sorted(r for r in mine if r.product == product)
        types = defect_types(of_product, metric)
        if not types:
            continue
        keys = [metric, *(f"{metric}.{t}" for t in types)]
        body = [
            [m, *(_spread_cell(seed_spread(g, metric_of(k))) for k in keys)]
            for (_, m), g in _groups(of_product).items()
        ]
        blocks.append(f"{product}\n" + table(["method", "all", *types], body))
    if not blocks:
        return f"no per-type {metric} results for detector {detector!r}"
    return "\n\n".join(blocks)


def headline_table(rows: Sequence[ResultRow], detector: str = "segmenter", metric: str = "pixel_ap") -> str:
    """One row per method: ``metric`` over products, over (product, type) pairs, and per pooled defect type.

    Columns: the number of seeds, ``metric`` (per seed the mean over products), ``type_mean`` (per seed the
    mean of ``<metric>.<type>`` over every (product, type) pair) and one column per defect type name (per seed
    the mean over the products having that type); each is then ``mean±std`` over the seeds.

    Returns:
        A text table, or a line saying there are no rows.
    """
    mine = _of(rows, detector)
    if not mine:
        return f"no results for detector {detector!r}"
    types = defect_types(mine, metric)
    columns = [metric_of(metric), types_of(metric), *(metric_of(f"{metric}.{t}") for t in types)]
    body = []
    for method in method_order(r.method for r in mine):
        of_method = [r for r in mine if r.method == method]
        cells = [_spread_cell(seed_spread(of_method, values)) for values in columns]
        body.append([method, str(len(seeds_of(of_method))), *cells])
    return table(["method", "seeds", metric, TYPE_MEAN, *types], body)


def headline_metric(rows: Sequence[ResultRow], metric: str | None = None) -> str | None:
    """The metric methods are compared on: ``metric`` if present, else the first of :data:`HEADLINE_METRICS`."""
    present = {k for r in rows for k in r.metrics}
    return next((m for m in ([metric] if metric else []) + list(HEADLINE_METRICS) if m in present), None)


def fidelity_table(rows: Sequence[ResultRow], distance: str) -> str:
    """A fidelity distance of the generated datasets per defect type: a block per product, a row per method."""
    return defect_type_table(rows, GENERATION, distance)


def not_computed_lines(rows: Iterable[ResultRow]) -> list[str]:
    """One line per distinct reason why IS / IC-LPIPS / KID were not computed, naming product/method."""
    reasons: dict[str, list[str]] = {}
    for r in _sorted(rows):
        if reason := r.notes.get(NOT_COMPUTED_TAG):
            reasons.setdefault(reason, []).append(f"{r.product}/{r.method}")
    return [f"IS, IC-LPIPS and KID not computed for {', '.join(runs)}: {reason}" for reason, runs in reasons.items()]


def _generation_scores(rows: Sequence[ResultRow]) -> str:
    body = [[r.product, r.method, *(_cell(_value(r, m), m) for m in GENERATION_METRICS)] for r in rows]
    return table(["product", "method", *GENERATION_METRICS], body)


def generation_table(rows: Sequence[ResultRow]) -> str:
    """Dataset quality of each (product, method): mask checks, speed, and IS / IC-LPIPS / KID when computed.

    Returns:
        The table, followed by one line per reason the image-quality metrics were not computed.
    """
    mine = _sorted(_of(rows, GENERATION))
    if not mine:
        return "no dataset-quality (generation) results"
    return "\n".join([_generation_scores(mine), *not_computed_lines(mine)])


def report_metrics(rows: Iterable[ResultRow]) -> list[str]:
    """The stable metrics present in at least one of ``rows``, in their canonical order."""
    present = {k for r in rows for k in r.metrics}
    return [m for m in STABLE_METRICS if m in present]


def type_metric(rows: Sequence[ResultRow], metric: str | None = None) -> str | None:
    """The per-type metric to show: ``metric`` if given, else the first of :data:`TYPE_METRICS` with types."""
    for candidate in [metric] if metric else TYPE_METRICS:
        if defect_types(rows, candidate):
            return candidate
    return None


def _fenced(text: str) -> str:
    return f"```text\n{text}\n```"


def _separation(title: str, spreads: Mapping[str, Spread | None]) -> list[str]:
    """Markdown lines: the separation sentences under a comparison, or none with fewer than two methods."""
    sentences = separation_lines(spreads)
    return [f"Separation on {title}:", "", *(f"- {s}" for s in sentences), ""] if sentences else []


def headline(rows: Sequence[ResultRow], metric: str | None = None) -> list[str]:
    """Markdown lines: :func:`headline_table` of the segmenter (else the first detector) and its separation."""
    detectors = detector_order(r.detector for r in rows if r.detector != GENERATION)
    if not detectors:
        return []
    detector = "segmenter" if "segmenter" in detectors else detectors[0]
    mine = _of(rows, detector)
    chosen = type_metric(mine, metric) or headline_metric(mine, metric)
    if chosen is None:
        return []
    lines = [
        f"## Headline: {detector} {chosen} ({_seed_count(mine)})",
        "",
        f"Per method: `{chosen}` averaged over products, `{TYPE_MEAN}` over (product, defect type) pairs, and per "
        "defect type over the products having it; each per seed, then mean±std over the seeds.",
        "",
        _fenced(headline_table(mine, detector, chosen)),
        "",
        *_separation(f"mean {chosen}", method_spreads(mine, metric_of(chosen))),
    ]
    if defect_types(mine, chosen):
        lines += _separation(f"{TYPE_MEAN} of {chosen}", method_spreads(mine, types_of(chosen)))
    return lines


def markdown_report(rows: Sequence[ResultRow], metric: str | None = None) -> str:
    """The whole score report as Markdown (``scores.md``): the headline, each detector's tables, dataset quality.

    Args:
        rows: results, e.g. from :func:`rows_from_mlflow`.
        metric: the per-defect-type metric; None picks per detector the first of ``pixel_ap``,
            ``image_auroc``, ``cls_accuracy`` that has per-type values.

    Returns:
        Markdown text ending with a newline.
    """
    lines = ["# Scores", ""]
    if not rows:
        return "\n".join([*lines, "No evaluation results.", ""])
    products = sorted({r.product for r in rows})
    methods = method_order(r.method for r in rows)
    lines += [
        f"{len(rows)} result(s); products: {', '.join(products)}; methods: {', '.join(methods)}. "
        f"{seeds_line(rows)} `{MEAN}` rows average over the products that have the metric; "
        f"`{MISSING}`: no value (metrics undefined on a run's data are not logged). A difference between "
        "methods counts as a ranking only when it exceeds the larger of the two methods' seed std."
        + folds_sentence(rows),
        "",
        *headline(rows, metric),
    ]
    for detector in detector_order(r.detector for r in rows if r.detector != GENERATION):
        mine = _of(rows, detector)
        title = f"## {detector} ({_seed_count(mine)})"
        lines += [title, "", _fenced(comparison_table(mine, detector, report_metrics(mine))), ""]
        if separated := headline_metric(mine):
            lines += _separation(f"mean {separated}", method_spreads(mine, metric_of(separated)))
        chosen = type_metric(mine, metric)
        if chosen is not None:
            lines += [
                f"### {detector}: {chosen} per defect type",
                "",
                _fenced(defect_type_table(mine, detector, chosen)),
            ]
            lines.append("")
    generation = _of(rows, GENERATION)
    if generation:
        generation = _sorted(generation)
        lines += ["## Dataset quality (generation)", "", _fenced(_generation_scores(generation)), ""]
        if notes := not_computed_lines(generation):
            lines += [*(f"- {n}" for n in notes), ""]
        for distance in FIDELITY_METRICS:
            if defect_types(generation, distance):
                lines += [f"### {distance} per defect type", "", _fenced(fidelity_table(generation, distance)), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def save_png(array: np.ndarray, path: Path | str) -> Path:
    """Write an RGB uint8 image (or a bool mask) as PNG, creating parent directories; returns the path."""
    from defectsynth.storage.sample import encode_png

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.ascontiguousarray(array)))
    return path


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points evenly spaced along the curve's length, keeping both endpoints."""
    if len(x) <= max_points:
        return x, y
    length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))))
    if length[-1] > 0:
        index = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    else:
        index = np.linspace(0, len(x) - 1, max_points).round().astype(int)
    index = np.unique(np.clip(index, 0, len(x) - 1))
    index[0], index[-1] = 0, len(x) - 1
    index = np.unique(index)
    return x[index], y[index]


def curve_points(curve: Curve, kind: Literal["roc", "pr"], max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Plottable points of a metrics :class:`Curve`, at most ``max_points`` of them, endpoints kept.

    ROC: (FPR, TPR) from (0, 0) to (1, 1). PR: (recall, precision), starting at recall 0 with precision 1
    as scikit-learn's ``precision_recall_curve``. Points are picked evenly along the curve's length, so the
    shape survives the thinning of a curve with one point per pixel score.

    Raises:
        UndefinedMetricError: a ROC curve without both classes, a PR curve without positives.
        ValueError: an unknown kind, or ``max_points`` below 2.
    """
    if kind not in ("roc", "pr"):
        msg = f"unknown curve kind {kind!r}; expected 'roc' or 'pr'"
        raise ValueError(msg)
    if max_points < 2:
        msg = f"max_points must be at least 2, got {max_points}"
        raise ValueError(msg)
    pos, neg = np.asarray(curve.pos, dtype=np.float64), np.asarray(curve.neg, dtype=np.float64)
    if curve.total_pos <= 0 or (kind == "roc" and curve.total_neg <= 0):
        msg = f"a {kind.upper()} curve is undefined without {'both classes' if kind == 'roc' else 'positives'}"
        raise UndefinedMetricError(msg)
    if kind == "roc":
        x = np.concatenate(([0.0], neg / curve.total_neg, [1.0]))
        y = np.concatenate(([0.0], pos / curve.total_pos, [1.0]))
    else:
        predicted = pos + neg
        precision = np.divide(pos, predicted, out=np.ones_like(pos), where=predicted > 0)
        x = np.concatenate(([0.0], pos / curve.total_pos))
        y = np.concatenate(([1.0], precision))
    keep = np.concatenate(([True], (np.diff(x) != 0) | (np.diff(y) != 0)))  # drop repeated points
    return _downsample(x[keep], y[keep], max_points)


def curves_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], kind: Literal["roc", "pr"], title: str
) -> np.ndarray:
    """ROC (FPR, TPR, with the chance diagonal) or PR (recall, precision) curves on one plot, as an image.

    Args:
        curves: legend label (with the area, e.g. ``"perlin (AUROC 0.912)"``) to ``(x, y)`` points, such as
            those of :func:`curve_points`.
        kind: ``"roc"`` or ``"pr"``.
        title: the plot title.

    Returns:
        An ``H x W x 3`` uint8 image (500 x 400 pixels).
    """
    if kind not in ("roc", "pr"):
        msg = f"unknown curve kind {kind!r}; expected 'roc' or 'pr'"
        raise ValueError(msg)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads

    figure = Figure(figsize=(5, 4), dpi=100)
    axes = figure.add_subplot()
    if kind == "roc":
        axes.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
        axes.set(xlabel="false positive rate", ylabel="true positive rate")
    else:
        axes.set(xlabel="recall", ylabel="precision")
    for label, (x, y) in curves.items():
        axes.plot(np.asarray(x), np.asarray(y), linewidth=1.5, label=label)
    axes.set(xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    if curves or kind == "roc":
        axes.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    figure.tight_layout()
    return render(figure)


def heatmap(maps: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Anomaly maps in [0, 1] (any shape; values outside are clipped) coloured as RGB uint8."""
    from matplotlib import colormaps

    values = np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float64)), 0.0, 1.0)
    lut = (colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return lut[(values * 255).round().astype(np.intp)]


LABEL_FILL = (235, 235, 235)


def _with_labels(canvas: np.ndarray, labels: Sequence[str], row_height: int, pad: int) -> np.ndarray:
    """``canvas`` with a left margin holding each row's label, vertically centred on the row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max(int(font.getbbox(label)[2]) for label in labels) + 2 * pad if labels else 0
    image = Image.new("RGB", (canvas.shape[1] + width, canvas.shape[0]))
    image.paste(Image.fromarray(canvas), (width, 0))
    draw = ImageDraw.Draw(image)
    for r, label in enumerate(labels):
        top, bottom = font.getbbox(label)[1::2]
        y = pad + r * (row_height + pad) + (row_height - (bottom - top)) // 2 - top
        draw.text((pad, y), label, fill=LABEL_FILL, font=font)
    return np.asarray(image)


def prediction_grid(
    images: np.ndarray,
    gt_masks: np.ndarray,
    anomaly_maps: np.ndarray,
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """One row per image: the image | its ground truth (tinted red) | the anomaly map (jet) | map over image.

    Args:
        images: ``N x H x W x 3`` uint8.
        gt_masks: ``N x H x W`` bool.
        anomaly_maps: ``N x H x W`` scores in [0, 1] (values outside are clipped).
        labels: one caption per row (e.g. ``"crack 003"``), drawn in a left margin; None for none.
        alpha: weight of the heat map in the last column.

    Returns:
        An RGB uint8 image.
    """
    images, gt_masks, anomaly_maps = np.asarray(images), np.asarray(gt_masks, dtype=bool), np.asarray(anomaly_maps)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        msg = f"images must be N x H x W x 3 uint8, got {images.shape} {images.dtype}"
        raise ValueError(msg)
    if gt_masks.shape != images.shape[:3] or anomaly_maps.shape != images.shape[:3]:
        msg = f"gt_masks {gt_masks.shape} and anomaly_maps {anomaly_maps.shape} must be {images.shape[:3]}"
        raise ValueError(msg)
    if labels is not None and len(labels) != len(images):
        msg = f"{len(labels)} labels for {len(images)} images"
        raise ValueError(msg)
    heat = heatmap(anomaly_maps)
    blended = ((1 - alpha) * images.astype(np.float32) + alpha * heat.astype(np.float32)).round().astype(np.uint8)
    pad = 2
    canvas = grid(
        [
            [image, overlay(image, mask), h, b]
            for image, mask, h, b in zip(images, gt_masks, heat, blended, strict=True)
        ],
        pad=pad,
    )
    return canvas if labels is None else _with_labels(canvas, labels, images.shape[1], pad)


SHEET_REAL, SHEET_GENERATED = 3, 6  # defects per type on a fidelity sheet
Defect = tuple[np.ndarray, np.ndarray]  # H x W x 3 uint8 image, H x W bool mask


def fidelity_sheet(
    real: Mapping[str, Sequence[Defect]], generated: Mapping[str, Sequence[Defect]], method: str
) -> np.ndarray:
    """Real and generated defects side by side, one row per defect type (those of either side), sorted.

    A row holds up to ``SHEET_REAL`` real defects (black tiles stand in for missing ones, so the generated
    ones always start in the same column), then up to ``SHEET_GENERATED`` of ``method``'s; each defect is the
    tile pair of :func:`~defectsynth.core.figures.defect_tiles` (whole frame with the mask outlined, and a
    2-4x zoom on the defect, so 1-2 px scratches stay visible); a light line parts the real from the generated.
    The label reads ``<type>: <n> real | <m> <method>``.

    Returns:
        An RGB uint8 image.
    """
    types = sorted(t for t in {*real, *generated} if real.get(t) or generated.get(t))
    if not types:
        msg = "a fidelity sheet needs at least one defect"
        raise ValueError(msg)
    ours = {t: list(generated.get(t, ()))[:SHEET_GENERATED] for t in types}
    theirs = {t: list(real.get(t, ()))[:SHEET_REAL] for t in types}
    shape = next(image.shape for t in types for image, _ in [*theirs[t], *ours[t]])
    blank = np.zeros(shape, dtype=np.uint8)
    rows = []
    for t in types:
        tiles = [tile for image, mask in theirs[t] for tile in defect_tiles(image, mask)]
        tiles += [blank] * 2 * (SHEET_REAL - len(theirs[t]))
        rows.append(tiles + [tile for image, mask in ours[t] for tile in defect_tiles(image, mask)])
    labels = [f"{t}: {len(theirs[t])} real | {len(ours[t])} {method}" for t in types]
    pad = 2
    canvas = grid(rows, pad=pad)
    split = 2 * SHEET_REAL * (shape[1] + pad)  # the gap between the real and the generated tiles
    canvas[:, split : split + pad] = LABEL_FILL
    return _with_labels(canvas, labels, shape[0], pad)


GRID_ANOMALOUS, GRID_NORMAL = 6, 2  # test images shown in a prediction grid


def grid_indices(labels: np.ndarray, anomalous: int = GRID_ANOMALOUS, normal: int = GRID_NORMAL) -> np.ndarray:
    """Evenly spaced anomalous images (so several defect types show), then a few normal ones."""
    chosen = []
    for label, count in ((1, anomalous), (0, normal)):
        index = np.flatnonzero(np.asarray(labels) == label)
        if len(index) and count:
            chosen.append(index[np.unique(np.linspace(0, len(index) - 1, min(count, len(index))).round().astype(int))])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=int)


def prediction_figures(predictions: Predictions, real: RealImages) -> dict[str, np.ndarray]:
    """Pixel- and image-level ROC and PR curves, and a prediction grid, of a detector's test predictions.

    Returns ``{"roc_curves", "pr_curves", "predictions"}`` images (a curve kind is left out when undefined on
    this set), or ``{}`` for a detector without anomaly maps (the classifier).
    """
    if predictions.anomaly_maps is None:
        return {}
    gt_masks = real.masks[:, 0].numpy() > 0.5
    levels = [("pixel", predictions.anomaly_maps.ravel(), gt_masks.ravel())]
    if predictions.image_scores is not None:
        levels.append(("image", predictions.image_scores, np.asarray(real.labels) == 1))
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"roc": {}, "pr": {}}
    for level, scores, targets in levels:
        try:
            curve = binary_curve(scores, targets)
            curves["roc"][f"{level} (AUROC {curve.auroc():.3f})"] = curve_points(curve, "roc")
            curves["pr"][f"{level} (AP {curve.average_precision():.3f})"] = curve_points(curve, "pr")
        except UndefinedMetricError as err:
            logger.warning("no %s-level curves: %s", level, err)
    figures = {
        f"{kind}_curves": curves_figure(c, kind, f"{kind.upper()} on the test split") for kind, c in curves.items() if c
    }
    from defectsynth.evaluation.data import to_uint8  # torch: only here, so importing the report stays light

    pick = grid_indices(real.labels)
    if len(pick):
        images = to_uint8(real.images[pick])
        captions = [f"{real.defect_types[i]} {real.image_ids[i]}" for i in pick]
        figures["predictions"] = prediction_grid(images, gt_masks[pick], predictions.anomaly_maps[pick], captions)
    return figures


# ---------------------------------------------------------------- MLflow


def _check_store(tracking_uri: str) -> None:
    """Refuse a SQLite store whose file does not exist (MLflow would silently create an empty one)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        path = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
        if str(path) != ":memory:" and not path.is_file():
            msg = f"{tracking_uri}: no MLflow store there ({path} does not exist)"
            raise ValueError(msg)


def _paged(search: Any, **kwargs: Any) -> Iterator[Any]:
    """Every result of an MLflow search call, following page tokens."""
    token = None
    while True:
        page = search(**kwargs, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _tag_list(run: Run, key: str) -> list[str]:
    text = run.data.tags.get(key) or run.data.params.get(key) or ""
    return [part.strip() for part in text.split(",") if part.strip()]


def _find_runs(client: MlflowClient, target: str) -> list[Run]:
    """The evaluate runs ``target`` names (see :func:`rows_from_mlflow`)."""
    from mlflow.exceptions import MlflowException

    evaluate = "tags.job = 'evaluate'"
    if target == "all":
        experiments = [
            e.experiment_id
            for e in _paged(client.search_experiments, filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")
        ]
        if not experiments:
            return []
        return list(_paged(client.search_runs, experiment_ids=experiments, filter_string=evaluate))
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        try:
            experiment = client.get_experiment(target)
        except MlflowException as err:  # not found, or not an id at all; anything else is the store failing
            if not (is_not_found(err) or err.error_code == "INVALID_PARAMETER_VALUE"):
                raise  # rows_from_mlflow names the store
            experiment = None
    if experiment is not None:
        return list(_paged(client.search_runs, experiment_ids=[experiment.experiment_id], filter_string=evaluate))
    try:
        run = client.get_run(target)
    except MlflowException as err:
        if not is_not_found(err):
            raise
        names = sorted(e.name for e in _paged(client.search_experiments))
        msg = (
            f"{target!r} is no experiment name, experiment id or run id in this MLflow store; "
            f"experiments: {', '.join(names) or 'none'} (or 'all' for every {EXPERIMENT_PREFIX}* experiment)"
        )
        raise ValueError(msg) from None
    job = run.data.tags.get("job")
    if job == "evaluate":
        return [run]
    if job != "report":
        msg = f"run {target} has tag job={job}; expected an evaluate run or a report run"
        raise ValueError(msg)
    runs = []
    for run_id in _tag_list(run, "evaluate_runs"):
        try:
            listed = client.get_run(run_id)
        except MlflowException as err:
            if not is_not_found(err):
                raise
            msg = f"report run {target} lists evaluate run {run_id}, which is not in this MLflow store"
            raise ValueError(msg) from None
        if listed.data.tags.get("job") == "evaluate":
            runs.append(listed)
        else:
            logger.warning("report run %s lists run %s, which is not an evaluate run; skipped", target, run_id)
    return runs


def _seed(run: Run) -> int | None:
    """The run's ``detector_seed`` tag as an int; None when absent or not an integer."""
    text = run.data.tags.get(SEED_TAG)
    try:
        return None if text is None else int(text)
    except ValueError:
        logger.warning("evaluate run %s has %s=%r, not an integer; read as no seed", run.info.run_id, SEED_TAG, text)
        return None


def average_folds(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Rows of fold 1 and fold 2 of one (product, method, detector, seed) merged into their mean (paper 001's protocol).

    A metric enters the mean only when both folds have it; a key with one fold only keeps its row unchanged.
    """
    rows = list(rows)
    folds: dict[tuple[str, str, str, int | None], dict[int, ResultRow]] = {}
    for row in rows:
        if row.fold is not None:
            folds.setdefault((row.product, row.method, row.detector, row.seed), {})[row.fold] = row
    merged = []
    for row in rows:
        pair = folds.get((row.product, row.method, row.detector, row.seed), {})
        if row.fold is None or len(pair) < 2:
            merged.append(row)
        elif row.fold == min(pair):
            first, second = (pair[f] for f in sorted(pair))
            shared = sorted(set(first.metrics) & set(second.metrics))
            metrics = {k: (first.metrics[k] + second.metrics[k]) / 2 for k in shared}
            notes = first.notes | {FOLDS_NOTE: "1,2"}
            merged.append(ResultRow(row.product, row.method, row.detector, metrics, None, notes, row.seed))
    return merged


def folds_sentence(rows: Iterable[ResultRow]) -> str:
    """The report's word on the two-fold protocol: how many rows are the mean of fold 1 and fold 2 ("" for none)."""
    merged = sum(FOLDS_NOTE in r.notes for r in rows)
    return f" {merged} of them the mean of the two-fold protocol's fold 1 and fold 2 runs." if merged else ""


def _fold(run: Run) -> int | None:
    text = run.data.tags.get(FOLD_TAG)
    return int(text) if text in ("1", "2") else None


def _latest(runs: Iterable[Run]) -> list[ResultRow]:
    """One row per (product, method, detector, seed, fold): the run that started last."""
    best: dict[tuple[str | None, ...], Run] = {}
    for run in runs:
        tags = run.data.tags
        names = (tags.get("product"), tags.get("method"), tags.get("detector"))
        if None in names:
            logger.warning("evaluate run %s lacks a product, method or detector tag; skipped", run.info.run_id)
            continue
        key = (*names, _seed(run), _fold(run))
        held = best.get(key)
        if held is None or (run.info.start_time or 0) > (held.info.start_time or 0):
            best[key] = run
    return [
        ResultRow(
            product=product,
            method=method,
            detector=detector,
            metrics={k: float(v) for k, v in run.data.metrics.items()},
            run_id=run.info.run_id,
            notes={k: run.data.tags[k] for k in NOTE_TAGS if k in run.data.tags},
            seed=seed,
            fold=fold,
        )
        for (product, method, detector, seed, fold), run in best.items()
    ]


def rows_from_mlflow(tracking_uri: str, target: str) -> list[ResultRow]:
    """Read evaluate runs back from MLflow as rows, the latest run per (product, method, detector, seed, fold).

    The seed is the run's ``detector_seed`` tag (None without one, as on generation runs). Runs of the two-fold
    protocol (tag ``split_fold``) from both folds, e.g. two runs sharing one ``tracking.uri``, come back as one
    row per seed, their mean (``average_folds``): the paper's two-fold score.

    Args:
        tracking_uri: the MLflow store (a SQLite file must exist).
        target: an experiment name (``defectsynth-wood``) or id, ``all`` (every ``defectsynth-*``
            experiment), or a run id: an evaluate run, or a report run (tag ``job=report``) whose tag or
            param ``evaluate_runs`` lists evaluate run ids, comma-separated.

    Returns:
        The rows, sorted by detector, product, method and seed; empty when the target holds no evaluate run.

    Raises:
        ValueError: a target that names nothing in the store (listing the experiments), a run that is
            neither an evaluate nor a report run, a missing store file.
        TrackingStoreError: the store failed to answer.
    """
    _check_store(tracking_uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        runs = _find_runs(MlflowClient(tracking_uri), target)
    except MlflowException as err:  # only the store failing: _find_runs answers "not found" itself
        msg = f"reading {target!r}"
        raise TrackingStoreError(msg, err, store=tracking_uri) from err
    rows = average_folds(_latest(runs))
    rank = {d: i for i, d in enumerate(detector_order(r.detector for r in rows))}
    return sorted(_sorted(rows), key=lambda r: rank[r.detector])  # stable: product, method within a detector


def print_report(
    tracking_uri: str, target: str, metric: str | None = None, file: TextIO | None = None
) -> list[ResultRow]:
    """Print :func:`markdown_report` of ``target``'s runs (see :func:`rows_from_mlflow`); returns the rows.

    Raises:
        ValueError: as :func:`rows_from_mlflow`, and when the target holds no evaluate run.
    """
    rows = rows_from_mlflow(tracking_uri, target)
    if not rows:
        msg = f"{target}: no runs tagged job=evaluate in {tracking_uri}"
        raise ValueError(msg)
    print(markdown_report(rows, metric), file=file or sys.stdout)
    return rows
