"""Score reports: tables from hand-built rows, figures, curve thinning, MLflow read-back and ``defectsynth report``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from defectsynth.cli import main
from defectsynth.evaluation.metrics import UndefinedMetricError, binary_curve
from defectsynth.evaluation.report import (
    LABEL_FILL,
    SHEET_GENERATED,
    SHEET_REAL,
    ResultRow,
    comparison_table,
    curve_points,
    curves_figure,
    defect_type_table,
    fidelity_sheet,
    generation_table,
    markdown_report,
    method_order,
    prediction_grid,
    rows_from_mlflow,
    save_png,
)

REASON = "the torchmetrics image extras are not installed"
SPREAD_CELL = re.compile(r"\d\.\d{3}±\d\.\d{3}")


def seg(product, method, **metrics):
    return ResultRow(product, method, "segmenter", {k.replace("__", "."): v for k, v in metrics.items()})


ROWS = [
    seg("wood", "perlin", pixel_ap=0.5, image_auroc=0.9, pixel_ap__crack=0.4, pixel_ap__hole=0.6),
    seg("wood", "anomalydiffusion", pixel_ap=0.7, image_auroc=0.95, pixel_ap__crack=0.75),
    seg("wood", "none", pixel_ap=0.2, image_auroc=0.6),
    seg("pill", "perlin", pixel_ap=0.3, pixel_ap__contamination=0.25),
    seg("wood", "croppaste", pixel_ap=0.6),
    ResultRow("wood", "perlin", "classifier", {"cls_accuracy": 0.8, "cls_accuracy.crack": 1.0, "image_auroc": 0.7}),
    ResultRow(
        "wood",
        "perlin",
        "generation",
        {"mask_alignment": 0.91, "psnr_outside": 35.25, "masks_total": 48.0, "masks_empty": 0.0, "ms_per_image": 3.5},
        notes={"quality_not_computed": REASON},
    ),
    ResultRow(
        "pill",
        "anomalydiffusion",
        "generation",
        {
            "mask_alignment": 0.5,
            "refined_cond_iou": 0.8126,
            "refined_cond_coverage": 0.75,
            "mask_shape_distance": 0.3,
            "mask_shape_distance.contamination": 0.3,
            "masks_total": 12.0,
            "is": 1.5,
            "ic_lpips": 0.25,
            "kid": 0.01,
        },
    ),
]


def cells(text, first, second=None):
    """The cells of the table line starting with ``first`` (and ``second``)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == first and (second is None or parts[1] == second):
            return parts
    msg = f"no line {first} {second} in\n{text}"
    raise AssertionError(msg)


def test_method_order_puts_baselines_first():
    assert method_order(["zeta", "croppaste", "anomalydiffusion", "perlin", "none", "perlin"]) == [
        "none",
        "perlin",
        "croppaste",
        "anomalydiffusion",
        "zeta",
    ]


def test_comparison_table_orders_rows_and_means_over_present_values():
    text = comparison_table(ROWS, "segmenter", ["pixel_ap", "image_auroc"])
    lines = text.splitlines()
    assert lines[0].split() == ["product", "method", "pixel_ap", "image_auroc"]
    order = [line.split()[:2] for line in lines[2:]]
    assert order == [
        ["pill", "perlin"],
        ["wood", "none"],
        ["wood", "perlin"],
        ["wood", "croppaste"],
        ["wood", "anomalydiffusion"],
        ["mean", "none"],
        ["mean", "perlin"],
        ["mean", "croppaste"],
        ["mean", "anomalydiffusion"],
    ]
    assert cells(text, "pill", "perlin") == ["pill", "perlin", "0.300", "-"]
    assert cells(text, "mean", "perlin") == ["mean", "perlin", "0.400", "0.900"]  # image_auroc: wood only
    assert cells(text, "mean", "croppaste") == ["mean", "croppaste", "0.600", "-"]
    assert "classifier" not in text and "0.800" not in text  # other detectors are left out
    assert comparison_table(ROWS, "diffusionad", ["pixel_ap"]) == "no results for detector 'diffusionad'"


def test_defect_type_table_has_one_block_per_product_with_its_types():
    text = defect_type_table(ROWS, "segmenter")
    wood, pill = text.split("\n\n")[1], text.split("\n\n")[0]
    assert pill.splitlines()[0] == "pill" and pill.splitlines()[1].split() == ["method", "all", "contamination"]
    assert cells(pill, "perlin") == ["perlin", "0.300", "0.250"]
    assert wood.splitlines()[1].split() == ["method", "all", "crack", "hole"]
    assert cells(wood, "perlin") == ["perlin", "0.500", "0.400", "0.600"]
    assert cells(wood, "anomalydiffusion") == ["anomalydiffusion", "0.700", "0.750", "-"]
    assert cells(wood, "none") == ["none", "0.200", "-", "-"]
    assert [line.split()[0] for line in wood.splitlines()[3:]] == ["none", "perlin", "croppaste", "anomalydiffusion"]
    assert "no per-type image_ap" in defect_type_table(ROWS, "segmenter", "image_ap")


def test_generation_table_shows_quality_and_why_it_is_missing():
    text = generation_table(ROWS)
    assert cells(text, "product")[2:7] == [
        "mask_alignment",
        "refined_cond_iou",
        "refined_cond_coverage",
        "mask_shape_distance",
        "appearance_distance",
    ]
    wood = ["wood", "perlin", "0.910", "-", "-", "-", "-", "35.250", "48", "0", "-", "-", "3.500"]
    assert cells(text, "wood", "perlin") == wood + ["-"] * 3
    assert cells(text, "pill", "anomalydiffusion")[2:7] == ["0.500", "0.813", "0.750", "0.300", "-"]
    assert cells(text, "pill", "anomalydiffusion")[-3:] == ["1.500", "0.250", "0.010"]
    assert text.splitlines()[-1] == f"IS, IC-LPIPS and KID not computed for wood/perlin: {REASON}"
    assert "pill/anomalydiffusion" not in text.splitlines()[-1]


def test_markdown_report_covers_every_detector():
    text = markdown_report(ROWS)
    assert text.startswith("# Scores\n")
    assert text.index("## segmenter") < text.index("## classifier") < text.index("## Dataset quality (generation)")
    assert "### segmenter: pixel_ap per defect type" in text
    assert "### classifier: cls_accuracy per defect type" in text  # no per-type pixel_ap: the next default
    assert f"- IS, IC-LPIPS and KID not computed for wood/perlin: {REASON}" in text
    classifier = text[text.index("## classifier") : text.index("### classifier")]
    assert cells(classifier, "product")[2:] == ["image_auroc", "cls_accuracy"]  # only metrics the runs have
    assert text.count("```text") == text.count("```") / 2 == 7  # headline, 2 x (table, types), dataset, fidelity
    assert text.index("## Headline: segmenter pixel_ap (1 seed)") < text.index("## segmenter")
    assert "### mask_shape_distance per defect type" in text and "### appearance_distance" not in text
    fidelity = text[text.index("### mask_shape_distance") :]
    assert cells(fidelity, "anomalydiffusion") == ["anomalydiffusion", "0.300", "0.300"]
    assert not SPREAD_CELL.search(text) and "no spread is known" in text and "not a ranking" in text
    assert "No evaluation results" in markdown_report([])


# --- figures ---------------------------------------------------------------------------------------


def test_curve_points_keeps_endpoints_and_caps_the_count():
    rng = np.random.default_rng(0)
    targets = rng.random(20_000) < 0.2
    scores = rng.random(20_000) + targets
    curve = binary_curve(scores, targets)
    fpr, tpr = curve_points(curve, "roc", max_points=100)
    assert 2 < len(fpr) <= 100 and (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.trapezoid(tpr, fpr)
    assert area == pytest.approx(curve.auroc(), abs=5e-3)  # the thinned curve keeps its shape
    recall, precision = curve_points(curve, "pr", max_points=64)
    assert 2 < len(recall) <= 64 and (recall[0], precision[0]) == (0.0, 1.0) and recall[-1] == 1.0
    assert precision[-1] == pytest.approx(targets.mean())
    small = binary_curve(np.array([0.9, 0.6, 0.4, 0.1]), np.array([1, 0, 1, 0]))
    assert curve_points(small, "roc")[0].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    with pytest.raises(UndefinedMetricError):
        curve_points(binary_curve(np.array([0.2, 0.3]), np.array([1, 1])), "roc")
    with pytest.raises(ValueError, match="max_points"):
        curve_points(small, "roc", max_points=1)


def test_curves_figure_is_an_image(tmp_path):
    x = np.linspace(0, 1, 50)
    roc = curves_figure({"perlin (AUROC 0.900)": (x, np.sqrt(x)), "none (AUROC 0.500)": (x, x)}, "roc", "wood")
    pr = curves_figure({"perlin (AP 0.700)": (x, 1 - x**2)}, "pr", "wood")
    for image in (roc, pr):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[:2] == (400, 500)
        assert image.std() > 10  # not blank
    assert not np.array_equal(roc, pr)
    path = save_png(roc, tmp_path / "figs" / "roc.png")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), roc)
    with pytest.raises(ValueError, match="kind"):
        curves_figure({}, "det", "x")


def test_prediction_grid_rows_and_columns():
    n, h, w = 3, 24, 32
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = np.zeros((n, h, w), dtype=bool)
    masks[:, 8:16, 8:16] = True
    maps = rng.random((n, h, w))
    out = prediction_grid(images, masks, maps)
    pad = 2
    assert out.shape == (n * (h + pad) + pad, 4 * (w + pad) + pad, 3) and out.dtype == np.uint8
    assert np.array_equal(out[pad : pad + h, pad : pad + w], images[0])  # first column: the image
    gt = out[pad : pad + h, 2 * pad + w : 2 * pad + 2 * w]
    assert (gt[10, 10] != images[0, 10, 10]).any() and np.array_equal(gt[0, 0], images[0, 0, 0])  # tinted inside
    heat = out[pad : pad + h, 3 * pad + 2 * w : 3 * pad + 3 * w]
    assert heat.std() > 10
    labelled = prediction_grid(images, masks, maps, labels=["crack 000", "crack 001", "good 004"])
    assert labelled.shape[0] == out.shape[0] and labelled.shape[1] > out.shape[1]
    assert np.array_equal(labelled[:, -out.shape[1] :], out)
    assert labelled[:, : labelled.shape[1] - out.shape[1]].max() > 0  # the labels are drawn
    with pytest.raises(ValueError, match="labels"):
        prediction_grid(images, masks, maps, labels=["one"])
    with pytest.raises(ValueError, match="anomaly_maps"):
        prediction_grid(images, masks, maps[:, :10])


def test_fidelity_sheet_rows_per_type_real_then_generated_and_thin_masks_visible():
    size, pad = 32, 2
    line = np.zeros((size, size), dtype=bool)
    line[16, 4:28] = True  # a 1-px scratch
    disc = np.hypot(*np.mgrid[-16:16, -16:16]) < 6
    scratch, hole = np.full((size, size, 3), 150, np.uint8), np.full((size, size, 3), 150, np.uint8)
    scratch[line], hole[disc] = 20, 20
    real = {"scratch": [(scratch, line)] * 4, "hole": [(hole, disc)]}
    generated = {"scratch": [(scratch, line)] * 2, "stain": [(hole, disc)] * 7, "none": []}
    sheet = fidelity_sheet(real, generated, "perlin")
    columns = 2 * (SHEET_REAL + SHEET_GENERATED)
    width = columns * (size + pad) + pad
    assert sheet.shape[0] == 3 * (size + pad) + pad and sheet.shape[1] > width  # hole, scratch, stain
    assert sheet[:, : sheet.shape[1] - width].max() > 0  # the labels are drawn
    canvas = sheet[:, -width:]

    def tile(row: int, column: int) -> np.ndarray:
        top, left = pad + row * (size + pad), pad + column * (size + pad)
        return canvas[top : top + size, left : left + size]

    assert tile(0, 1).max() > 0 and tile(0, 2).max() == 0 and tile(0, 6).max() == 0  # one real hole, no generated
    assert tile(1, 5).max() > 0 and tile(1, 9).max() > 0 and tile(1, 10).max() == 0  # 3 of 4 real, 2 generated
    assert tile(2, 0).max() == 0 and tile(2, columns - 1).max() > 0  # no real stain, the first 6 generated
    gap = 2 * SHEET_REAL * (size + pad)
    assert (canvas[:, gap : gap + pad] == LABEL_FILL).all()  # a line parts real from generated
    full, zoomed = tile(1, 0), tile(1, 1)
    assert (full[line] == 20).all() and full[15, 10, 0] > full[15, 10, 1]  # scratch untouched, outlined in red
    thickness = int((zoomed[:, :, 1] == 20).any(axis=1).sum())
    assert 2 <= thickness <= 4  # the 1-px scratch magnified 2-4x
    with pytest.raises(ValueError, match="at least one defect"):
        fidelity_sheet({}, {"none": []}, "perlin")


# --- MLflow ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with wood and pill evaluate runs, a superseded duplicate, and a report run."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    ids = {}
    try:

        def log(product, method, detector, metrics, name, **tags):
            experiment = mlflow.get_experiment_by_name(f"defectsynth-{product}")
            experiment_id = (
                experiment.experiment_id if experiment else mlflow.create_experiment(f"defectsynth-{product}")
            )
            run_tags = {"job": "evaluate", "product": product, "method": method, "detector": detector, **tags}
            with mlflow.start_run(experiment_id=experiment_id, tags=run_tags) as run:
                mlflow.log_metrics(metrics)
            ids[name] = run.info.run_id
            time.sleep(0.01)  # distinct start times

        log("wood", "perlin", "segmenter", {"pixel_ap": 0.1, "pixel_ap.crack": 0.1}, "old")
        log("wood", "perlin", "segmenter", {"pixel_ap": 0.5, "pixel_ap.crack": 0.4}, "wood_perlin")
        log("wood", "none", "segmenter", {"pixel_ap": 0.2}, "wood_none")
        log("wood", "perlin", "generation", {"mask_alignment": 0.9}, "wood_gen", quality_not_computed=REASON)
        log("pill", "croppaste", "segmenter", {"pixel_ap": 0.3}, "pill_croppaste")
        log("pill", "croppaste", "generation", {"mask_alignment": 0.8}, "pill_generate", job="generate")
        experiment_id = mlflow.get_experiment_by_name("defectsynth-wood").experiment_id
        listed = ",".join([ids["old"], ids["pill_croppaste"]])
        with mlflow.start_run(experiment_id=experiment_id, tags={"job": "report", "evaluate_runs": listed}) as run:
            ids["report"] = run.info.run_id
        with mlflow.start_run(experiment_id=experiment_id, tags={"job": "report"}) as run:
            mlflow.log_param("evaluate_runs", ids["wood_none"])
            ids["report_param"] = run.info.run_id
        mlflow.create_experiment("other")
    finally:
        mlflow.set_tracking_uri(None)
    return uri, ids


def keys(rows):
    return [(r.product, r.method, r.detector, r.metrics.get("pixel_ap")) for r in rows]


def test_rows_from_an_experiment_keep_the_latest_run(store):
    uri, ids = store
    rows = rows_from_mlflow(uri, "defectsynth-wood")
    assert keys(rows) == [("wood", "none", "segmenter", 0.2), ("wood", "perlin", "segmenter", 0.5)] + [
        ("wood", "perlin", "generation", None)
    ]
    perlin = rows[1]
    assert perlin.run_id == ids["wood_perlin"] and perlin.metrics == {"pixel_ap": 0.5, "pixel_ap.crack": 0.4}
    assert rows[2].notes == {"quality_not_computed": REASON} and rows[0].notes == {}
    from mlflow import MlflowClient

    experiment_id = MlflowClient(uri).get_experiment_by_name("defectsynth-wood").experiment_id
    assert keys(rows_from_mlflow(uri, experiment_id)) == keys(rows)


def test_rows_from_all_runs_and_report_runs(store):
    uri, ids = store
    everything = rows_from_mlflow(uri, "all")
    assert keys(everything) == [
        ("pill", "croppaste", "segmenter", 0.3),
        ("wood", "none", "segmenter", 0.2),
        ("wood", "perlin", "segmenter", 0.5),
        ("wood", "perlin", "generation", None),
    ]  # the generate-job run of pill is no evaluate run
    assert keys(rows_from_mlflow(uri, ids["wood_none"])) == [("wood", "none", "segmenter", 0.2)]
    from_report = rows_from_mlflow(uri, ids["report"])
    assert keys(from_report) == [("pill", "croppaste", "segmenter", 0.3), ("wood", "perlin", "segmenter", 0.1)]
    assert keys(rows_from_mlflow(uri, ids["report_param"])) == [("wood", "none", "segmenter", 0.2)]


def test_unknown_targets_name_the_experiments(store, tmp_path):
    uri, ids = store
    with pytest.raises(ValueError, match="'nope' is no experiment.*defectsynth-pill, defectsynth-wood"):
        rows_from_mlflow(uri, "nope")
    with pytest.raises(ValueError, match="job=generate"):
        rows_from_mlflow(uri, ids["pill_generate"])
    assert rows_from_mlflow(uri, "other") == []
    with pytest.raises(ValueError, match="does not exist"):
        rows_from_mlflow(f"sqlite:///{tmp_path}/missing.db", "all")
    assert not (tmp_path / "missing.db").exists()


# --- defectsynth report ----------------------------------------------------------------------------


def test_report_command(store, capsys, monkeypatch):
    uri, ids = store
    assert main(["report", "all", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Scores") and "## segmenter" in out and "## Dataset quality (generation)" in out
    assert cells(out, "wood", "perlin")[:3] == ["wood", "perlin", "0.500"]
    assert cells(out, "mean", "perlin")[:3] == ["mean", "perlin", "0.500"]
    assert f"not computed for wood/perlin: {REASON}" in out

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["report", "defectsynth-pill", "--metric", "pixel_ap"]) == 0
    assert "pill" in capsys.readouterr().out


def test_report_command_with_a_config(store, tmp_path, capsys):
    uri, _ = store
    workdir = Path(uri.removeprefix("sqlite:///")).parent
    config = tmp_path / "config.yaml"
    config.write_text(f"workdir: {workdir}\ndata:\n  root: {tmp_path}\n")
    assert main(["report", "defectsynth-wood", "--config", str(config)]) == 0
    assert "wood" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope"], "error: 'nope' is no experiment name"),
        (["other"], "error: other: no runs tagged job=evaluate"),
        (["all", "--metric", "pixel_apx"], "error: --metric pixel_apx: unknown metric"),
    ],
)
def test_report_command_errors(store, capsys, args, needle):
    uri, _ = store
    assert main(["report", *args, "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_report_command_needs_a_store(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report", "all"]) == 2
    assert "pass --tracking-uri URI or --config FILE, or set MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_report_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    assert "Of several runs of one (product, method, detector, seed) the latest counts" in " ".join(
        capsys.readouterr().out.split()
    )
