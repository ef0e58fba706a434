"""CADiff on the platform: a fit in Ray Train (DeepSpeed, CPU), generation at chosen intensities from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from defectsynth.jobs.finetune import finetune
from defectsynth.jobs.generate import generate
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import setup_tracking
from defectsynth.storage import stream
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_manifest
from helpers.tiny_base import register_tiny_base
from helpers.tiny_diffusion import TINY_BASE_OVERRIDES

pytestmark = pytest.mark.integration

LEVELS = [0.5, 1.5]
CADIFF = "generators.cadiff={batch_size: 2, saim_heads: 2, sampling_steps: 2, guidance_scale: 2.0}"


@pytest.fixture
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_cadiff_fits_in_ray_train_and_records_each_samples_intensity(cluster, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=1, per_defect=3, products=["wood"], progress=False)
    overrides = [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_BASE_OVERRIDES]
    overrides += ["methods=[cadiff]", "evaluate.baselines=[]", "finetune.max_steps=2", "generate.per_type=2"]
    overrides += [f"generate.intensity={LEVELS}", "generate.mask_source=real", CADIFF]
    cfg = load_config(None, overrides)
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    register_tiny_base(cfg, prepared)  # the fit is the subject here: test_pretrain trains the base

    (fitted,) = finetune(cfg, prepared)
    metrics = MlflowClient(cfg.tracking_uri).get_run(fitted.run_id).data.metrics
    assert {"loss", "noise", "loc", "con"} <= set(metrics), "every term of Eq. 8 is reported"
    plots = {a.path for a in MlflowClient(cfg.tracking_uri).list_artifacts(fitted.run_id, "curves")}
    assert plots == {"curves/cadiff.png"}, "the losses are logged as a plot too"

    (generated,) = generate(cfg, prepared)
    rows = read_manifest(resolve(generated.uri), ["defect_type", "intensity"]).to_pylist()
    (product,) = prepared.products
    assert len(rows) == 2 * len(product.defect_types)
    assert sorted(row["intensity"] for row in rows) == sorted(LEVELS * len(product.defect_types))
    streamed = {sample["metadata"]["intensity"] for sample in stream(generated.uri)}
    assert streamed == set(LEVELS)  # what a training cluster reads back, to filter by
