"""Score reports of the evaluate job: text tables, ``scores.md``, curve and prediction figures, MLflow read-back.

Every evaluation is one MLflow run (tags ``job=evaluate``, ``product``, ``method``, ``detector``; metrics under
the stable names of :mod:`defectsynth.evaluation.metrics`). :func:`rows_from_mlflow` reads them back as
:class:`ResultRow`; the table functions and :func:`markdown_report` format any list of rows, so the evaluate
job can build its report from its own results without a round trip through MLflow. Missing values print ``-``:
metrics that are undefined are absent from a run, never faked.

Importing this module is light (numpy only); matplotlib, PIL and MLflow are imported inside the functions
that need them.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np

from defectsynth.evaluation.metrics import STABLE_METRICS, Curve, UndefinedMetricError, binary_curve
from defectsynth.platform.figures import grid, overlay
from defectsynth.platform.summary import table

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
    "psnr_outside",
    "masks_total",
    "masks_empty",
    "masks_tiny",
    "masks_outside_foreground",
    "ms_per_image",
    *QUALITY_METRICS,
)
COUNT_METRICS = frozenset({"masks_total", "masks_empty", "masks_tiny", "masks_outside_foreground"})
NOT_COMPUTED_TAG = "quality_not_computed"  # tag of a generation run: why IS / IC-LPIPS / KID are absent
NOTE_TAGS = (NOT_COMPUTED_TAG,)  # run tags copied into ResultRow.notes
TYPE_METRICS = ("pixel_ap", "image_auroc", "cls_accuracy")  # per-type metric of a detector by default: first present
MISSING = "-"
MEAN = "mean"


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
    """

    product: str
    method: str
    detector: str
    metrics: dict[str, float]
    run_id: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- ordering and cells


def method_order(methods: Iterable[str]) -> list[str]:
    """Distinct methods with the baselines ``none``, ``perlin``, ``croppaste`` first, then alphabetically."""
    distinct = set(methods)
    return [m for m in BASELINES if m in distinct] + sorted(distinct - set(BASELINES))


def detector_order(detectors: Iterable[str]) -> list[str]:
    """Distinct detectors in report order: segmenter, classifier, diffusionad, then others alphabetically."""
    distinct = set(detectors)
    return [d for d in DETECTORS if d in distinct] + sorted(distinct - set(DETECTORS))


def _sorted(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Rows by product, then method in :func:`method_order`."""
    rows = list(rows)
    rank = {m: i for i, m in enumerate(method_order(r.method for r in rows))}
    return sorted(rows, key=lambda r: (r.product, rank[r.method]))


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


# ---------------------------------------------------------------- tables


def comparison_table(rows: Sequence[ResultRow], detector: str, metrics: Sequence[str]) -> str:
    """One detector's scores: product x method rows, then per-method means over the products with the metric.

    Args:
        rows: results of any detectors; only ``detector``'s are shown.
        detector: the detector tag.
        metrics: the columns (MLflow keys).

    Returns:
        A text table (3 decimals, ``-`` where a run lacks the metric), or a line saying there are no rows.
    """
    mine = _sorted(_of(rows, detector))
    if not mine:
        return f"no results for detector {detector!r}"
    body = [[r.product, r.method, *(_cell(_value(r, m), m) for m in metrics)] for r in mine]
    for method in method_order(r.method for r in mine):
        of_method = [r for r in mine if r.method == method]
        body.append([MEAN, method, *(_cell(_mean(_value(r, m) for r in of_method), m) for m in metrics)])
    return table(["product", "method", *metrics], body)


def defect_types(rows: Iterable[ResultRow], metric: str) -> list[str]:
    """The sorted defect types of the ``<metric>.<type>`` keys in ``rows``."""
    prefix = f"{metric}."
    return sorted({k[len(prefix) :] for r in rows for k in r.metrics if k.startswith(prefix)})


def defect_type_table(rows: Sequence[ResultRow], detector: str, metric: str = "pixel_ap") -> str:
    """``metric`` per defect type: one block per product, a row per method, a column per defect type.

    Products have their own defect types, so each block lists only its product's types (from the
    ``<metric>.<type>`` keys), after the overall ``metric``.

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
        body = [[r.method, *(_cell(_value(r, k)) for k in keys)] for r in of_product]
        blocks.append(f"{product}\n" + table(["method", "all", *types], body))
    if not blocks:
        return f"no per-type {metric} results for detector {detector!r}"
    return "\n\n".join(blocks)


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


def markdown_report(rows: Sequence[ResultRow], metric: str | None = None) -> str:
    """The whole score report as Markdown (``scores.md``): each detector's tables, then dataset quality.

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
        f"`{MEAN}` rows average over the products that have the metric; "
        f"`{MISSING}`: no value (metrics undefined on a run's data are not logged).",
        "",
    ]
    for detector in detector_order(r.detector for r in rows if r.detector != GENERATION):
        mine = _of(rows, detector)
        lines += [f"## {detector}", "", _fenced(comparison_table(mine, detector, report_metrics(mine))), ""]
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


def _render(figure: Any) -> np.ndarray:
    """An Agg-rendered matplotlib figure as an ``H x W x 3`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


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
    return _render(figure)


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
        except MlflowException:
            experiment = None
    if experiment is not None:
        return list(_paged(client.search_runs, experiment_ids=[experiment.experiment_id], filter_string=evaluate))
    try:
        run = client.get_run(target)
    except MlflowException:
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
        except MlflowException:
            msg = f"report run {target} lists evaluate run {run_id}, which is not in this MLflow store"
            raise ValueError(msg) from None
        if listed.data.tags.get("job") == "evaluate":
            runs.append(listed)
        else:
            logger.warning("report run %s lists run %s, which is not an evaluate run; skipped", target, run_id)
    return runs


def _latest(runs: Iterable[Run]) -> list[ResultRow]:
    """One row per (product, method, detector): the run that started last."""
    best: dict[tuple[str, str, str], Run] = {}
    for run in runs:
        tags = run.data.tags
        key = (tags.get("product"), tags.get("method"), tags.get("detector"))
        if None in key:
            logger.warning("evaluate run %s lacks a product, method or detector tag; skipped", run.info.run_id)
            continue
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
        )
        for (product, method, detector), run in best.items()
    ]


def rows_from_mlflow(tracking_uri: str, target: str) -> list[ResultRow]:
    """Read evaluate runs back from MLflow as rows, the latest run per (product, method, detector).

    Args:
        tracking_uri: the MLflow store (a SQLite file must exist).
        target: an experiment name (``defectsynth-wood``) or id, ``all`` (every ``defectsynth-*``
            experiment), or a run id: an evaluate run, or a report run (tag ``job=report``) whose tag or
            param ``evaluate_runs`` lists evaluate run ids, comma-separated.

    Returns:
        The rows, sorted by detector, product and method; empty when the target holds no evaluate run.

    Raises:
        ValueError: a target that names nothing in the store (listing the experiments), a run that is
            neither an evaluate nor a report run, a missing store file.
    """
    _check_store(tracking_uri)
    from mlflow.tracking import MlflowClient

    rows = _latest(_find_runs(MlflowClient(tracking_uri), target))
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
