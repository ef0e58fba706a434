"""SeaS on the platform: a fit in Ray Train (DeepSpeed, CPU), generation of anomalies and normals from the registry."""

from __future__ import annotations

from collections import Counter
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
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.tiny_base import register_tiny_base
from helpers.tiny_diffusion import TINY_BASE_OVERRIDES

pytestmark = pytest.mark.integration

NORMALS = 2
# The jobs' test base has two U-Net blocks (cross-attention in down block 0) and a two-block VAE.
SEAS = (
    "generators.seas={steps_per_type: null, mask_steps_per_type: null, anomaly_tokens: 2, normal_images: 4,"
    " alignment_blocks: [0], mask_unet_blocks: [0, 1],"
    " mask_vae_blocks: [0, 1], sampling_steps: 2, mask_average_steps: 2, guidance_scale: 2.0,"
    " mask: {coarse_channels: [16, 8], transformer_layers: 1, attention_heads: 2, refine_channels: 16,"
    " norm_groups: 8}}"
)


@pytest.fixture
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_seas_fits_in_ray_train_and_writes_anomalies_and_normals(cluster, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=1, per_defect=3, products=["wood"], progress=False)
    overrides = [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_BASE_OVERRIDES]
    overrides += ["methods=[seas]", "evaluate.baselines=[]", "finetune.max_steps=2", "generate.per_type=1"]
    overrides += [f"generate.normals_per_product={NORMALS}", SEAS]
    cfg = load_config(None, overrides)
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    register_tiny_base(cfg, prepared)  # the fit is the subject here: test_pretrain trains the base

    (fitted,) = finetune(cfg, prepared)
    metrics = MlflowClient(cfg.tracking_uri).get_run(fitted.run_id).data.metrics
    assert {"loss", "noise_df", "da", "na", "mask_loss"} <= set(metrics), "both phases report their losses"

    (generated,) = generate(cfg, prepared)
    (product,) = prepared.products
    card = read_card(resolve(generated.uri))
    assert card["counts"] == {"wood": {**dict.fromkeys(product.defect_types, 1), "good": NORMALS}}
    rows = read_manifest(resolve(generated.uri), ["label", "sampler", "steps"]).to_pylist()
    assert Counter(row["label"] for row in rows) == {0: NORMALS, 1: len(product.defect_types)}
    assert {(row["sampler"], row["steps"]) for row in rows} == {("dpm_solver++", 2)}  # seas's default
    streamed = list(stream(generated.uri))  # what a training cluster reads back: no conditioning masks
    assert len(streamed) == len(rows) and not any("cond_mask" in sample for sample in streamed)
    assert all(sample["mask"].any() == (sample["metadata"]["label"] == 1) for sample in streamed)
