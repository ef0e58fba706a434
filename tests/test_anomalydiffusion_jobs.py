"""AnomalyDiffusion on the platform: one joint fit over two products in Ray Train, generation from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from defectsynth.diffusion.tracking import BASE_TINY
from defectsynth.jobs.finetune import finetune
from defectsynth.jobs.generate import generate
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import experiment_id, setup_tracking
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.tiny_base import register_tiny_base
from helpers.tiny_diffusion import TINY_BASE_OVERRIDES

pytestmark = pytest.mark.integration

PRODUCTS = ("pill", "wood")
JOINT = (
    "generators.anomalydiffusion={joint_products: true, anomaly_tokens: 2, sampling_steps: 2, batch_size: 2,"
    " spatial: {depth: 18, width: 8, fpn_channels: 16}, mask_generator: {steps: 2, sampling_steps: 2, batch_size: 2}}"
)


@pytest.fixture
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_joint_fit_is_registered_for_every_product_and_generates_each(cluster, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=1, per_defect=3, products=list(PRODUCTS), progress=False)
    overrides = [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_BASE_OVERRIDES]
    overrides += ["methods=[anomalydiffusion]", "evaluate.baselines=[]", "finetune.max_steps=2", "generate.per_type=1"]
    overrides += [JOINT]
    cfg = load_config(None, overrides)
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    register_tiny_base(cfg, prepared)  # the fit is the subject here: test_pretrain trains the base

    outcomes = finetune(cfg, prepared)
    joint = [o for o in outcomes if o.method == "anomalydiffusion"]
    assert sorted(o.product for o in joint) == list(PRODUCTS)
    client = MlflowClient(cfg.tracking_uri)
    runs = [client.get_run(o.run_id) for o in joint]
    assert {r.data.params["fitted_with"] for r in runs} == {",".join(PRODUCTS)}, "one fit serves both products"
    for outcome, run in zip(joint, runs, strict=True):
        assert run.data.tags["product"] == outcome.product
        assert run.info.experiment_id == experiment_id(cfg, outcome.product)
    assert [o.method for o in outcomes] == ["anomalydiffusion"] * len(PRODUCTS)

    (generated,) = generate(cfg, prepared)
    card = read_card(resolve(generated.uri))
    assert {p: sum(types.values()) for p, types in card["counts"].items()} == {
        p.name: len(p.defect_types) for p in prepared.products
    }
    (base_model,) = {g["base_model"] for g in card["generators"]}
    assert base_model.startswith(f"models:/{BASE_TINY}/"), "samples name the registered base the fit loaded"
    manifest = read_manifest(resolve(generated.uri), ["base_model", "sampler", "steps"]).to_pylist()
    assert manifest and all(row == {"base_model": base_model, "sampler": "ddim", "steps": 2} for row in manifest)
