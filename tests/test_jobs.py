"""The Ray jobs end to end on a real local Ray cluster and a temporary SQLite MLflow store."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient
from PIL import Image

from defectsynth.evaluation.dataset_quality import DatasetQuality
from defectsynth.jobs.evaluate import log_quality_run, plan_runs, run_seed, seed_mean
from defectsynth.jobs.finetune import finetune, fit_digest
from defectsynth.jobs.pipeline import PipelineResult, pipeline
from defectsynth.platform.config import ConfigError, load_config
from defectsynth.platform.tracking import load_generator
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.ray_train import kill_train_workers, wait_for_first_checkpoint

pytestmark = pytest.mark.integration

PER_TYPE = 3
TYPES = ("contamination", "crack", "discoloration", "hole", "scratch")
SEEDS = (0, 1)
DETECTOR_SEEDS = {"segmenter": SEEDS, "classifier": SEEDS, "diffusionad": (0,)}  # as the tier: DiffusionAD once


def tiny_config(root: Path, workdir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"data.root={root}",
        f"workdir={workdir}",
        "data.resolution=64",
        "products=[wood]",
        "methods=[perlin,croppaste]",
        "finetune.max_steps=1",
        f"generate.per_type={PER_TYPE}",
        "generate.batch_size=4",
        "generate.shard_maxcount=4",
        "evaluate.max_steps=4",
        "evaluate.batch_norm_batches=1",
        f"evaluate.seeds=[{','.join(map(str, SEEDS))}]",
        "evaluate.detector_seeds={diffusionad: [0]}",
        "evaluate.validate_every=2",
        "evaluate.checkpoint_every=4",  # no mid-run checkpoint (a report costs ~2 s): the resume test sets its own
        "evaluate.batch_size=4",
        "evaluate.base_width=4",
        "evaluate.classifier.width=4",
        "evaluate.diffusionad.block_out_channels=[8,16]",
        "evaluate.diffusionad.attention_head_dim=8",
        "evaluate.diffusionad.norm_num_groups=4",
        "evaluate.diffusionad.seg_base_width=4",
        "ray.log_to_driver=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobs") / "data"
    write_demo(root, size=64, train_good=10, test_good=4, per_defect=4, products=["wood"], progress=False)
    return root


@pytest.fixture(scope="module")
def ran(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, object]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(None, tiny_config(demo_root, tmp_path_factory.mktemp("run")))
        yield pipeline(cfg), cfg
    finally:
        ray.shutdown()


def test_plan_runs_trains_each_pair_once_per_seed(tmp_path: Path) -> None:
    overrides = [f"data.root={tmp_path}", "methods=[perlin]", "evaluate.detectors=[segmenter,diffusionad]"]
    cfg = load_config(None, [*overrides, "evaluate.seeds=[3,5]"])
    keys = [r.key for r in plan_runs(cfg, ["crack", "hole"])]
    pairs = [
        "segmenter/perlin",
        "segmenter/croppaste",
        "diffusionad/none",
        "diffusionad/perlin",
        "diffusionad/croppaste",
    ]
    assert keys == [f"{pair}/seed{seed}" for pair in pairs for seed in (3, 5)]
    assert [r.seed for r in plan_runs(load_config(None, overrides), ["crack"])] == [0] * 5  # default: seed 0
    for bad, reason in (("[1,1]", "distinct"), ("[]", "at least 1")):
        with pytest.raises(ConfigError, match=reason):
            load_config(None, [*overrides, f"evaluate.seeds={bad}"])
    one = load_config(None, [*overrides, "evaluate.seeds=[3,5]", "evaluate.detector_seeds={diffusionad: [7]}"])
    keys = [r.key for r in plan_runs(one, ["crack"])]
    assert keys == [f"segmenter/{m}/seed{s}" for m in ("perlin", "croppaste") for s in (3, 5)] + [
        f"diffusionad/{m}/seed7" for m in ("none", "perlin", "croppaste")
    ]
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, [*overrides, "evaluate.detector_seeds={diffusionad: [1, 1]}"])


def test_run_seeds_differ_per_seed_and_base() -> None:
    seeds = {run_seed(base, seed) for base in (0, 1, 1000) for seed in (0, 1, 1000)}
    assert len(seeds) == 9 and all(0 <= s < 2**31 for s in seeds)
    assert run_seed(0, 1) == run_seed(0, 1)


def test_seed_mean_averages_each_metric_over_the_runs_having_it() -> None:
    mean = seed_mean([{"pixel_ap": 0.2, "image_auroc": 0.5}, {"pixel_ap": 0.4}])
    assert mean == {"pixel_ap": pytest.approx(0.3), "image_auroc": 0.5}


def test_log_quality_run_logs_and_saves_the_fidelity_sheet(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={tmp_path}", f"workdir={tmp_path / 'run'}"])
    sheet = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        row = log_quality_run(
            cfg, SimpleNamespace(product="wood"), "perlin", ({}, None), DatasetQuality({}, None, sheet)
        )
    finally:
        mlflow.set_tracking_uri(previous)
    assert "fidelity_sheet.png" in {a.path for a in MlflowClient(cfg.tracking_uri).list_artifacts(row.run_id)}
    saved = Image.open(cfg.workdir / "report" / "wood" / "perlin-fidelity-sheet.png")
    assert np.array_equal(np.asarray(saved), sheet)


def test_finetune_registers_versions(ran) -> None:
    _, cfg = ran
    client = MlflowClient(cfg.tracking_uri)
    for method in ("perlin", "croppaste"):
        version = client.get_model_version_by_alias(f"defectsynth-wood-{method}", "candidate")
        assert version.version == "1" or version.version == 1
        run = client.get_run(version.run_id)
        assert run.data.tags["method"] == method and run.data.params["split_digest"]
        assert version.tags["data_digest"] == run.data.params["split_digest"] and version.tags["settings_digest"]
        assert version.description.startswith(f"{method} fitted for wood: ")


def test_fit_digest_changes_with_what_a_fit_is_made_from(tmp_path: Path) -> None:
    base = [f"data.root={tmp_path}", "methods=[perlin,anomalydiffusion]"]
    prepared = SimpleNamespace(split=SimpleNamespace(digest=lambda: "split-1"))

    def digest(*overrides: str, products: tuple[str, ...] = ("wood",), method: str = "perlin", uri: str = "b1") -> str:
        return fit_digest(load_config(None, [*base, *overrides]), prepared, list(products), method, uri)

    assert digest() == digest()
    changed = [
        digest("generators.perlin.threshold=0.6"),
        digest("finetune.max_steps=7"),
        digest("seed=3"),
        digest("finetune.workers=2"),
        digest(products=("wood", "pill")),
    ]
    assert len({digest(), *changed}) == 1 + len(changed)
    assert digest(uri="b2") == digest()  # perlin does not fine-tune the base
    assert digest(method="anomalydiffusion", uri="b2") != digest(method="anomalydiffusion")


def test_finetune_reuses_the_fit_of_the_same_digest_and_fits_a_changed_one_again(ran) -> None:
    _, cfg = ran

    def versions(outcomes: list) -> dict[str, str]:
        return {o.method: o.version for o in outcomes}

    assert versions(finetune(cfg)) == {"perlin": "1", "croppaste": "1"}
    changed = cfg.model_copy(deep=True)
    changed.generators["perlin"] = {**changed.generators.get("perlin", {}), "threshold": 0.6}
    assert versions(finetune(changed)) == {"perlin": "2", "croppaste": "1"}
    assert versions(finetune(cfg)) == {"perlin": "1", "croppaste": "1"}  # back: @candidate returns to version 1
    client = MlflowClient(cfg.tracking_uri)
    assert str(client.get_model_version_by_alias("defectsynth-wood-perlin", "candidate").version) == "1"


def test_generate_warns_that_settings_changed_since_the_fit_are_not_used(ran, caplog) -> None:
    from defectsynth.jobs.generate import generate

    _, cfg = ran
    changed = cfg.model_copy(deep=True)
    changed.generators["perlin"] = {**changed.generators.get("perlin", {}), "threshold": 0.6}
    with caplog.at_level(logging.WARNING, logger="defectsynth.jobs.generate"):
        outcomes = generate(changed)
    assert [o.written for o in outcomes] == [0, 0]  # the registered versions' samples are all there
    (warning,) = [r.getMessage() for r in caplog.records if "fitted with" in r.getMessage()]
    assert warning.startswith("perlin: the config's generators.perlin differ") and "its wood version(s)" in warning


def test_generator_loads_through_the_registry(ran) -> None:
    _, cfg = ran
    mlflow.set_tracking_uri(cfg.tracking_uri)
    generator = load_generator("models:/defectsynth-wood-croppaste@candidate")
    assert generator.name == "croppaste"


def test_generate_writes_exactly_n_per_type(ran) -> None:
    result, _ = ran
    for uri in result.datasets:
        card = read_card(resolve(uri))
        assert card["counts"] == {"wood": {t: PER_TYPE for t in TYPES}}
        keys = read_manifest(resolve(uri)).column("key").to_pylist()
        assert len(keys) == len(set(keys)) == PER_TYPE * len(TYPES)
        (generator,) = card["generators"]
        assert generator["model_uri"].startswith("models:/defectsynth-wood-") and generator["model_version"] == "1"


def test_generate_resumes_without_duplicates(ran) -> None:
    from defectsynth.jobs.generate import generate

    result, cfg = ran
    outcomes = generate(cfg)
    assert [(o.written, o.skipped) for o in outcomes] == [(0, PER_TYPE * len(TYPES))] * 2
    assert read_card(resolve(result.datasets[0]))["samples"] == PER_TYPE * len(TYPES)


def test_evaluate_runs_every_detector_on_every_method_plus_the_unsupervised_baseline(ran) -> None:
    result, _ = ran
    pairs = Counter((o.detector, o.method) for o in result.outcomes)
    assert all(count == len(DETECTOR_SEEDS[detector]) for (detector, _), count in pairs.items())
    assert set(pairs) == {
        ("segmenter", "perlin"),
        ("segmenter", "croppaste"),
        ("classifier", "perlin"),
        ("classifier", "croppaste"),
        ("diffusionad", "none"),
        ("diffusionad", "perlin"),
        ("diffusionad", "croppaste"),
    }


def test_evaluate_logs_metrics_figures_and_champion(ran) -> None:
    result, cfg = ran
    client = MlflowClient(cfg.tracking_uri)
    for outcome in result.outcomes:
        run = client.get_run(outcome.run_id)
        assert run.data.tags["detector"] == outcome.detector and run.data.tags["product"] == "wood"
        assert run.data.tags["method"] == outcome.method and run.data.params["selected_step"]
        artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
        if outcome.detector == "classifier":
            assert 0.0 <= run.data.metrics["cls_accuracy"] <= 1.0 and "pixel_ap" not in run.data.metrics
            continue
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "image_auroc", "image_ap"):
            assert 0.0 <= run.data.metrics[name] <= 1.0
        assert any(key.startswith("pixel_ap.") for key in run.data.metrics)
        assert {"roc_curves.png", "pr_curves.png", "predictions.png"} <= artifacts
        if outcome.method == "none":
            assert "model_version" not in run.data.tags and not run.inputs.dataset_inputs
            continue
        assert run.data.tags["dataset_digest"] and run.data.tags["model_version"] == "1"
        assert run.inputs.dataset_inputs, "the dataset is logged as the run's input"
        if outcome.detector == "segmenter":
            champion = client.get_model_version_by_alias(f"defectsynth-wood-{outcome.method}", "champion")
            assert str(champion.version) == "1" and outcome.champion


def test_evaluate_measures_each_dataset(ran) -> None:
    from defectsynth.evaluation.report import rows_from_mlflow

    _, cfg = ran
    rows = [r for r in rows_from_mlflow(cfg.tracking_uri, "defectsynth-wood") if r.detector == "generation"]
    assert sorted(r.method for r in rows) == ["croppaste", "perlin"]
    for row in rows:
        assert row.metrics["masks_total"] == PER_TYPE * len(TYPES)
        assert 0.5 < row.metrics["mask_alignment"] <= 1.0, "the change should sit inside the masks"
        assert row.metrics["masks_empty"] == 0
        assert "is" not in row.metrics and "IS" in row.notes["quality_not_computed"]


def test_report_lists_every_row(ran) -> None:
    result, _ = ran
    text = result.report.read_text()
    for name in ("segmenter", "classifier", "diffusionad", "none", "perlin", "croppaste", "mask_alignment"):
        assert name in text
    assert "not computed" in text


def test_evaluate_runs_each_seed_and_moves_the_champion_on_their_mean(ran) -> None:
    result, cfg = ran
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("defectsynth-wood").experiment_id
    runs = client.search_runs([experiment], "tags.job = 'evaluate' and tags.detector != 'generation'")
    seeds = Counter(
        (r.data.tags["method"], r.data.tags["detector"], r.data.tags["detector_seed"], r.data.params["seed"])
        for r in runs
    )
    pairs = {(o.method, o.detector) for o in result.outcomes}
    assert seeds == Counter((m, d, str(s), str(s)) for m, d in pairs for s in DETECTOR_SEEDS[d])  # one run per seed
    assert {o.seed for o in result.outcomes} == set(SEEDS)
    for method in ("perlin", "croppaste"):
        mine = [o for o in result.outcomes if o.detector == "segmenter" and o.method == method]
        champion = client.get_model_version_by_alias(f"defectsynth-wood-{method}", "champion")
        mean = sum(o.metrics["pixel_ap"] for o in mine) / len(mine)
        assert float(champion.tags["eval.pixel_ap"]) == pytest.approx(mean, abs=1e-6)  # the seeds' mean
        assert {client.get_run(o.run_id).data.tags["champion"] for o in mine} == {"true"}
    text = result.report.read_text()
    assert re.search(r"\d\.\d{3}±\d\.\d{3}", text), "no mean±std cell in scores.md"
    assert f"{len(SEEDS)} seeds" in text and "## Headline: segmenter pixel_ap" in text


def test_training_and_selection_never_read_a_test_image(ran, tmp_path: Path) -> None:
    """Corrupt every test image and mask: training and validation-based selection still finish."""
    import shutil

    from defectsynth.jobs.evaluate import eval_task, score_on_test, train_and_select
    from defectsynth.platform.prepare import prepare_dataset
    from defectsynth.storage.layouts import read_product

    _, base = ran
    prepared = prepare_dataset(base)
    cfg = base.model_copy(deep=True)
    cfg.data.root = tmp_path / "data"
    cfg.workdir = tmp_path / "run"
    cfg.evaluate.max_steps, cfg.evaluate.seeds = 2, [0]
    shutil.copytree(base.data.root, cfg.data.root)
    product = read_product(cfg.data.root, "wood", "mvtec")
    split = prepared.split.products["wood"]
    corrupted = 0
    for image_id in split.test:
        record = product.record(image_id)
        for path in (record.path, *record.mask_paths):
            path.write_bytes(b"not an image")
            corrupted += 1
    assert corrupted > len(split.test_normals)
    cfg.generate.output = str(base.workdir / "datasets")  # the datasets the pipeline wrote
    tasks = [eval_task(cfg, prepared, "wood")]
    fits = train_and_select(cfg, tasks)
    run = tasks[0].runs[0]
    assert (fits["wood"] / run.key / "best.pt").is_file()
    with pytest.raises(Exception, match="unreadable or truncated image"):
        ray.get(score_on_test.remote(tasks[0].model_dump(), run.model_dump(), str(fits["wood"] / run.key / "best.pt")))


def test_failed_worker_group_resumes_from_checkpoint(ran) -> None:
    """Kill the training worker after its first checkpoint: FailureConfig restarts it from there."""
    from defectsynth.jobs.evaluate import evaluate

    _, base = ran
    cfg = base.model_copy(deep=True)
    cfg.methods = ["perlin"]
    cfg.evaluate.detectors = ["segmenter"]
    cfg.evaluate.max_steps, cfg.evaluate.checkpoint_every, cfg.evaluate.validate_every = 100, 20, 50  # 4 reports not 19
    cfg.evaluate.seeds = [0]
    cfg.evaluate.weight_average = 0.9  # the resumed run reads the average back from its checkpoint
    runs = cfg.workdir / "ray_results"
    before = set(runs.iterdir())
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.append(evaluate(cfg)), daemon=True)
    thread.start()
    wait_for_first_checkpoint(runs, "evaluate-wood-*", exclude=before)
    assert kill_train_workers(), "no training worker to kill"
    thread.join(timeout=600)
    assert outcomes, "evaluate did not finish after the restart"
    state = json.loads((cfg.workdir / "detectors/wood/segmenter/perlin/seed0/state.json").read_text())
    assert state["step"] == 100
    assert state["resumed_at"] and 5 <= state["resumed_at"][0] < 100
    assert (cfg.workdir / "detectors/wood/segmenter/perlin/seed0/average.pt").is_file()
