"""BADG on the platform: one fit per defect type in Ray Train (DeepSpeed, CPU), one model per product, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from defectsynth.jobs.finetune import finetune
from defectsynth.jobs.generate import generate
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import load_generator, registry_uri, setup_tracking
from defectsynth.storage import stream
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card
from helpers.tiny_base import register_tiny_base
from helpers.tiny_diffusion import TINY_BASE_OVERRIDES

pytestmark = pytest.mark.integration

BADG = "generators.badg={steps: null, batch_size: 2, learning_rate: 1.0e-4, sampling_steps: 2, mask_threshold: 0.05}"


@pytest.fixture
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_badg_fits_per_type_and_records_the_background_measures(cluster, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=1, per_defect=3, products=["wood"], progress=False)
    overrides = [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_BASE_OVERRIDES]
    overrides += ["methods=[badg]", "evaluate.baselines=[]", "finetune.max_steps=2", "generate.per_type=1", BADG]
    cfg = load_config(None, overrides)
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    register_tiny_base(cfg, prepared)  # the fit is the subject here: test_pretrain trains the base

    (fitted,) = finetune(cfg, prepared)  # one registered model for the product, holding a unit per type
    (product,) = prepared.products
    registered = load_generator(registry_uri(fitted.model_name, "candidate"))
    assert sorted(registered.units) == sorted(product.defect_types)

    (generated,) = generate(cfg, prepared)
    assert read_card(resolve(generated.uri))["counts"] == {"wood": dict.fromkeys(product.defect_types, 1)}
    for sample in stream(generated.uri):
        scores = sample["metadata"]["qc"]["scores"]
        assert {"background_psnr", "background_ssim"} <= set(scores)
        assert "cond_mask" in sample  # the target mask is kept beside the refined one
