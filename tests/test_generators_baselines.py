"""The baseline generators (perlin, croppaste) against the generator contract, plus their own behaviour."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectsynth.core.perlin_noise import perlin_mask, perlin_noise
from defectsynth.core.resize import resize_mask
from defectsynth.generators.base import FitContext, Request, build_generator
from defectsynth.generators.croppaste import feather_alpha, paste
from defectsynth.generators.masks import (
    MaskOptions,
    augment_jointly,
    augment_mask,
    conditioning_mask,
    load_foreground,
    load_source,
    request_rngs,
)
from defectsynth.generators.refine import measured_strength, refine_by_change
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import ProductSplit
from helpers.generator_contract import GeneratorContract, make_requests


def write_textures(folder: Path, count: int = 3) -> Path:
    """A few striped and noisy texture PNGs of assorted sizes, standing in for DTD."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        size = 48 + 16 * i
        stripes = (np.sin(np.arange(size) * (0.5 + i)) * 100 + 128).astype(np.uint8)
        pixels = np.stack([np.tile(stripes, (size, 1))] * 3, axis=-1)
        pixels = np.clip(pixels + rng.integers(-40, 40, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"texture_{i}.png")
    return folder


# -- the contract, once per baseline configuration -------------------------------------------------------------


class TestPerlinSelfTexture(GeneratorContract):
    method = "perlin"
    settings = {"texture_source": "self"}

    def test_perlin_masks_lie_on_the_foreground(self, samples: list, requests: list[Request]) -> None:
        for sample, request in zip(samples, requests, strict=True):
            foreground = load_foreground(request)
            if request.mask_source == "perlin" and foreground is not None:
                assert not (sample.cond_mask & ~foreground).any()

    def test_opacity_is_recorded_as_intensity(self, samples: list) -> None:
        low, high = 0.0, 0.8  # the default beta range
        for sample in samples:
            assert 1.0 - high <= sample.metadata.intensity <= 1.0 - low

    def test_fit_records_the_foreground_flag(self, generator, product: ProductData) -> None:
        assert generator.has_foreground == product.has_foreground


class TestPerlinFolderTexture(GeneratorContract):
    method = "perlin"

    @pytest.fixture(name="settings", scope="class")
    @classmethod
    def settings_fixture(cls, tmp_path_factory: pytest.TempPathFactory) -> dict:
        folder = write_textures(tmp_path_factory.mktemp("dtd"))
        return {"texture_source": "folder", "texture_dir": str(folder), "beta_range": (0.2, 0.6)}

    def test_opacity_within_the_configured_range(self, samples: list) -> None:
        for sample in samples:
            assert 0.4 <= sample.metadata.intensity <= 0.8

    def test_textures_travel_with_the_artifacts(self, artifacts: Path, generator) -> None:
        assert len(generator.textures) == 3
        assert all(path.is_relative_to(artifacts) for path in generator.textures)

    def test_request_intensity_sets_the_opacity(self, generator, requests: list[Request]) -> None:
        sample = generator.generate([dataclasses.replace(requests[0], intensity=0.9)])[0]
        assert sample.metadata.intensity == 0.9


class TestCropPaste(GeneratorContract):
    method = "croppaste"

    def test_bank_holds_exactly_the_generator_training_defects(self, generator, split: ProductSplit) -> None:
        training = sorted(i for ids in split.generator_train.values() for i in ids)
        assert sorted(generator.image_ids) == training

    def test_intensity_is_none(self, samples: list) -> None:
        assert all(sample.metadata.intensity is None for sample in samples)

    def test_named_mask_image_is_used(self, generator, split: ProductSplit, requests: list[Request]) -> None:
        request = requests[0]
        bogus = dataclasses.replace(request, mask_image=split.test_defects[request.defect_type][0])
        with pytest.raises(ValueError, match="not a generator-training defect"):
            generator.generate([bogus])

    def test_edges_are_feathered(self, artifacts: Path, generator, requests: list[Request], samples: list) -> None:
        hard = build_generator("croppaste")
        hard.load(artifacts)
        hard.settings = hard.settings.model_copy(update={"feather": 0.0})
        blends = 0
        for request, soft in zip(requests, samples, strict=True):
            sharp = hard.generate([request])[0]
            source = load_source(request)
            np.testing.assert_array_equal(sharp.cond_mask, soft.cond_mask)  # same draws, same placement
            outside = ~soft.cond_mask
            np.testing.assert_array_equal(soft.image[outside], source[outside])
            low = np.minimum(source, sharp.image).astype(int) - 1
            high = np.maximum(source, sharp.image).astype(int) + 1
            assert ((soft.image >= low) & (soft.image <= high)).all()  # every pixel between source and paste
            strict = (soft.image.astype(int) > low + 1) & (soft.image.astype(int) < high - 1)
            blends += int((strict.any(axis=2) & soft.cond_mask).sum())
        assert blends > 0


# -- shared parts ---------------------------------------------------------------------------------------------


def test_perlin_noise_is_gradient_noise() -> None:
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 48), rng, (4, 2))
    assert noise.shape == (64, 48) and noise.dtype == np.float32
    assert noise[0, 0] == pytest.approx(0.0, abs=1e-6)  # zero at every lattice point
    assert -1.5 < noise.min() < 0 < noise.max() < 1.5
    again = perlin_noise((64, 48), np.random.default_rng(0), (4, 2))
    np.testing.assert_array_equal(noise, again)


def test_perlin_mask_respects_foreground_and_min_area() -> None:
    foreground = np.zeros((64, 64), dtype=bool)
    foreground[16:48, 16:48] = True
    for seed in range(5):
        mask = perlin_mask((64, 64), np.random.default_rng(seed), foreground=foreground, min_area=30)
        assert mask.sum() >= 30 and not (mask & ~foreground).any()


def test_perlin_mask_gives_up_with_a_clear_error() -> None:
    tiny = np.zeros((64, 64), dtype=bool)
    tiny[0, 0:3] = True
    with pytest.raises(ValueError, match="fewer than"):
        perlin_mask((64, 64), np.random.default_rng(0), foreground=tiny, min_area=16)
    with pytest.raises(ValueError, match="after 3 attempts"):
        perlin_mask((64, 64), np.random.default_rng(0), threshold=5.0, max_attempts=3)


def test_augment_mask_keeps_the_mask_in_the_frame() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[2:30, 5:12] = True  # a long bar: quarter turns and the frame check both matter
    for seed in range(10):
        moved = augment_mask(mask, np.random.default_rng(seed), shape=(32, 32))
        assert moved.shape == (32, 32) and moved.any()
        assert 0.4 * mask.sum() < moved.sum() < 1.6 * mask.sum()


def test_augment_jointly_moves_image_and_mask_together() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 8:12] = True
    image[mask] = 200
    moved_image, moved_mask = augment_jointly(image, mask, np.random.default_rng(3), shape=(48, 48))
    assert moved_image.shape == (48, 48, 3)
    inside = moved_image[moved_mask].astype(int)
    assert (inside > 150).mean() > 0.9


def test_augment_mask_lands_on_the_foreground() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:18, 10:18] = True
    foreground = np.zeros((64, 64), dtype=bool)
    foreground[40:64, 40:64] = True
    for seed in range(5):
        moved = augment_mask(mask, np.random.default_rng(seed), foreground=foreground)
        assert (moved & foreground).sum() >= 0.9 * moved.sum()


def test_resize_mask_keeps_thin_masks() -> None:
    mask = np.zeros((256, 256), dtype=bool)
    mask[100, 20:200] = True  # one pixel wide: nearest sampling at 1/4 would usually miss it
    assert resize_mask(mask, 64).any()


def test_conditioning_mask_dispatch(tmp_path: Path) -> None:
    source = tmp_path / "normal.png"
    Image.fromarray(np.full((80, 80, 3), 128, dtype=np.uint8)).save(source)
    mask_path = tmp_path / "mask.png"
    mask = np.zeros((80, 80), dtype=np.uint8)
    mask[20:40, 30:35] = 255
    Image.fromarray(mask).save(mask_path)
    request = Request("p", "crack", 0, 1, 64, "n", str(source), "perlin")
    mask_rng, _ = request_rngs(request)
    perlin = conditioning_mask(request, mask_rng, MaskOptions(min_area=10))
    assert perlin.shape == (64, 64) and perlin.sum() >= 10
    real = dataclasses.replace(request, mask_source="real", mask_image="m", mask_paths=(str(mask_path),))
    assert 0 < conditioning_mask(real, request_rngs(real)[0]).sum() < 64 * 64 / 4
    with pytest.raises(ValueError, match="mask_paths"):
        conditioning_mask(dataclasses.replace(real, mask_paths=()), np.random.default_rng(0))
    with pytest.raises(ValueError, match="no mask model|own mask model"):
        conditioning_mask(dataclasses.replace(request, mask_source="learned"), np.random.default_rng(0))


def test_refine_and_strength() -> None:
    source = np.full((8, 8, 3), 100, dtype=np.uint8)
    image = source.copy()
    image[0:2, 0:2] = 200  # strong change
    image[4, 4] = 103  # below the threshold
    cond = np.zeros((8, 8), dtype=bool)
    cond[0:5, 0:5] = True
    refined = refine_by_change(source, image, cond, threshold=0.03)
    assert refined.sum() == 4 and refined[0:2, 0:2].all()
    assert measured_strength(source, image, refined) == pytest.approx(100 / 255)
    assert measured_strength(source, image, np.zeros((8, 8), dtype=bool)) == 0.0


def test_feather_alpha_and_paste() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:18, 2:18] = True
    alpha = feather_alpha(mask, 3.0)
    assert (alpha[~mask] == 0).all() and alpha[10, 10] == 1.0
    assert 0 < alpha[2, 10] < alpha[3, 10] < 1 == alpha[4, 10]  # rising from the edge over 3 px
    source = np.zeros((20, 20, 3), dtype=np.uint8)
    patch = np.full((20, 20, 3), 255, dtype=np.uint8)
    out = paste(source, patch, alpha)
    assert (out[~mask] == 0).all() and out[10, 10, 0] == 255 and 0 < out[2, 10, 0] < 255
    np.testing.assert_array_equal(feather_alpha(mask, 0.0), mask.astype(np.float32))
    thin = np.zeros((20, 20), dtype=bool)
    thin[10:12, 2:18] = True  # two pixels wide: the feather shrinks so the scratch is still pasted fully
    assert feather_alpha(thin, 3.0)[10:12, 5].tolist() == [1.0, 1.0]


def test_perlin_settings_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="texture_dir"):
        build_generator("perlin", {"texture_source": "folder"})
    with pytest.raises(ValueError, match="beta_range"):
        build_generator("perlin", {"beta_range": (0.5, 1.0)})
    empty = tmp_path / "empty"
    empty.mkdir()
    generator = build_generator("perlin", {"texture_source": "folder", "texture_dir": str(empty)})
    data = ProductData(name="p", root=tmp_path, layout="mvtec", normals=(), test_normals=(), defects=())
    split = ProductSplit(generator_train={}, test_defects={}, train_normals=[], val_normals=[], test_normals=[])
    with pytest.raises(ValueError, match="has no images"):
        generator.fit(data, split, FitContext(output_dir=tmp_path / "out", max_steps=1))


def test_make_requests_uses_the_training_side(tmp_path: Path) -> None:
    from defectsynth.storage.demo import write_demo
    from defectsynth.storage.layouts import read_dataset
    from defectsynth.storage.split import SplitSettings, split_product

    write_demo(tmp_path, size=64, train_good=3, test_good=1, per_defect=3, products=["pill"], progress=False)
    product = read_dataset(tmp_path, "mvtec")[0]
    split = split_product(product, SplitSettings())
    requests = make_requests(product, split, "croppaste", 7, "real")
    training = {i for ids in split.generator_train.values() for i in ids}
    assert {r.mask_image for r in requests} <= training
    assert {r.source_image for r in requests} <= set(split.train_normals)
    assert all(r.foreground_path for r in requests)
    assert len({r.key("croppaste") for r in requests}) == 7
    with pytest.raises(ValueError, match="does not take"):
        make_requests(product, split, "croppaste", 1, "perlin")
