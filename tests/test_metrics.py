"""Detection metrics against scikit-learn, hand-computed cases, and the per-type protocol."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from defectsynth.evaluation import metrics as M
from defectsynth.evaluation.metrics import (
    STABLE_METRICS,
    UndefinedMetricError,
    accuracy,
    aupro,
    auroc,
    average_precision,
    binary_curve,
    f1_max,
    iou_at_f1_max,
    metric_key,
    pro_curve,
    score_detection,
)

# ---------------------------------------------------------------- helpers


def _sk_f1max_iou(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float, float]:
    """F1-max, its threshold and the pooled IoU there, from scikit-learn's PR curve."""
    precision, recall, thresholds = precision_recall_curve(targets, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = f1.max()
    threshold = thresholds[f1 == best].max()  # the highest threshold among ties
    predicted = scores >= threshold
    tp = np.sum(predicted & targets)
    iou = tp / np.sum(predicted | targets)
    return float(best), float(threshold), float(iou)


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """AU-PRO by its definition: loop over every distinct threshold and every 8-connected region."""
    regions, normals = [], []
    for amap, mask in zip(maps, masks, strict=True):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labeled == k] for k in range(1, n + 1)]
        normals.append(amap[~mask])
    normal = np.concatenate(normals)
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the last segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def _dataset(seed: int, n_normal: int = 12, per_type: int = 6, side: int = 24):
    """Normal images and two defect types with square masks; anomalous pixels score higher on average."""
    rng = np.random.default_rng(seed)
    types = ["good"] * n_normal + ["crack"] * per_type + ["hole"] * per_type
    n = len(types)
    labels = np.array([t != "good" for t in types], dtype=int)
    masks = np.zeros((n, side, side), dtype=bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, side - 8, size=2)
        h, w = rng.integers(2, 8, size=2)
        masks[i, y : y + h, x : x + w] = True
    maps = rng.random((n, side, side)).astype(np.float32)
    maps[masks] += rng.random(int(masks.sum())).astype(np.float32) * np.where(
        np.repeat(np.array(types), side * side).reshape(n, side, side)[masks] == "crack", 0.9, 0.4
    )
    maps = np.round(maps, 2)  # ties, as real maps have
    image_scores = maps.reshape(n, -1).max(axis=1)
    return maps, masks, image_scores, labels, types


# ---------------------------------------------------------------- hand-computed cases


def test_four_pixel_case_by_hand() -> None:
    # thresholds 0.9 / 0.6 / 0.4 / 0.1 give (TP, FP) = (1,0) (1,1) (2,1) (2,2) with P = 2:
    # F1 = 2/3, 1/2, 4/5, 2/3 -> F1-max 0.8 at 0.4, where IoU = TP / (TP + FP + FN) = 2 / 3.
    # AUROC: 3 of the 4 (positive, negative) pairs are ordered -> 0.75. AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    scores, targets = np.array([0.9, 0.6, 0.4, 0.1]), np.array([1, 0, 1, 0])
    assert auroc(scores, targets) == pytest.approx(0.75)
    assert average_precision(scores, targets) == pytest.approx(5 / 6)
    assert f1_max(scores, targets) == pytest.approx((0.8, 0.4))
    assert iou_at_f1_max(scores, targets) == pytest.approx(2 / 3)


def test_four_pixel_case_through_score_detection(caplog) -> None:
    # one 2 x 2 anomalous image: pixel metrics are defined, image AUROC (a single image) is not
    amap = np.array([[[0.9, 0.6], [0.4, 0.1]]])
    mask = np.array([[[True, False], [True, False]]])
    with caplog.at_level(logging.WARNING, logger="defectsynth.evaluation.metrics"):
        scores = score_detection(amap, mask, np.array([0.5]), np.array([1]), ["crack"], per_type=False)
    assert scores["pixel_f1max"] == pytest.approx(0.8)
    assert scores["pixel_iou"] == pytest.approx(2 / 3)
    assert scores["pixel_auroc"] == pytest.approx(0.75)
    assert scores["pixel_ap"] == pytest.approx(5 / 6)
    assert "image_auroc" not in scores and "image_f1max" in scores  # one class: AUROC omitted, F1 defined
    assert "omitting image_auroc" in caplog.text


def test_aupro_by_hand() -> None:
    # a 1 x 11 image: region A = {0}, region B = {2, 3}, 8 normal pixels.
    # threshold 0.9: A covered -> PRO 0.5, FPR 0;  0.8: half of B -> PRO 0.75;  0.5: one normal -> FPR 1/8;
    # 0.1: all of B -> PRO 1;  0.0: FPR 1.  Area up to 0.3: 0.75 * 0.125 + 1 * 0.175 = 0.26875 -> / 0.3 = 43/48.
    amap = np.array([[[0.9, 0.5, 0.8, 0.1, 0, 0, 0, 0, 0, 0, 0]]])
    mask = np.array([[[1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]]], dtype=bool)
    assert aupro(amap, mask) == pytest.approx(43 / 48)
    fpr, pro = pro_curve(amap, mask)
    assert fpr[0] == pro[0] == 0.0 and fpr[-1] == pro[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0)


def test_aupro_regions_are_8_connected() -> None:
    # gt: (0,0) and (1,1) touch diagonally (one region under 8-connectivity), (3,3) is another; 13 normals.
    # 0.9 covers half the diagonal region -> PRO 1/4; 0.5 adds a normal -> FPR 1/13; 0.2 covers everything.
    # AU-PRO = (1/4 * 1/13 + 1 * (0.3 - 1/13)) / 0.3 = 1 - 2.5/13.  (4-connectivity would give 1 - (2/3)/3.9.)
    amap = np.zeros((1, 4, 4))
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = True
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 3, 3], amap[0, 0, 3] = 0.9, 0.2, 0.2, 0.5
    assert aupro(amap, mask) == pytest.approx(1 - 2.5 / 13)


def test_perfect_and_inverted_maps() -> None:
    maps, masks, *_ = _dataset(0)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert aupro(-masks.astype(float), masks) == pytest.approx(0.0)
    assert auroc(masks.astype(float), masks) == pytest.approx(1.0)


def test_accuracy() -> None:
    assert accuracy(["a", "b", "b"], ["a", "b", "a"]) == pytest.approx(2 / 3)
    with pytest.raises(UndefinedMetricError):
        accuracy([], [])


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("seed", range(5))
def test_curve_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    targets = rng.random(n) < rng.uniform(0.05, 0.6)
    targets[:2] = [True, False]
    scores = targets * rng.uniform(0, 1.5) + rng.random(n)
    if seed % 2:
        scores = np.round(scores, 1)  # heavy ties
    curve = binary_curve(scores, targets)
    assert curve.auroc() == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    assert curve.average_precision() == pytest.approx(average_precision_score(targets, scores), abs=1e-12)
    f1, threshold, iou = _sk_f1max_iou(scores, targets)
    assert curve.f1_max() == pytest.approx((f1, threshold), abs=1e-12)
    assert curve.iou_at_f1_max() == pytest.approx(iou, abs=1e-12)
    assert curve.iou_at_f1_max() == pytest.approx(f1 / (2 - f1))  # the same operating point


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_brute_force(seed: int) -> None:
    maps, masks, *_ = _dataset(seed, n_normal=3, per_type=2, side=12)
    assert aupro(maps, masks) == pytest.approx(_brute_aupro(maps, masks), abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(_brute_aupro(maps, masks, limit=1.0), abs=1e-12)


def test_pixel_metrics_through_score_detection_match_sklearn() -> None:
    maps, masks, image_scores, labels, types = _dataset(1)
    scores = score_detection(maps, masks, image_scores, labels, types, per_type=False)
    assert set(scores) == set(STABLE_METRICS) - {"cls_accuracy"}
    assert scores["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert scores["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    f1, _, iou = _sk_f1max_iou(maps.ravel(), masks.ravel())
    assert scores["pixel_f1max"] == pytest.approx(f1)
    assert scores["pixel_iou"] == pytest.approx(iou)
    assert scores["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores))
    assert scores["image_ap"] == pytest.approx(average_precision_score(labels, image_scores))
    assert scores["image_f1max"] == pytest.approx(_sk_f1max_iou(image_scores, labels.astype(bool))[0])


# ---------------------------------------------------------------- streamed histogram curves


@pytest.fixture(scope="module")
def moderate() -> tuple[np.ndarray, np.ndarray]:
    """300 maps of 64 x 64 (1.2 M pixels), 1 % to 3 % anomalous, soft scores with ties at 0."""
    rng = np.random.default_rng(7)
    n, side = 300, 64
    masks = np.zeros((n, side, side), dtype=bool)
    for i in range(0, n, 2):
        y, x = rng.integers(0, side - 12, size=2)
        masks[i, y : y + rng.integers(3, 12), x : x + rng.integers(3, 12)] = True
    logits = rng.normal(-4, 2, size=masks.shape) + masks * rng.normal(4, 3, size=masks.shape)
    maps = (1 / (1 + np.exp(-logits))).astype(np.float32)
    maps[maps < 1e-3] = 0.0
    return maps, masks


def test_histogram_curve_within_1e3_of_exact(moderate) -> None:
    maps, masks = moderate
    exact = binary_curve(maps, masks)
    streamed = binary_curve(maps, masks, max_exact=100_000)
    assert exact.exact and not streamed.exact
    assert streamed.auroc() == pytest.approx(exact.auroc(), abs=1e-3)
    assert streamed.average_precision() == pytest.approx(exact.average_precision(), abs=1e-3)
    assert streamed.f1_max()[0] == pytest.approx(exact.f1_max()[0], abs=1e-3)
    assert streamed.iou_at_f1_max() == pytest.approx(exact.iou_at_f1_max(), abs=1e-3)
    assert aupro(maps, masks, max_exact=100_000) == pytest.approx(aupro(maps, masks), abs=1e-3)
    # the exact curve itself agrees with scikit-learn
    assert exact.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_histogram_curve_is_deterministic_and_chunk_independent(moderate, monkeypatch) -> None:
    maps, masks = moderate
    first = binary_curve(maps[:100], masks[:100], max_exact=1000, bins=512)
    monkeypatch.setattr(M, "_CHUNK_PIXELS", 5000)
    second = binary_curve(maps[:100], masks[:100], max_exact=1000, bins=512)
    np.testing.assert_array_equal(first.thresholds, second.thresholds)
    np.testing.assert_allclose(first.pos, second.pos)
    assert first.auroc() == pytest.approx(second.auroc(), abs=1e-12)


def test_score_detection_streams_large_sets(moderate) -> None:
    maps, masks = moderate
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    types = ["good" if not lab else "stain" for lab in labels]
    kwargs = {"per_type": False, "metrics": ["pixel_auroc", "pixel_ap", "pixel_aupro"]}
    exact = score_detection(maps, masks, None, labels, types, **kwargs)
    streamed = score_detection(maps, masks, None, labels, types, max_exact=50_000, bins=4096, **kwargs)
    for key, value in exact.items():
        assert streamed[key] == pytest.approx(value, abs=1e-3), key


# ---------------------------------------------------------------- per-type protocol and fields


def test_per_type_uses_type_images_plus_all_normals() -> None:
    maps, masks, image_scores, labels, types = _dataset(3)
    pred_types = [None if t == "good" else t for t in types]
    pred_types[-1] = "crack"  # one "hole" misclassified
    scores = score_detection(maps, masks, image_scores, labels, types, pred_types=pred_types)
    type_arr = np.array(types)
    for defect_type in ("crack", "hole"):
        keep = (type_arr == defect_type) | (labels == 0)
        assert scores[f"image_auroc.{defect_type}"] == pytest.approx(roc_auc_score(labels[keep], image_scores[keep]))
        assert scores[f"image_ap.{defect_type}"] == pytest.approx(
            average_precision_score(labels[keep], image_scores[keep])
        )
        pixel_targets, pixel_scores = masks[keep].ravel(), maps[keep].ravel()
        assert scores[f"pixel_auroc.{defect_type}"] == pytest.approx(roc_auc_score(pixel_targets, pixel_scores))
        assert scores[f"pixel_ap.{defect_type}"] == pytest.approx(average_precision_score(pixel_targets, pixel_scores))
        assert scores[f"pixel_aupro.{defect_type}"] == pytest.approx(aupro(maps[keep], masks[keep]))
        for metric in STABLE_METRICS:
            assert metric_key(metric, defect_type) in scores
    # accuracy over the images with a prediction; per type, that type's images only
    assert scores["cls_accuracy"] == pytest.approx(11 / 12)
    assert scores["cls_accuracy.crack"] == pytest.approx(1.0)
    assert scores["cls_accuracy.hole"] == pytest.approx(5 / 6)
    assert "image_auroc.good" not in scores


def test_undefined_metrics_are_omitted_not_faked(caplog) -> None:
    maps, masks, image_scores, labels, types = _dataset(4, n_normal=0)
    masks[np.array(types) == "hole"] = False  # "hole" images carry no mask
    with caplog.at_level(logging.WARNING, logger="defectsynth.evaluation.metrics"):
        scores = score_detection(maps, masks, image_scores, labels, types)
    # no normal images: every image is anomalous, so image AUROC is undefined everywhere
    assert not any(key.startswith("image_auroc") for key in scores)
    assert "image_ap" in scores  # defined (trivially 1) with positives only
    # "hole" alone has no positive pixel: its pixel metrics are omitted, crack's are there
    assert not any(key.startswith("pixel_") and key.endswith(".hole") for key in scores)
    assert {"pixel_auroc.crack", "pixel_aupro.crack", "pixel_iou.crack"} <= set(scores)
    assert "omitting pixel_aupro.hole" in caplog.text and "omitting image_auroc.crack" in caplog.text
    assert all(np.isfinite(v) for v in scores.values())


def test_single_class_raises_in_the_functions() -> None:
    with pytest.raises(UndefinedMetricError):
        auroc(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(UndefinedMetricError):
        average_precision(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(UndefinedMetricError):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(UndefinedMetricError):
        aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2), dtype=bool))  # no normal pixel


def test_metrics_follow_the_given_fields() -> None:
    maps, masks, image_scores, labels, types = _dataset(5)
    only_images = score_detection(None, None, image_scores, labels, types, per_type=False)
    assert set(only_images) == {"image_auroc", "image_ap", "image_f1max"}
    with pytest.raises(ValueError, match=r"pixel_ap reads the fields .*missing: \['anomaly_map', 'gt_mask'\]"):
        score_detection(None, None, image_scores, labels, types, metrics=["pixel_ap"])
    with pytest.raises(ValueError, match="cls_accuracy"):
        score_detection(maps, masks, image_scores, labels, types, metrics=["cls_accuracy"])
    with pytest.raises(ValueError, match="unknown metrics"):
        score_detection(maps, masks, image_scores, labels, types, metrics=["pixel_dice"])
    # N x 1 x H x W maps, as the segmenter returns them, are accepted
    four_d = score_detection(maps[:, None], masks[:, None], image_scores, labels, types, per_type=False)
    assert four_d["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))


def test_inputs_are_validated() -> None:
    maps, masks, image_scores, labels, types = _dataset(6)
    with pytest.raises(ValueError, match="binary"):
        score_detection(maps, masks * 255, image_scores, labels, types)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        score_detection(bad, masks, image_scores, labels, types)
    with pytest.raises(ValueError, match="entries"):
        score_detection(maps, masks, image_scores[:-1], labels, types)
    with pytest.raises(ValueError, match="differ in shape"):
        score_detection(maps[:, :8], masks, image_scores, labels, types)


def test_metric_key() -> None:
    assert metric_key("pixel_ap") == "pixel_ap"
    assert metric_key("pixel_ap", "metal_contamination") == "pixel_ap.metal_contamination"
    assert metric_key("image_auroc", "fold,bend") == "image_auroc.fold_bend"
