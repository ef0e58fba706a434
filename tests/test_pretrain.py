"""The tiny base's pretraining: its losses, and ``jobs.pretrain`` on real Ray Train + a SQLite MLflow registry."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import (
    augment,
    chroma_l1,
    image_gradient_l1,
    latent_scaling_factor,
    mark_loss_weights,
    random_square_crop,
    rotate_hue,
    training_prompts,
    vae_crop_at,
    vae_loss,
)
from defectsynth.diffusion.settings import TinyModelSettings, is_tiny_base
from defectsynth.diffusion.tracking import BASE_TINY
from defectsynth.jobs import pretrain as pretrain_job
from defectsynth.jobs.pretrain import MODEL_DIR, RESUMED, base_digest, ensure_base_model, find_registered
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import setup_tracking
from defectsynth.storage.demo import write_demo
from helpers.ray_train import kill_train_workers, wait_for_first_checkpoint
from helpers.tiny_diffusion import TINY_BASE_OVERRIDES as TINY_OVERRIDES
from helpers.tiny_diffusion import tiny_model


def test_augment_is_deterministic_per_generator_and_keeps_shape() -> None:
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    first = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    other = augment(images, torch.Generator().manual_seed(2))
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, other)


def test_random_square_crop_cuts_each_image_from_itself() -> None:
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    crops = random_square_crop(images, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 8, 8)
    for image, crop in zip(images, crops, strict=True):
        y, x = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 16)
        assert torch.equal(crop, image[:, y : y + 8, x : x + 8])
    assert random_square_crop(images, None, torch.Generator()) is images
    with pytest.raises(ValueError, match="vae_crop 32 is larger than the 16x16"):
        random_square_crop(images, 32, torch.Generator())


def test_rotate_hue_turns_each_image_about_the_grey_axis() -> None:
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    images[0] = 0.25  # a grey image
    turned = rotate_hue(images, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(turned[0], images[0])  # grey stays grey
    torch.testing.assert_close(turned.mean(dim=1), images.mean(dim=1))  # the grey part of each pixel is kept
    torch.testing.assert_close(turned.norm(dim=1), images.norm(dim=1))  # a rotation: no colour lost
    assert (turned[1:] - images[1:]).abs().amax(dim=(1, 2, 3)).min() > 0.05  # each colour image turned
    assert rotate_hue(images, 0.0, torch.Generator()) is images


def test_chroma_l1_sees_a_tint_and_not_a_grey_shift() -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) - 0.5
    assert float(chroma_l1(images + 0.3, images)) == pytest.approx(0.0, abs=1e-6)  # brighter: no colour change
    tinted = images.clone()
    tinted[:, 0] += 0.3  # redder
    assert float(chroma_l1(tinted, images)) == pytest.approx(0.3 * (2 / 3 + 1 / 3 + 1 / 3) / 3, rel=1e-5)


def test_the_vae_trains_on_crops_then_its_last_steps_on_whole_images() -> None:
    split = TinyModelSettings(vae_steps=600, vae_crop=64, vae_whole_image_steps=150)
    assert [vae_crop_at(split, step) for step in (0, 449, 450, 599)] == [64, 64, None, None]
    assert {vae_crop_at(TinyModelSettings(vae_steps=600, vae_crop=64), step) for step in range(600)} == {64}
    with pytest.raises(ValueError, match="vae_whole_image_steps 700 exceeds vae_steps 600"):
        TinyModelSettings(vae_steps=600, vae_crop=64, vae_whole_image_steps=700)


def test_mark_weights_cover_every_latent_cell_a_mark_touches() -> None:
    marks = torch.zeros(2, 1, 16, 16)
    marks[0, 0, 5, 2:14] = 1  # a 1-px line through latent row 1 (4-px cells)
    weights = mark_loss_weights(marks, (4, 4), 10.0)
    assert weights is not None and weights.shape == (2, 1, 4, 4)
    assert torch.equal(weights[0, 0, 1], torch.full((4,), 10.0)) and weights[0].sum() == 4 * 10 + 12
    assert torch.equal(weights[1], torch.ones(1, 4, 4))
    assert mark_loss_weights(marks, (4, 4), 1.0) is None


def test_empty_prompts_are_about_a_tenth() -> None:
    prompts = training_prompts(["a photo of wood"] * 2000, torch.Generator().manual_seed(0))
    share = prompts.count("") / len(prompts)
    assert 0.07 < share < 0.13 and "a photo of wood" in prompts


def test_vae_training_reduces_reconstruction_loss() -> None:
    model = tiny_model()
    images = (torch.rand(1, 3, 1, 1) * 2 - 1).expand(4, 3, 32, 32).contiguous()
    model.vae.requires_grad_(True)
    optimizer = torch.optim.Adam(model.vae.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        loss = vae_loss(model, images, torch.Generator().manual_seed(step), 1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_the_vae_loss_weighs_kl_per_pixel_value_as_stable_diffusion_does() -> None:
    """SD's VAE sums reconstruction and KL over each image; per pixel value, KL keeps kl_weight against the pixels."""
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    weight = 1e-2
    with_kl = vae_loss(model, images, torch.Generator().manual_seed(0), weight)
    without = vae_loss(model, images, torch.Generator().manual_seed(0), 0.0)
    kl = model.vae.encode(images).latent_dist.kl()  # summed over each image's latent values
    assert float(with_kl - without) == pytest.approx(weight * float(kl.mean()) / (3 * 32 * 32), rel=1e-4)


def test_image_gradient_l1_weighs_a_lost_thin_line_above_the_pixel_loss() -> None:
    grey = torch.zeros(1, 3, 16, 16)
    lined = grey.clone()
    lined[..., 8] = -1.0  # a 1-px dark vertical line
    assert image_gradient_l1(lined, lined) == 0
    pixel = float((grey - lined).abs().mean())  # 1/16: the line is a 16th of the pixels
    edges = float(image_gradient_l1(grey, lined))  # two edges of height 1 in every row of 15 differences
    assert edges == pytest.approx(2 / 15) and edges > 2 * pixel


def test_latent_scaling_factor_makes_latents_unit_variance() -> None:
    model = tiny_model()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    model.vae.register_to_config(scaling_factor=latent_scaling_factor(model, images))
    assert model.encode_images(images).std().item() == pytest.approx(1.0, rel=1e-3)


def test_pretraining_reads_only_the_training_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=2, per_defect=3, products=["wood"], progress=False)
    cfg = load_config(None, [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_OVERRIDES])
    prepared = prepare_dataset(cfg)
    read: list[str] = []
    real_load = pretrain_job.load_real
    monkeypatch.setattr(pretrain_job, "load_real", lambda p, ids, r: read.extend(ids) or real_load(p, ids, r))
    (vae_images, vae_names), (unet_images, unet_names) = pretrain_job.load_training_images(
        pretrain_job.pretrain_task(cfg, prepared)
    )
    split = prepared.split.products["wood"]
    train_defects = [i for ids in split.generator_train.values() for i in ids]
    assert len(unet_images) == len(split.train_normals) == len(unet_names)
    assert len(vae_images) == len(split.train_normals) + len(train_defects) == len(vae_names)
    assert set(read) == set(split.train_normals) | set(train_defects)
    assert not set(read) & set(split.test + split.val_normals)
    assert vae_images.min() >= -1 and vae_images.max() <= 1


@pytest.fixture(scope="module")
def cluster() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_pretrain_registers_the_base_and_a_second_run_reuses_it(
    cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=2, per_defect=3, products=["wood"], progress=False)
    cfg = load_config(None, [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_OVERRIDES])
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)

    first = ensure_base_model(cfg, prepared)
    assert not first.reused and first.uri == f"models:/{BASE_TINY}/1"
    bars = capsys.readouterr().err  # one bar per phase, counted in steps by the worker
    tiny = cfg.diffusion.tiny
    assert "pretrain vae: 100%" in bars and f"{tiny.vae_steps}/{tiny.vae_steps}" in bars
    assert "pretrain unet: 100%" in bars and f"{tiny.unet_steps}/{tiny.unet_steps}" in bars
    again = ensure_base_model(cfg, prepared)
    assert again.reused and again.uri == first.uri
    assert len(MlflowClient().search_model_versions(f"name='{BASE_TINY}'")) == 1

    # the registry round trip gives the very model the fit saved
    mlflow.set_tracking_uri(cfg.tracking_uri)
    loaded = load_base_model(first.uri)
    saved_dir = cfg.workdir / "pretrain" / _digest_dir(cfg) / MODEL_DIR
    saved = DiffusionModel.load(saved_dir)
    assert is_tiny_base(str(saved_dir))  # a tiny base reused by its path is still known as tiny
    assert loaded.vae.config.scaling_factor == saved.vae.config.scaling_factor != 1.0
    latents = torch.randn(2, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    context = loaded.encode_prompt(["a photo of wood", ""])
    torch.testing.assert_close(
        loaded.unet(latents, 500, encoder_hidden_states=context).sample,
        saved.unet(latents, 500, encoder_hidden_states=saved.encode_prompt(["a photo of wood", ""])).sample,
    )
    predicted = mlflow.pyfunc.load_model(first.uri).predict(
        __import__("pandas").DataFrame({"prompt": ["a photo of wood"], "seed": [3]})
    )
    assert predicted[0].shape == (32, 32, 3) and predicted[0].dtype.name == "uint8"
    assert mlflow.models.get_model_info(first.uri).signature.inputs.input_names() == ["prompt", "seed"]

    # a changed setting is a different base, which would be trained anew
    changed = cfg.model_copy(deep=True)
    changed.diffusion.tiny.unet_steps = 4
    assert base_digest(changed, prepared) != base_digest(cfg, prepared)
    assert find_registered(base_digest(changed, prepared)) is None


def _digest_dir(cfg) -> str:
    (only,) = [p.name for p in (cfg.workdir / "pretrain").iterdir()]
    return only


@pytest.mark.integration
def test_a_killed_pretraining_worker_resumes_from_its_checkpoint(cluster, tmp_path: Path) -> None:
    """Kill the worker after its first checkpoint: FailureConfig restarts it from there, not from step 0."""
    root = tmp_path / "data"
    write_demo(root, size=32, train_good=4, test_good=2, per_defect=3, products=["wood"], progress=False)
    steps = ["diffusion.tiny.vae_steps=20", "diffusion.tiny.unet_steps=20", "pretrain.checkpoint_every=5"]
    steps += ["diffusion.tiny.vae_crop=16", "diffusion.tiny.vae_whole_image_steps=10"]  # crops, then whole
    cfg = load_config(
        None, [f"data.root={root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_OVERRIDES, *steps]
    )
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    runs = cfg.workdir / "ray_results"
    refs: list = []
    thread = threading.Thread(target=lambda: refs.append(ensure_base_model(cfg, prepared)), daemon=True)
    thread.start()
    wait_for_first_checkpoint(runs, "pretrain-base-*")
    assert kill_train_workers(), "no training worker to kill"
    thread.join(timeout=600)
    assert refs and refs[0].version == "1", "pretraining did not finish after the restart"
    (result,) = (cfg.workdir / "pretrain").iterdir()
    resumed = json.loads((result / RESUMED).read_text())
    assert resumed, "the restarted worker started from scratch"
    phase, step = resumed[0].split(":")
    assert phase in ("vae", "unet") and int(step) % 5 == 0 and (phase, int(step)) != ("vae", 0)
    curves = json.loads((result / "curves.json").read_text())
    assert len(curves) == 40  # every step once: the restart redid none that were checkpointed
