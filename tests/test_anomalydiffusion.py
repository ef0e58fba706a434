"""The anomalydiffusion generator end to end on a tiny base: what trains, what it writes, what it keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.settings import TINY_BASE_MARKER, is_tiny_base
from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.anomalydiffusion.generator import (
    ENCODER_FILE,
    SPATIAL_GROUP,
    AnomalyDiffusionGenerator,
    AnomalyDiffusionSettings,
    anomaly_group,
    mask_group,
)
from defectsynth.generators.anomalydiffusion.spatial_encoder import build_spatial_encoder
from defectsynth.generators.base import FitContext, auto_mask_source, build_generator
from defectsynth.generators.masks import load_source
from defectsynth.generators.training_pairs import (
    TrainingDefects,
    augment_pair,
    augmented_batch,
    random_orientation,
    to_model_range,
)
from defectsynth.storage.demo import write_demo
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.split import SplitSettings, split_product
from helpers.generator_contract import held_out_poisoned, make_requests
from helpers.tiny_diffusion import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 32
TINY = {
    "anomaly_tokens": 2,
    "spatial": {"depth": 18, "width": 8, "fpn_channels": 16},
    "mask_generator": {"steps": 3, "sampling_steps": 3, "batch_size": 2},
    "sampling_steps": 4,
    "batch_size": 2,
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("anodiff")
    write_demo(root / "data", size=SIDE, train_good=3, test_good=1, per_defect=3, products=["wood"], progress=False)
    product = read_dataset(root / "data", "mvtec", ["wood"])[0]
    split = split_product(product, SplitSettings())
    base_dir = tiny_model(resolution=SIDE).save(root / "base")
    generator = build_generator("anomalydiffusion", TINY)
    context = FitContext(output_dir=root / "artifacts", max_steps=4, base_model=str(base_dir), seed=3)
    artifacts = generator.fit(held_out_poisoned(product, split), split, context)
    return product, split, base_dir, generator, artifacts


def _untouched_rows(model: DiffusionModel, placeholder_ids: list[int]) -> torch.Tensor:
    table = model.text_encoder.get_input_embeddings().weight
    keep = torch.ones(table.shape[0], dtype=torch.bool)
    keep[placeholder_ids] = False
    return table[keep]


def test_only_the_embeddings_and_the_spatial_encoder_train(fitted) -> None:
    _, _, base_dir, generator, artifacts = fitted
    base = DiffusionModel.load(base_dir)
    trained = generator.model
    for name in ("vae", "unet"):
        before, after = getattr(base, name).state_dict(), getattr(trained, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"the {name} changed"
    encoder_before = {k: v for k, v in base.text_encoder.state_dict().items() if "token_embedding" not in k}
    encoder_after = trained.text_encoder.state_dict()
    assert all(torch.equal(v, encoder_after[k]) for k, v in encoder_before.items()), "the text encoder changed"
    ids = generator.tokens.ids()
    original_rows = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(_untouched_rows(trained, ids)[: len(original_rows)], original_rows)
    # e_m of every type moved away from its start (the product word's mean embedding); e_a of the types drawn
    table = trained.text_encoder.get_input_embeddings().weight
    fresh = PlaceholderTokens(DiffusionModel.load(base_dir))
    fresh.add("probe", count=1, initializer="wood")
    start = fresh.embedding.weight[fresh.ids("probe")[0]]

    def moved(group: str) -> bool:
        return not torch.allclose(
            table[generator.tokens.ids(group)], start.expand(len(generator.tokens.ids(group)), -1)
        )

    keys = [("wood", t) for t in generator.defect_types["wood"]]
    assert all(moved(mask_group(key)) for key in keys)
    assert any(moved(anomaly_group(key)) for key in keys)
    # E moved away from its initialisation (seeded with the fit's seed right before it is built)
    torch.manual_seed(3)
    initial = build_spatial_encoder(generator.settings.spatial, trained.text_encoder.config.hidden_size).state_dict()
    learned = torch.load(artifacts / ENCODER_FILE, weights_only=True)
    assert any(not torch.equal(initial[k], learned[k]) for k in initial if learned[k].is_floating_point())
    curves = json.loads((artifacts / "curves.json").read_text())
    assert len(curves["embedding_loss"]) == 4 and set(curves["mask_loss"]) == {"/".join(key) for key in keys}


def test_generation_keeps_the_normal_outside_the_mask_and_is_deterministic(fitted) -> None:
    product, split, _, _, artifacts = fitted
    generator = build_generator("anomalydiffusion", TINY)
    generator.load(artifacts)  # a fresh instance, as in a generation actor
    generator.settings = generator.settings.model_copy(update={"aar_form": "paper"})  # the costlier form, too
    requests = make_requests(product, split, "anomalydiffusion", 3, "real", resolution=SIDE)
    first = generator.generate(requests)
    generator.settings = generator.settings.model_copy(update={"generation_batch": 2})
    again = generator.generate(requests[::-1])[::-1]
    generator.settings = generator.settings.model_copy(update={"paste_background": "cells"})
    by_cells = generator.generate(requests)
    for sample, repeat, cells_kept, request in zip(first, again, by_cells, requests, strict=True):
        assert np.array_equal(sample.image, repeat.image), "a sample depends only on its request, not its batch"
        source = load_source(request)
        assert np.array_equal(sample.image[~sample.cond_mask], source[~sample.cond_mask])
        assert not (sample.mask & ~sample.cond_mask).any(), "the refined mask lies inside the conditioning mask"
        assert sample.metadata.generator.method == "anomalydiffusion"
        cond = torch.from_numpy(sample.cond_mask[None, None].astype(np.float32))
        latent_side = generator.model.latent_shape[-1]
        cells = F.interpolate(F.adaptive_max_pool2d(cond, latent_side), size=SIDE, mode="nearest")[0, 0] > 0
        assert np.array_equal(cells_kept.image[~cells.numpy()], source[~cells.numpy()])
        assert np.array_equal(cells_kept.image[sample.cond_mask], sample.image[sample.cond_mask])


def test_learned_masks_feed_generation(fitted) -> None:
    product, split, _, generator, _ = fitted
    requests = make_requests(product, split, "anomalydiffusion", 2, "learned", resolution=SIDE)
    samples = generator.generate(requests)
    assert all(s.cond_mask.shape == (SIDE, SIDE) and s.cond_mask.dtype == bool for s in samples)
    for request, sample in zip(requests, samples, strict=True):
        alone = generator.learned_masks((request.product, request.defect_type), [request.seed])[0]
        assert np.array_equal(sample.cond_mask, alone), "a learned mask depends only on its type and seed"
    key, seed = (requests[0].product, requests[0].defect_type), requests[0].seed
    alone = generator.learned_masks(key, [seed])[0]
    inside = np.flatnonzero(alone)
    assert inside.size >= 2
    region = np.zeros(SIDE * SIDE, dtype=bool)
    region[inside[: inside.size // 2]] = True  # a foreground holding half of the mask
    region = region.reshape(SIDE, SIDE)
    cut = generator.learned_masks(key, [seed], [region])[0]
    assert np.array_equal(cut, region), "a mask with a part on the foreground keeps that part, not redrawn"


@pytest.mark.parametrize("switch", ["aar", "spatial_embedding", "masked_loss"])
def test_ablation_switches_are_settings(switch: str) -> None:
    settings = AnomalyDiffusionSettings.model_validate({switch: False})
    assert getattr(settings, switch) is False
    assert AnomalyDiffusionSettings().aar_form == "code"
    with pytest.raises(ValueError, match="aar_form"):
        AnomalyDiffusionSettings.model_validate({"aar_form": "pixels"})


def test_without_spatial_embedding_there_is_no_encoder(tmp_path: Path) -> None:
    write_demo(tmp_path / "data", size=SIDE, train_good=2, test_good=1, per_defect=3, products=["wood"], progress=False)
    product = read_dataset(tmp_path / "data", "mvtec", ["wood"])[0]
    split = split_product(product, SplitSettings())
    base_dir = tiny_model(resolution=SIDE).save(tmp_path / "base")
    settings = {**TINY, "spatial_embedding": False, "aar": False, "masked_loss": False}
    generator = build_generator("anomalydiffusion", settings)
    context = FitContext(output_dir=tmp_path / "artifacts", max_steps=2, base_model=str(base_dir))
    artifacts = generator.fit(product, split, context)
    assert not (artifacts / ENCODER_FILE).exists() and SPATIAL_GROUP not in generator.tokens.groups_flat[0]
    samples = generator.generate(make_requests(product, split, "anomalydiffusion", 1, "perlin", resolution=SIDE))
    assert samples[0].image.shape == (SIDE, SIDE, 3)


def defect_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random 32-px image and a rectangular defect mask near its top-right corner."""
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[2:9, 24:30] = True
    return image, mask


def test_augment_pair_keeps_the_defect_in_the_frame() -> None:
    rng = np.random.default_rng(0)
    image, mask = defect_pair(rng)
    for _ in range(20):
        moved_image, moved_mask = augment_pair(image, mask, rng, (0.6, 1.0))
        assert moved_image.shape == image.shape and moved_mask.shape == mask.shape
        assert moved_mask.sum() >= 0.8 * mask.sum(), "the defect stays whole (crops only enlarge it)"


def test_augment_pair_without_orient_keeps_the_orientation() -> None:
    rng = np.random.default_rng(0)
    image, mask = defect_pair(rng)
    for _ in range(8):
        moved_image, moved_mask = augment_pair(image, mask, rng, (1.0, 1.0), orient=False)
        assert np.array_equal(moved_image, image) and np.array_equal(moved_mask, mask)  # no crop, no flip, no turn
    turned = [augment_pair(image, mask, rng, (1.0, 1.0))[0] for _ in range(8)]
    assert any(not np.array_equal(t, image) for t in turned)


@pytest.mark.parametrize("orient", [True, False])
def test_augmented_batch_moves_each_mask_with_its_image_and_turns_only_when_asked(orient: bool) -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:5, 3:9] = True
    image = np.repeat(mask[..., None] * np.uint8(255), 3, axis=-1)  # white where the defect is
    defects = TrainingDefects([image], [mask], [("wood", "crack")])
    batches = [augmented_batch(defects, [0, 0], np.random.default_rng(seed), (1.0, 1.0), orient) for seed in range(6)]
    for images, masks in batches:
        assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 1, 16, 16)
        assert torch.equal(images[:, 0] > 0, masks[:, 0] > 0.5)
    unmoved = to_model_range([image, image])
    assert any(not torch.equal(images, unmoved) for images, _ in batches) == orient


def test_random_orientation_moves_every_array_alike() -> None:
    rng = np.random.default_rng(3)
    grid = np.arange(16).reshape(4, 4)
    for _ in range(8):
        image, mask = random_orientation([np.stack([grid] * 3, axis=-1), grid > 7], rng)
        assert np.array_equal(image[..., 0], image[..., 2]) and np.array_equal(mask, image[..., 0] > 7)


def test_fit_needs_a_base_model(tmp_path: Path) -> None:
    generator = AnomalyDiffusionGenerator(AnomalyDiffusionSettings())
    with pytest.raises(ValueError, match="base model"):
        generator.fit(None, None, FitContext(output_dir=tmp_path, max_steps=1))


def test_a_prompt_longer_than_the_text_encoder_is_refused_before_training(tmp_path: Path) -> None:
    """The washer prompt with six placeholder tokens takes 19 positions; a 16-position encoder would truncate it."""
    write_demo(
        tmp_path / "data", size=SIDE, train_good=2, test_good=1, per_defect=3, products=["washer"], progress=False
    )
    product = read_dataset(tmp_path / "data", "mvtec", ["washer"])[0]
    split = split_product(product, SplitSettings())
    base_dir = tiny_model(resolution=SIDE, words=("washer",), prompt_length=16).save(tmp_path / "base")
    context = FitContext(output_dir=tmp_path / "artifacts", max_steps=1, base_model=str(base_dir))
    with pytest.raises(ValueError, match="takes 19 tokens, the text encoder holds 16"):
        build_generator("anomalydiffusion", TINY).fit(product, split, context)
    assert not (tmp_path / "artifacts").exists()


def test_a_restarted_fit_resumes_from_its_checkpoint(fitted, tmp_path: Path) -> None:
    """A fit checkpoints every checkpoint_every steps; one given resume_from starts after that step."""
    import shutil

    product, split, base_dir, _, _ = fitted
    saved: list[Path] = []

    def keep(directory: Path, metrics: dict) -> None:
        saved.append(Path(shutil.copytree(directory, tmp_path / f"checkpoint-{len(saved)}")))

    first = build_generator("anomalydiffusion", TINY)
    context = FitContext(
        output_dir=tmp_path / "a", max_steps=4, base_model=str(base_dir), checkpoint_every=2, save_checkpoint=keep
    )
    first.fit(product, split, context)
    assert len(saved) == 1 and json.loads((saved[0] / "progress.json").read_text())["step"] == 2

    resumed = build_generator("anomalydiffusion", TINY)
    context = FitContext(output_dir=tmp_path / "b", max_steps=4, base_model=str(base_dir), resume_from=saved[0])
    artifacts = resumed.fit(product, split, context)
    curve = json.loads((artifacts / "curves.json").read_text())["embedding_loss"]
    checkpointed = json.loads((saved[0] / "progress.json").read_text())["curve"]
    assert len(curve) == 4 and curve[:2] == checkpointed


def test_an_empty_conditioning_mask_leaves_the_normal_unchanged(fitted, monkeypatch) -> None:
    product, split, _, generator, _ = fitted
    requests = make_requests(product, split, "anomalydiffusion", 2, "real", resolution=SIDE)
    masks = generator.conditioning_masks(requests)
    masks[0] = np.zeros_like(masks[0])  # a learned mask can stay empty after every redraw
    monkeypatch.setattr(generator, "conditioning_masks", lambda batch: masks)
    empty, painted = generator.generate(requests)
    assert np.array_equal(empty.image, load_source(requests[0])) and not empty.mask.any()
    assert painted.cond_mask.any() and not np.array_equal(painted.image, load_source(requests[1]))


def test_a_joint_fit_serves_every_product_with_one_spatial_encoder(tmp_path: Path) -> None:
    """joint_products: e_a and e_m per (product, type), one E; each product's requests generate from it."""
    write_demo(
        tmp_path / "data", size=SIDE, train_good=3, test_good=1, per_defect=3, products=["wood", "pill"], progress=False
    )
    products = read_dataset(tmp_path / "data", "mvtec", ["wood", "pill"])
    splits = [split_product(p, SplitSettings()) for p in products]
    base_dir = tiny_model(resolution=SIDE, words=("wood", "pill")).save(tmp_path / "base")
    companions = [(products[1], splits[1])]
    context = FitContext(output_dir=tmp_path / "a", max_steps=2, base_model=str(base_dir), companions=companions)
    with pytest.raises(ValueError, match="joint_products"):
        build_generator("anomalydiffusion", TINY).fit(products[0], splits[0], context)

    joint = build_generator("anomalydiffusion", {**TINY, "joint_products": True})
    artifacts = joint.fit(products[0], splits[0], context)
    assert joint.defect_types == {p.name: sorted(p.defect_types) for p in products}
    assert {g for g in joint.tokens.groups if g.startswith("anomaly_")} == {
        anomaly_group((p.name, t)) for p in products for t in p.defect_types
    }
    loaded = build_generator("anomalydiffusion", {})
    loaded.load(artifacts)
    for product, split in zip(products, splits, strict=True):
        samples = loaded.generate(make_requests(product, split, "anomalydiffusion", 1, "real", resolution=SIDE))
        assert samples and all(s.cond_mask.any() for s in samples)


def test_artifacts_of_another_layout_are_refused_by_name(fitted, tmp_path: Path) -> None:
    import shutil

    *_, artifacts = fitted
    old = Path(shutil.copytree(artifacts, tmp_path / "old"))
    manifest = json.loads((old / "generator.json").read_text())
    assert manifest["products"] == ["wood"]
    (old / "generator.json").write_text(json.dumps({**manifest, "layout": 1}))
    with pytest.raises(ValueError, match="layout 1.*re-fit"):
        build_generator("anomalydiffusion", {}).load(old)


def test_auto_mask_source_follows_the_base() -> None:
    assert auto_mask_source("anomalydiffusion", tiny_base=True) == "real"
    assert auto_mask_source("anomalydiffusion", tiny_base=False) == "learned"
    assert auto_mask_source("perlin", tiny_base=True) == auto_mask_source("perlin", tiny_base=False) == "perlin"


def test_a_tiny_base_is_known_by_name_or_by_its_marker_file(tmp_path: Path) -> None:
    assert is_tiny_base("tiny")
    assert not is_tiny_base(str(tmp_path))  # a diffusers directory of Stable Diffusion has no marker
    (tmp_path / TINY_BASE_MARKER).write_text("{}")
    assert is_tiny_base(str(tmp_path))
