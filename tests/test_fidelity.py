"""Fidelity features on hand-built defects with known answers, the distances, and measure_dataset's keys."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats

from defectsynth.evaluation.dataset_quality import measure_dataset
from defectsynth.evaluation.fidelity import (
    APPEARANCE_FEATURES,
    FLOORS,
    SHAPE_FEATURES,
    DefectFeatures,
    appearance_features,
    feature_scales,
    fidelity_distances,
    group_distance,
    shape_features,
)
from defectsynth.evaluation.report import SHEET_GENERATED, SHEET_REAL
from defectsynth.evaluation.settings import QualitySettings
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.keys import derive_key
from defectsynth.storage.layouts import read_product
from defectsynth.storage.sample import GeneratorInfo, Sample, SampleMetadata

SIZE = 32
GREY = 150


def _disc(radius: float, centre: tuple[float, float] = (16, 16), size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _line(row: int, start: int, stop: int, size: int = SIZE, width: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[row : row + width, start:stop] = True
    return mask


def _grey(size: int = SIZE, value: int = GREY) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _painted(mask: np.ndarray, value: int = 50) -> np.ndarray:
    image = _grey(mask.shape[0])
    image[mask] = value
    return image


# --- shape features ---


def test_a_line_is_thinner_and_more_elongated_than_a_disc():
    line, disc = shape_features(_line(10, 4, 24)), shape_features(_disc(5))
    assert line["mean_width"] == pytest.approx(20 / 21)  # 2A / P = 2 * 20 / (2 * 20 + 2)
    assert disc["mean_width"] > 3 * line["mean_width"]
    assert line["log_elongation"] == pytest.approx(math.log(20))  # a 20 x 1 rectangle: sqrt(l1 / l2) = 20
    assert disc["log_elongation"] == pytest.approx(0.0, abs=1e-9)
    assert shape_features(_line(10, 4, 24, width=3))["mean_width"] == pytest.approx(2 * 60 / 46)


def test_area_components_and_position():
    mask = _disc(3, (8, 8)) | _disc(3, (24, 24)) | _line(2, 20, 22)
    features = shape_features(mask)
    assert features["log_components"] == pytest.approx(math.log(3))
    assert features["log_area"] == pytest.approx(math.log(mask.sum() / SIZE**2))
    diagonal = np.zeros((SIZE, SIZE), bool)
    diagonal[[5, 6], [5, 6]] = True  # touching corners: one 8-connected component
    assert shape_features(diagonal)["log_components"] == 0.0
    assert shape_features(np.zeros((SIZE, SIZE), bool)) is None


def test_position_on_the_foreground():
    foreground = np.zeros((SIZE, SIZE), bool)
    foreground[:, :16] = True
    inside, half_out = _disc(2, (16, 8)), _disc(2, (16, 16))
    on = shape_features(inside, foreground)
    assert on["foreground_share"] == 1.0
    assert on["centre_offset"] == pytest.approx(math.hypot(0.5, 0.5) / math.sqrt(2 * (1023 / 12 + 255 / 12 + 2 / 12)))
    assert 0.3 < shape_features(half_out, foreground)["foreground_share"] < 0.7
    centred, corner = shape_features(_disc(2, (15.5, 15.5))), shape_features(_disc(2, (3, 3)))  # whole frame
    assert centred["foreground_share"] == 1.0 and centred["centre_offset"] == pytest.approx(0.0, abs=1e-9)
    assert corner["centre_offset"] > 0.9


# --- appearance features ---


def test_a_dark_disc_on_grey_has_the_negative_contrast_of_its_step():
    disc = _disc(5)
    features = appearance_features(_painted(disc, 50), disc)
    assert features["luminance_contrast"] == pytest.approx(-100.0, abs=1e-3)
    for channel in ("delta_red", "delta_green", "delta_blue"):
        assert features[channel] == pytest.approx(-100.0, abs=1e-3)
    assert features["texture"] == pytest.approx(0.0, abs=1e-6)  # both flat
    bright = appearance_features(_painted(disc, 200), disc)
    assert bright["luminance_contrast"] == pytest.approx(50.0, abs=1e-3)


def test_colour_differences_are_per_channel():
    disc = _disc(5)
    image = _grey()
    image[disc] = (GREY + 30, GREY, GREY - 60)
    features = appearance_features(image, disc)
    assert (features["delta_red"], features["delta_green"], features["delta_blue"]) == pytest.approx((30, 0, -60))
    assert features["luminance_contrast"] == pytest.approx(0.299 * 30 - 0.114 * 60, abs=1e-3)


def test_texture_grows_with_noise_inside():
    disc, rng = _disc(6), np.random.default_rng(0)
    noisy = _grey()
    noisy[disc] = rng.integers(50, 250, (int(disc.sum()), 3), dtype=np.uint8)
    assert appearance_features(noisy, disc)["texture"] > 2.0
    assert appearance_features(_painted(disc), disc)["texture"] == pytest.approx(0.0, abs=1e-6)


def test_a_sharp_edge_scores_higher_than_a_blurred_one():
    disc = _disc(6)
    sharp = _painted(disc)
    blurred = ndimage.gaussian_filter(sharp.astype(float), (2.0, 2.0, 0)).round().astype(np.uint8)
    sharp_score = appearance_features(sharp, disc)["edge_sharpness"]
    blurred_score = appearance_features(blurred, disc)["edge_sharpness"]
    assert sharp_score > blurred_score + 1.0
    assert appearance_features(_grey(), disc)["edge_sharpness"] == pytest.approx(0.0, abs=1e-6)  # nothing there


def test_appearance_is_undefined_without_mask_or_ring_and_checks_shapes():
    assert appearance_features(_grey(), np.zeros((SIZE, SIZE), bool)) is None
    assert appearance_features(_grey(), np.ones((SIZE, SIZE), bool)) is None
    with pytest.raises(ValueError, match="differ in size"):
        appearance_features(_grey(16), _disc(3))
    with pytest.raises(ValueError, match="H x W x 3"):
        appearance_features(_grey()[..., 0], _disc(3))


# --- distances ---


def _features(masks: list[np.ndarray], defect_type: str = "scratch", value: int = 50) -> DefectFeatures:
    features = DefectFeatures()
    for mask in masks:
        features.add(defect_type, _painted(mask, value), mask)
    return features


LINES = [_line(8, 2, 22), _line(16, 5, 29), _line(24, 3, 18)]


def test_distance_is_zero_for_identical_sets():
    real = _features(LINES)
    metrics = fidelity_distances(_features(LINES), real)
    assert metrics == {
        "mask_shape_distance": 0.0,
        "mask_shape_distance.scratch": 0.0,
        "appearance_distance": 0.0,
        "appearance_distance.scratch": 0.0,
    }


def test_features_of_parallel_defects_match_one_by_one():
    discs = [_disc(4), _disc(6)]
    masks, kinds = LINES + discs, ["scratch"] * len(LINES) + ["hole"] * len(discs)
    together = DefectFeatures.of_defects([_painted(m) for m in masks], masks, kinds)
    assert together.values == {**_features(LINES).values, **_features(discs, "hole").values}
    with pytest.raises(ValueError, match="zip"):
        DefectFeatures.of_defects([_painted(LINES[0])], LINES, ["scratch"])


def test_shape_distance_grows_as_the_shape_departs():
    real = _features(LINES)
    real.values.update(_features([_disc(4), _disc(6, (10, 10)), _disc(5, (20, 12))], "hole").values)
    other_lines = fidelity_distances(_features([_line(4, 1, 27), _line(12, 8, 20), _line(20, 4, 30)]), real)
    discs = fidelity_distances(_features([_disc(4), _disc(5, (12, 20)), _disc(3, (20, 10))]), real)
    assert 0 < other_lines["mask_shape_distance.scratch"] < discs["mask_shape_distance.scratch"]
    assert set(other_lines) == {
        f"{k}{s}" for k in ("mask_shape_distance", "appearance_distance") for s in ("", ".scratch")
    }
    dimmer = fidelity_distances(_features(LINES, value=120), real)
    assert dimmer["mask_shape_distance"] == 0.0 < dimmer["appearance_distance"]


def test_scales_are_product_level_stds_floored_and_overall_is_the_mean_over_types():
    real = _features(LINES)
    real.values.update(_features([_disc(4), _disc(6, (10, 10))], "hole").values)
    scales = feature_scales(real)
    assert scales["log_components"] == FLOORS["log_components"]  # one component everywhere: std 0
    assert scales["mean_width"] == pytest.approx(real.pooled("mean_width").std())
    generated = _features([_disc(4)], "hole")
    generated.values.update(_features([_line(8, 2, 12)]).values)
    generated.values["crack"] = _features([_disc(3)]).values["scratch"]  # no real crack: left out
    metrics = fidelity_distances(generated, real)
    assert "mask_shape_distance.crack" not in metrics
    for key in ("mask_shape_distance", "appearance_distance"):
        assert metrics[key] == pytest.approx((metrics[f"{key}.hole"] + metrics[f"{key}.scratch"]) / 2)
    assert fidelity_distances(DefectFeatures(), real) == {}
    assert set(FLOORS) == {*SHAPE_FEATURES, *APPEARANCE_FEATURES}


def test_a_feature_distance_is_the_wasserstein_distance_over_the_product_scale():
    real = _features(LINES)  # 1-px lines 20, 24 and 15 px long: log elongation ln(length)
    generated = _features([_line(4, 1, 31), _line(12, 8, 20)])  # 30 and 12 px
    expected = stats.wasserstein_distance(np.log([30, 12]), np.log([20, 24, 15])) / np.log([20, 24, 15]).std()
    scales = feature_scales(real)
    assert group_distance(generated, real, "scratch", ("log_elongation",), scales) == pytest.approx(expected)
    assert group_distance(generated, real, "hole", ("log_elongation",), scales) is None


# --- measure_dataset on a tiny product and dataset ---


def _surface(rng: np.random.Generator) -> np.ndarray:
    """A smooth grey surface with a little noise."""
    return np.clip(GREY + rng.normal(0, 4, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _real_defect(defect_type: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark thin scratch or a dark round hole on a surface."""
    if defect_type == "scratch":
        mask = _line(int(rng.integers(4, 28)), int(rng.integers(1, 8)), int(rng.integers(20, 31)))
    else:
        mask = _disc(rng.uniform(3, 6), tuple(rng.uniform(10, 22, 2)))
    image = _surface(rng)
    image[mask] = np.clip(image[mask].astype(int) - 90, 0, 255).astype(np.uint8)
    return image, mask


def _product(root: Path, rng: np.random.Generator) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Write ``root/widget`` (MVTec layout, 3 real defects per type); return 3 more per type, never written."""
    base = root / "widget"
    for i in range(3):
        (base / "train/good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_surface(rng)).save(base / "train/good" / f"{i:03d}.png")
    unseen = {}
    for defect_type in ("scratch", "hole"):
        (base / "test" / defect_type).mkdir(parents=True, exist_ok=True)
        (base / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            image, mask = _real_defect(defect_type, rng)
            Image.fromarray(image).save(base / "test" / defect_type / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(base / "ground_truth" / defect_type / f"{i:03d}_mask.png")
        unseen[defect_type] = [_real_defect(defect_type, rng) for _ in range(3)]
    return unseen


def _noise_blob(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random noise inside a random blob with several lobes: neither a scratch nor a hole."""
    mask = np.zeros((SIZE, SIZE), bool)
    for _ in range(3):
        mask |= _disc(rng.uniform(2, 5), tuple(rng.uniform(4, 28, 2)))
    image = _surface(rng)
    image[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
    return image, mask


def _sample(method: str, defect_type: str, index: int, image: np.ndarray, mask: np.ndarray) -> Sample:
    metadata = SampleMetadata(
        key=derive_key("widget", method, defect_type, {"sample_index": index}),
        product="widget",
        defect_type=defect_type,
        generator=GeneratorInfo(method=method),
        source_image="train/good/000",
    )
    return Sample(image=image, mask=mask, metadata=metadata)


def test_measure_dataset_finds_copied_real_defects_closer_than_noise_blobs(tmp_path: Path):
    rng = np.random.default_rng(0)
    unseen = _product(tmp_path / "data", rng)
    product = read_product(tmp_path / "data", "widget", "mvtec")
    with DatasetWriter(tmp_path / "dataset", maxcount=8) as writer:
        for defect_type, defects in unseen.items():
            for index, (image, mask) in enumerate(defects * 2):
                writer.write(_sample("copy", defect_type, index, image, mask))
                writer.write(_sample("noise", defect_type, index, *_noise_blob(rng)))
    references = [record.image_id for record in product.defects]
    settings = QualitySettings()
    found = {
        method: measure_dataset(
            str(tmp_path / "dataset"),
            product,
            method=method,
            resolution=SIZE,
            reference_ids=references,
            settings=settings,
        ).metrics
        for method in ("copy", "noise")
    }
    for key in ("mask_shape_distance", "appearance_distance"):
        for suffix in ("", ".scratch", ".hole"):
            assert found["copy"][key + suffix] < found["noise"][key + suffix], key + suffix
    assert found["copy"]["masks_total"] == 12.0  # the existing metrics are still there
    assert found["noise"]["appearance_distance"] > 2 * found["copy"]["appearance_distance"]


def test_measure_dataset_returns_a_fidelity_sheet_row_per_type(tmp_path: Path):
    rng = np.random.default_rng(1)
    unseen = _product(tmp_path / "data", rng)
    product = read_product(tmp_path / "data", "widget", "mvtec")
    with DatasetWriter(tmp_path / "dataset", maxcount=8) as writer:
        for defect_type, defects in unseen.items():
            for index, (image, mask) in enumerate(defects * 3):  # 9 per type, the sheet shows the first 6
                writer.write(_sample("copy", defect_type, index, image, mask))
    sheet = measure_dataset(
        str(tmp_path / "dataset"),
        product,
        method="copy",
        resolution=SIZE,
        reference_ids=[record.image_id for record in product.defects],
        settings=QualitySettings(),
    ).sheet
    assert sheet is not None and sheet.dtype == np.uint8
    pad, tiles = 2, 2 * (SHEET_REAL + SHEET_GENERATED)  # two tiles per defect: 3 real, then 6 generated
    width = tiles * (SIZE + pad) + pad
    assert sheet.shape[0] == 2 * (SIZE + pad) + pad and sheet.shape[1] > width and sheet.shape[2] == 3  # hole, scratch
    for row in range(2):
        top = pad + row * (SIZE + pad)
        for column in range(tiles):
            left = sheet.shape[1] - width + pad + column * (SIZE + pad)
            assert sheet[top : top + SIZE, left : left + SIZE].std() > 0, (row, column)  # every tile filled


BENCH = Path(__file__).resolve().parents[1] / "bench" / "fidelity.py"


@pytest.mark.integration
def test_bench_quick_prints_both_distances_per_method_and_json_last():
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    methods = summary["distances"]["wood"]
    assert set(methods) == {"perlin", "croppaste"}
    for metrics in methods.values():
        assert {"mask_shape_distance", "appearance_distance"} <= set(metrics)
    # croppaste pastes the real training masks, perlin draws noise masks
    assert methods["croppaste"]["mask_shape_distance"] < methods["perlin"]["mask_shape_distance"]
