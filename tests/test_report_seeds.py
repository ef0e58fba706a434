"""Seeds in the score report: mean±std cells, seed-level method means, the headline table, separation sentences."""

from __future__ import annotations

import math
import re
import time

import pytest

from defectsynth.evaluation.report import (
    ResultRow,
    Spread,
    comparison_table,
    defect_type_table,
    draw_spreads,
    draws_table,
    headline_table,
    markdown_report,
    rows_from_mlflow,
    separation_lines,
    spread,
    types_of,
)

SPREAD_CELL = re.compile(r"\d\.\d{3}±\d\.\d{3}")


def cells(text, first, second=None):
    """The cells of the table line starting with ``first`` (and ``second``)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == first and (second is None or parts[1] == second):
            return parts
    msg = f"no line {first} {second} in\n{text}"
    raise AssertionError(msg)


def seg(product, method, seed, **metrics):
    return ResultRow(product, method, "segmenter", {k.replace("__", "."): v for k, v in metrics.items()}, seed=seed)


# perlin: per seed, wood and pill, with types crack (both products) and hole (wood only)
#   seed 0: mean over products 0.3; pairs (0.1, 0.3, 0.5) -> 0.3; crack (0.1, 0.5) -> 0.3; hole 0.3
#   seed 1: mean over products 0.5; pairs (0.3, 0.5, 0.9) -> 17/30; crack (0.3, 0.9) -> 0.6; hole 0.5
PERLIN = [
    seg("wood", "perlin", 0, pixel_ap=0.2, pixel_ap__crack=0.1, pixel_ap__hole=0.3),
    seg("pill", "perlin", 0, pixel_ap=0.4, pixel_ap__crack=0.5),
    seg("wood", "perlin", 1, pixel_ap=0.4, pixel_ap__crack=0.3, pixel_ap__hole=0.5),
    seg("pill", "perlin", 1, pixel_ap=0.6, pixel_ap__crack=0.9),
]
CROPPASTE = [seg("wood", "croppaste", s, pixel_ap=0.8 + 0.1 * s) for s in (0, 1, 2)]  # 0.9±0.1


def std(*values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_spread_is_the_mean_and_sample_std_of_present_values():
    assert spread([0.1, 0.2, None, 0.3]) == Spread(pytest.approx(0.2), pytest.approx(0.1), 3)
    assert spread([0.5]) == Spread(0.5, None, 1) and spread([None]) is None and spread([]) is None
    assert Spread(0.2, 0.1, 3).cell() == "0.200±0.100" and Spread(0.25, None, 1).cell() == "0.250"


def test_comparison_cells_are_mean_std_over_seeds_and_means_spread_over_seed_level_means():
    text = comparison_table(PERLIN + CROPPASTE, "segmenter", ["pixel_ap"])
    assert cells(text, "wood", "perlin") == ["wood", "perlin", f"0.300±{std(0.2, 0.4):.3f}"]
    assert cells(text, "wood", "croppaste") == ["wood", "croppaste", "0.900±0.100"]
    assert cells(text, "mean", "perlin") == ["mean", "perlin", "0.400±0.141"]  # seed means 0.3 and 0.5
    assert f"{std(0.2, 0.4, 0.4, 0.6):.3f}" not in text  # 0.163: the std of all four rows pooled
    assert len(text.splitlines()) == 2 + 3 + 2  # one row per (product, method), not per seed
    single = comparison_table([r for r in PERLIN if r.seed == 0], "segmenter", ["pixel_ap"])
    assert cells(single, "mean", "perlin") == ["mean", "perlin", "0.300"] and "±" not in single


def test_defect_type_table_aggregates_seeds():
    wood = defect_type_table(PERLIN, "segmenter").split("\n\n")[1]
    assert cells(wood, "perlin") == ["perlin", "0.300±0.141", "0.200±0.141", "0.400±0.141"]


def test_headline_pools_types_over_products_per_seed():
    text = headline_table(PERLIN + CROPPASTE)
    assert cells(text, "method") == ["method", "seeds", "pixel_ap", "type_mean", "crack", "hole"]
    type_mean = (0.3 + 17 / 30) / 2, std(0.3, 17 / 30)  # per-type column means would give 0.3 and 0.55
    assert cells(text, "perlin") == [
        "perlin",
        "2",
        "0.400±0.141",
        f"{type_mean[0]:.3f}±{type_mean[1]:.3f}",
        f"0.450±{std(0.3, 0.6):.3f}",
        "0.400±0.141",
    ]
    assert cells(text, "croppaste") == ["croppaste", "3", "0.900±0.100", "-", "-", "-"]
    assert headline_table(PERLIN, detector="classifier") == "no results for detector 'classifier'"


def test_separation_sentences():
    separated = {"perlin": Spread(0.10, 0.03, 3), "croppaste": Spread(0.21, 0.02, 3)}
    assert separation_lines(separated) == ["croppaste > perlin (0.210 vs 0.100, spread 0.020/0.030)"]
    close = {"croppaste": Spread(0.21, 0.02, 3), "anomalydiffusion": Spread(0.22, 0.03, 3), "none": None}
    assert separation_lines(close) == [
        "anomalydiffusion ~ croppaste: difference 0.010 is within the seeds' spread 0.030, not a ranking"
    ]
    three = separation_lines({**separated, "anomalydiffusion": Spread(0.22, 0.03, 3)})
    assert [line.split()[:3] for line in three] == [
        ["anomalydiffusion", "~", "croppaste:"],
        ["croppaste", ">", "perlin"],
    ]
    single = separation_lines({"perlin": Spread(0.108, None, 1), "croppaste": Spread(0.181, None, 1)})
    assert single == [
        "single seed: no spread is known, so the differences (croppaste 0.181, perlin 0.108) are not a ranking"
    ]
    mixed = separation_lines({"perlin": Spread(0.1, None, 1), "croppaste": Spread(0.5, 0.01, 2)})
    assert mixed == [
        "croppaste ~ perlin: difference 0.400, but perlin has one seed, so no spread is known; not a ranking"
    ]
    assert separation_lines({"perlin": Spread(0.1, 0.01, 2), "none": None}) == []


def test_markdown_report_states_seeds_and_separation():
    text = markdown_report(PERLIN + CROPPASTE)
    assert "3 seeds (0, 1, 2) per detector run" in text and "## Headline: segmenter pixel_ap (3 seeds)" in text
    assert text.index("## Headline") < text.index("## segmenter") and SPREAD_CELL.search(text)
    assert "- croppaste > perlin (0.900 vs 0.400, spread 0.100/0.141)" in text
    one = markdown_report([r for r in PERLIN + CROPPASTE if r.seed == 0])
    assert "1 seed (0) per detector run: cells are single runs, no spread is known" in one
    assert (
        "- single seed: no spread is known, so the differences (croppaste 0.800, perlin 0.300) are not a ranking" in one
    )
    assert not SPREAD_CELL.search(one)


def test_rows_from_mlflow_keep_the_latest_run_per_seed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.create_experiment("defectsynth-wood")
        for seed, value in (("0", 0.1), ("0", 0.2), ("1", 0.4), (None, 0.9), ("x", 0.7)):
            tags = {"job": "evaluate", "product": "wood", "method": "perlin", "detector": "segmenter"}
            with mlflow.start_run(experiment_id=experiment_id, tags=tags | ({"detector_seed": seed} if seed else {})):
                mlflow.log_metric("pixel_ap", value)
            time.sleep(0.01)  # distinct start times
    finally:
        mlflow.set_tracking_uri(None)
    rows = rows_from_mlflow(uri, "defectsynth-wood")
    assert [(r.seed, r.metrics["pixel_ap"]) for r in rows] == [(None, 0.7), (0, 0.2), (1, 0.4)]  # "x": no seed


def test_average_folds_merges_both_folds_of_a_seed_and_keeps_a_lone_fold():
    from defectsynth.evaluation.report import FOLDS_NOTE, average_folds, markdown_report

    rows = [
        ResultRow("wood", "badg", "segmenter", {"pixel_ap": 0.2, "pixel_ap.hole": 0.4}, seed=0, fold=1),
        ResultRow("wood", "badg", "segmenter", {"pixel_ap": 0.6}, seed=0, fold=2),
        ResultRow("wood", "badg", "segmenter", {"pixel_ap": 0.5}, seed=1, fold=2),  # fold 1 of seed 1 missing
        ResultRow("wood", "perlin", "segmenter", {"pixel_ap": 0.3}, seed=0),  # outside the protocol
    ]
    merged = average_folds(rows)
    assert [(r.method, r.seed, r.fold, r.metrics) for r in merged] == [
        ("badg", 0, None, {"pixel_ap": pytest.approx(0.4)}),  # a metric of one fold only is left out
        ("badg", 1, 2, {"pixel_ap": 0.5}),
        ("perlin", 0, None, {"pixel_ap": 0.3}),
    ]
    assert [FOLDS_NOTE in r.notes for r in merged] == [True, False, False]
    assert "1 of them the mean of the two-fold protocol's fold 1 and fold 2 runs." in markdown_report(merged)


def test_rows_from_mlflow_average_the_two_folds(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.create_experiment("defectsynth-wood")
        for fold, value in (("1", 0.2), ("2", 0.6)):
            tags = {"job": "evaluate", "product": "wood", "method": "badg", "detector": "segmenter"}
            with mlflow.start_run(experiment_id=experiment_id, tags=tags | {"detector_seed": "0", "split_fold": fold}):
                mlflow.log_metric("pixel_ap", value)
    finally:
        mlflow.set_tracking_uri(None)
    (row,) = rows_from_mlflow(uri, "defectsynth-wood")
    assert (row.seed, row.fold, row.metrics["pixel_ap"]) == (0, None, pytest.approx(0.4))


def test_draws_pool_each_runs_seed_means_and_rank_only_beyond_the_draws_spread():
    drawn = [[seg("wood", "croppaste", s, pixel_ap__crack=m - 0.1 + 0.1 * s) for s in (0, 1, 2)] for m in (0.9, 0.5)]
    spreads = draw_spreads([[*PERLIN, *draw] for draw in drawn], types_of("pixel_ap"))
    (first, second), over = spreads["croppaste"]
    assert first == Spread(pytest.approx(0.9), pytest.approx(0.1), 3) and second.mean == pytest.approx(0.5)
    assert over == Spread(pytest.approx(0.7), pytest.approx(std(0.9, 0.5)), 2)
    assert spreads["perlin"][1] == Spread(pytest.approx((0.3 + 17 / 30) / 2), pytest.approx(0.0), 2)
    assert cells(draws_table(spreads, ["seed0", "seed1"]), "croppaste") == [
        "croppaste", "0.900±0.100", "0.500±0.100", "0.700±0.283",
    ]  # fmt: skip
    lines = separation_lines({m: s for m, (_, s) in spreads.items()}, over="draw")
    assert lines == ["croppaste ~ perlin: difference 0.267 is within the draws' spread 0.283, not a ranking"]
