"""The detectors of ``evaluation.detectors`` on a demo product: brief training on perlin data, test on real defects."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from defectsynth.evaluation.data import RealImages, load_real, with_normals
from defectsynth.evaluation.detectors import (
    DETECTORS,
    ClassifierDetector,
    DetectorContext,
    DiffusionADDetector,
    SegmenterDetector,
    SyntheticPair,
    detector_methods,
)
from defectsynth.evaluation.segmenter import SegmenterConfig
from defectsynth.evaluation.settings import ClassifierConfig, DiffusionADConfig
from defectsynth.generators.base import FitContext, build_generator
from defectsynth.storage.demo import write_demo
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.split import SplitSettings, split_product
from helpers.generator_contract import make_requests

pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION = 64


@pytest.fixture(scope="module")
def wood(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("detectors")
    write_demo(root, size=RESOLUTION, train_good=12, test_good=6, per_defect=6, products=["wood"], progress=False)
    product = read_dataset(root, "mvtec", ["wood"])[0]
    return product, split_product(product, SplitSettings())


@pytest.fixture(scope="module")
def perlin_pairs(wood, tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticPair]:
    """60 perlin samples on the training normals, as the evaluate job streams them."""
    product, split = wood
    generator = build_generator("perlin", {"texture_source": "self"})
    generator.load(generator.fit(product, split, FitContext(output_dir=tmp_path_factory.mktemp("perlin"), max_steps=1)))
    samples = generator.generate(make_requests(product, split, "perlin", 60, "perlin"))
    return [
        SyntheticPair(
            torch.from_numpy(s.image.transpose(2, 0, 1).copy()).float() / 255,
            torch.from_numpy(s.mask[None].astype(np.float32)),
            s.metadata.defect_type,
        )
        for s in samples
    ]


def _context(split, batch_size: int = 8) -> DetectorContext:
    return DetectorContext(RESOLUTION, sorted(split.generator_train), batch_size, 0.5)


def _train(detector, normals, synthetic: Iterator[SyntheticPair] | None, steps: int):
    torch.manual_seed(0)
    model = detector.build()
    optimizer = detector.optimizer(model)
    rng = np.random.default_rng(0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = detector.training_batch(normals, synthetic, rng)
        loss = detector.loss(model(*batch.inputs), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


def test_segmenter_trained_on_perlin_beats_chance_on_real_defects(wood, perlin_pairs) -> None:
    product, split = wood
    normals = load_real(product, split.train_normals, RESOLUTION)
    test = load_real(product, split.test, RESOLUTION)
    # depth 5 keeps a 4 x 4 bottleneck at 64 px (steadier eval-mode BN statistics after a short run)
    detector = SegmenterDetector(SegmenterConfig(base_width=8, depth=5, lr=5e-4), _context(split))
    model, _ = _train(detector, normals, itertools.cycle(perlin_pairs), steps=150)
    scores = detector.predict(model, test).score(test)
    assert scores["pixel_auroc"] > 0.75, scores  # chance is 0.5; measured 0.93


def test_classifier_names_types_of_anomalous_images_only(wood, perlin_pairs) -> None:
    product, split = wood
    normals = load_real(product, split.train_normals, RESOLUTION)
    test = load_real(product, split.test, RESOLUTION)
    detector = ClassifierDetector(ClassifierConfig(width=8), _context(split))
    model, losses = _train(detector, normals, itertools.cycle(perlin_pairs), steps=10)
    predictions = detector.predict(model, test)
    assert all((p is None) == (label == 0) for p, label in zip(predictions.pred_types, test.labels, strict=True))
    scores = predictions.score(test)
    assert 0.0 <= scores["cls_accuracy"] <= 1.0 and "pixel_ap" not in scores
    assert all(np.isfinite(losses))


def test_classifier_is_unavailable_for_one_defect_type() -> None:
    assert ClassifierDetector.unavailable(["crack"]) and ClassifierDetector.unavailable([]) is not None
    assert ClassifierDetector.unavailable(["crack", "hole"]) is None


def test_diffusionad_trains_on_its_own_anomalies_without_platform_data(wood) -> None:
    product, split = wood
    normals = load_real(product, split.train_normals, RESOLUTION)
    settings = DiffusionADConfig(block_out_channels=(8, 16), attention_head_dim=8, seg_base_width=4)
    detector = DiffusionADDetector(settings, _context(split, batch_size=4))
    batch = detector.training_batch(normals, None, np.random.default_rng(0))
    images, masks, anomalous = batch.inputs[:3]
    assert images.shape == (4, 3, RESOLUTION, RESOLUTION) and masks.shape == (4, 1, RESOLUTION, RESOLUTION)
    assert anomalous[:2].sum() == 0 and masks[:2].sum() == 0, "the first half stays normal"
    assert torch.equal(anomalous[2:] > 0, masks[2:].flatten(1).amax(1) > 0), "labelled anomalous iff masked"
    model, losses = _train(detector, normals, None, steps=3)
    assert all(np.isfinite(losses))


def test_only_diffusionad_gets_the_no_synthetic_data_row() -> None:
    assert detector_methods("diffusionad", ["perlin"]) == ["none", "perlin"]
    assert detector_methods("segmenter", ["perlin"]) == ["perlin"]
    assert set(DETECTORS) == {"segmenter", "classifier", "diffusionad"}
    with pytest.raises(ValueError, match="unknown detector"):
        detector_methods("patchcore", ["perlin"])


def test_the_segmenter_decays_its_rate_as_draem_and_the_others_keep_theirs() -> None:
    context = DetectorContext(RESOLUTION, ["crack", "hole"], 8, 0.5)
    segmenter = SegmenterDetector(SegmenterConfig(lr_milestones=(0.8, 0.9), lr_gamma=0.2), context)
    factors = [segmenter.learning_rate_factor(step, 100) for step in range(1, 101)]
    assert factors == pytest.approx([1.0] * 80 + [0.2] * 10 + [0.04] * 10)
    constant = SegmenterDetector(SegmenterConfig(lr_milestones=()), context)
    assert {constant.learning_rate_factor(step, 100) for step in range(1, 101)} == {1.0}
    others = ClassifierDetector(ClassifierConfig(), context), DiffusionADDetector(DiffusionADConfig(), context)
    assert {d.learning_rate_factor(100, 100) for d in others} == {1.0}


def test_segmenter_and_classifier_refuse_to_train_without_synthetic_data(wood) -> None:
    product, split = wood
    normals = load_real(product, split.train_normals[:2], RESOLUTION)
    for detector in (
        SegmenterDetector(SegmenterConfig(base_width=4), _context(split)),
        ClassifierDetector(ClassifierConfig(width=4), _context(split)),
    ):
        with pytest.raises(ValueError, match="needs synthetic"):
            detector.training_batch(normals, None, np.random.default_rng(0))


def test_real_images_carry_foregrounds_where_the_dataset_has_them(tmp_path: Path) -> None:
    write_demo(tmp_path, size=RESOLUTION, train_good=2, test_good=1, per_defect=2, products=["washer"], progress=False)
    product = read_dataset(tmp_path, "mvtec", ["washer"])[0]
    split = split_product(product, SplitSettings())
    real = load_real(product, split.train_normals, RESOLUTION)
    assert real.foregrounds is not None and real.foregrounds.shape == (len(real), 1, RESOLUTION, RESOLUTION)
    assert 0 < float(real.foregrounds.mean()) < 1


def test_diffusionad_at_a_working_resolution_trains_small_and_maps_at_full_size(wood) -> None:
    product, split = wood
    normals = load_real(product, split.train_normals, RESOLUTION)
    settings = DiffusionADConfig(block_out_channels=(8, 16), attention_head_dim=8, seg_base_width=4, resolution=32)
    detector = DiffusionADDetector(settings, _context(split, batch_size=4))
    batch = detector.training_batch(normals, None, np.random.default_rng(0))
    images, masks, anomalous = batch.inputs[:3]
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    assert torch.equal(anomalous > 0, masks.flatten(1).amax(1) > 0), "a thin mask survives the downsampling"
    model, _ = _train(detector, normals, None, steps=2)
    test = load_real(product, split.test, RESOLUTION)
    predictions = detector.predict(model, test)
    assert predictions.anomaly_maps.shape == (len(test), RESOLUTION, RESOLUTION)


def test_generated_normals_join_the_real_ones_with_empty_masks_and_whole_foregrounds() -> None:
    real = RealImages(
        image_ids=["a"],
        images=torch.rand(1, 3, 8, 8),
        masks=torch.zeros(1, 1, 8, 8),
        labels=np.zeros(1, np.int64),
        defect_types=["good"],
        foregrounds=torch.zeros(1, 1, 8, 8),
    )
    joined = with_normals(real, ["k1", "k2"], torch.rand(2, 3, 8, 8))
    assert joined.image_ids == ["a", "k1", "k2"] and len(joined) == 3 and not joined.labels.any()
    assert not joined.masks.any() and joined.foregrounds[1:].all() and not joined.foregrounds[0].any()
    with pytest.raises(ValueError, match=r"normals shaped \(3, 16, 16\) cannot join images shaped \(3, 8, 8\)"):
        with_normals(real, ["k"], torch.rand(1, 3, 16, 16))
