"""The Ray jobs end to end on a real local Ray cluster and a temporary SQLite MLflow store."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import pytest
import ray
from mlflow.tracking import MlflowClient

from defectsynth.jobs.pipeline import PipelineResult, pipeline
from defectsynth.platform.config import load_config
from defectsynth.platform.tracking import load_generator
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.ray_train import kill_train_workers, wait_for_first_checkpoint

pytestmark = pytest.mark.integration

PER_TYPE = 3
TYPES = ("contamination", "crack", "discoloration", "hole", "scratch")


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
        "evaluate.validate_every=2",
        "evaluate.checkpoint_every=2",
        "evaluate.batch_size=4",
        "evaluate.base_width=4",
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


def test_finetune_registers_versions(ran) -> None:
    _, cfg = ran
    client = MlflowClient(cfg.tracking_uri)
    for method in ("perlin", "croppaste"):
        version = client.get_model_version_by_alias(f"defectsynth-wood-{method}", "candidate")
        assert version.version == "1" or version.version == 1
        run = client.get_run(version.run_id)
        assert run.data.tags["method"] == method and run.data.params["split_digest"]


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


def test_evaluate_logs_metrics_and_champion(ran) -> None:
    result, cfg = ran
    client = MlflowClient(cfg.tracking_uri)
    assert {o.method for o in result.outcomes} == {"perlin", "croppaste"}
    for outcome in result.outcomes:
        run = client.get_run(outcome.run_id)
        assert run.data.tags["detector"] == "segmenter" and run.data.tags["product"] == "wood"
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1max", "image_auroc", "image_ap", "image_f1max"):
            assert 0.0 <= run.data.metrics[name] <= 1.0
        assert any(key.startswith("pixel_ap.") for key in run.data.metrics)
        assert run.data.tags["dataset_digest"] and run.data.tags["model_version"] == "1"
        assert run.inputs.dataset_inputs, "the dataset is logged as the run's input"
        champion = client.get_model_version_by_alias(f"defectsynth-wood-{outcome.method}", "champion")
        assert str(champion.version) == "1" and outcome.champion
    assert result.report.read_text().count("wood") == 2


def test_failed_worker_group_resumes_from_checkpoint(ran) -> None:
    """Kill the training worker after its first checkpoint: FailureConfig restarts it from there."""
    from defectsynth.jobs.evaluate import evaluate

    _, base = ran
    cfg = base.model_copy(deep=True)
    cfg.methods = ["perlin"]
    cfg.evaluate.max_steps, cfg.evaluate.checkpoint_every, cfg.evaluate.validate_every = 300, 10, 150
    runs = cfg.workdir / "ray_results"
    before = set(runs.iterdir())
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.append(evaluate(cfg)), daemon=True)
    thread.start()
    wait_for_first_checkpoint(runs, "evaluate-wood-*", exclude=before)
    assert kill_train_workers(), "no training worker to kill"
    thread.join(timeout=600)
    assert outcomes, "evaluate did not finish after the restart"
    state = json.loads((cfg.workdir / "detectors/wood/perlin/state.json").read_text())
    assert state["step"] == 300
    assert state["resumed_at"] and 10 <= state["resumed_at"][0] < 300
