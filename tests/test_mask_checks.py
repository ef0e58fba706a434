"""Mask checks on hand-built images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectsynth.evaluation.mask_checks import (
    AlignmentAccumulator,
    MaskSanity,
    finite_or_none,
    mask_alignment,
    mask_iou,
    mask_sanity,
    psnr_outside,
)
from defectsynth.evaluation.metrics import UndefinedMetricError


def _pair(shape=(4, 4, 3)):
    source = np.full(shape, 100, np.uint8)
    return source.copy(), source


def _mask(*cells, shape=(4, 4)):
    mask = np.zeros(shape, bool)
    for row, col in cells:
        mask[row, col] = True
    return mask


def test_alignment_is_one_when_the_change_is_only_inside():
    generated, source = _pair()
    generated[0, 0] = [200, 0, 100]
    assert mask_alignment(generated, source, _mask((0, 0), (1, 1))) == 1.0


def test_alignment_splits_the_change_summed_over_channels():
    generated, source = _pair()
    generated[0, 0, 0] = 130  # +30 inside
    generated[3, 3] = [110, 90, 110]  # 10 + 10 + 10 = 30 outside
    assert mask_alignment(generated, source, _mask((0, 0))) == pytest.approx(0.5)
    assert mask_alignment(generated, source, _mask((2, 2))) == 0.0


def test_alignment_undefined_when_nothing_changed():
    generated, source = _pair()
    with pytest.raises(UndefinedMetricError):
        mask_alignment(generated, source, _mask((0, 0)))


def test_psnr_outside_of_a_known_error_and_ignores_the_inside():
    generated, source = _pair()
    generated[0, 0] = 0  # inside the mask: ignored
    generated[1:, :] = 110  # 12 of the 15 outside pixels off by 10 in every channel
    mse = 12 * 3 * 100 / (15 * 3)
    expected = 10 * math.log10(255**2 / mse)
    assert psnr_outside(generated, source, _mask((0, 0))) == pytest.approx(expected)


def test_psnr_outside_identical_is_inf_and_finite_or_none_drops_it():
    generated, source = _pair()
    generated[0, 0] = 0
    psnr = psnr_outside(generated, source, _mask((0, 0)))
    assert psnr == math.inf and finite_or_none(psnr) is None
    assert finite_or_none(31.5) == 31.5
    with pytest.raises(UndefinedMetricError):
        psnr_outside(generated, source, np.ones((4, 4), bool))


def test_grey_images_and_png_masks_are_accepted():
    source = np.zeros((3, 3), np.uint8)
    generated = source.copy()
    generated[1, 1] = 50
    mask = np.zeros((3, 3), np.uint8)
    mask[1, 1] = 255  # as decoded from a mask PNG
    assert mask_alignment(generated, source, mask) == 1.0
    assert mask_alignment(generated, source, mask // 255) == 1.0


@pytest.mark.parametrize(
    ("generated", "source", "mask", "match"),
    [
        (np.zeros((4, 4, 3)), np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool), "uint8"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), np.zeros((4, 4), bool), "shape"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.zeros((3, 4), bool), "image size"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 7, np.uint8), "0/1"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), float), "bool"),
    ],
)
def test_bad_inputs_are_refused(generated, source, mask, match):
    with pytest.raises(ValueError, match=match):
        mask_alignment(generated, source, mask)


def test_mask_sanity_counts():
    empty = np.zeros((4, 4), bool)
    tiny = _mask((0, 0))
    big_on = np.zeros((4, 4), bool)
    big_on[:2, :2] = True  # area 4, all on the foreground
    big_off = np.zeros((4, 4), bool)
    big_off[2:, :] = True  # area 8, 2 pixels on the foreground
    half = np.zeros((4, 4), bool)
    half[1:3, 0:2] = True  # area 4, exactly half on the foreground: not outside
    foreground = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    assert (big_off & foreground).sum() == 2 and (half & foreground).sum() == 2

    sanity = mask_sanity(
        [empty, tiny, big_on, big_off, half, big_off],
        [foreground, foreground, foreground, foreground, foreground, None],  # the last has no foreground
        tiny_area=2,
    )
    assert sanity == MaskSanity(total=6, empty=1, tiny=1, outside_foreground=1)
    assert sanity.as_metrics() == {
        "masks_total": 6.0,
        "masks_empty": 1.0,
        "masks_tiny": 1.0,
        "masks_outside_foreground": 1.0,
    }
    # a tiny mask off the object counts in both; without foregrounds nothing is outside
    assert mask_sanity([tiny], [np.zeros((4, 4), bool)], tiny_area=2).outside_foreground == 1
    assert mask_sanity([big_off], None, tiny_area=2) == MaskSanity(1, 0, 0, 0)


def test_mask_sanity_rejects_mismatches():
    with pytest.raises(ValueError, match="foregrounds"):
        mask_sanity([np.zeros((4, 4), bool)], [], tiny_area=2)
    with pytest.raises(ValueError, match="tiny_area"):
        mask_sanity([], None, tiny_area=0)
    with pytest.raises(ValueError, match="does not match"):
        mask_sanity([np.ones((4, 4), bool)], [np.ones((3, 3), bool)], tiny_area=2)


def test_alignment_accumulator_streams_and_merges():
    inside, source = _pair()
    inside[0, 0] = 200  # alignment 1, outside identical
    split, _ = _pair()
    split[0, 0, 0] = 130
    split[3, 3, 0] = 130  # alignment 0.5; outside: 1 of 15 pixels off by 30 in one channel
    unchanged, _ = _pair()
    mask = _mask((0, 0))

    first = AlignmentAccumulator()
    first.add(inside, source, mask)
    first.add(split, source, mask)
    second = AlignmentAccumulator()
    second.add(unchanged, source, mask)
    second.add(inside, source, np.ones((4, 4), bool))  # full mask: no PSNR
    result = first.merge(second).result()

    split_psnr = psnr_outside(split, source, mask)
    assert split_psnr == pytest.approx(10 * math.log10(255**2 / (900 / 45)))
    assert result == {
        "mask_alignment_samples": 4.0,
        "mask_alignment": pytest.approx((1.0 + 0.5 + 1.0) / 3),
        "mask_alignment_unchanged": 1.0,
        "psnr_outside": pytest.approx(split_psnr),
        "psnr_outside_identical": 2.0,  # inside-only change and the unchanged sample
        "psnr_outside_full_mask": 1.0,
    }


def test_empty_accumulator_omits_the_means():
    assert AlignmentAccumulator().result() == {
        "mask_alignment_samples": 0.0,
        "mask_alignment_unchanged": 0.0,
        "psnr_outside_identical": 0.0,
        "psnr_outside_full_mask": 0.0,
    }


def test_mask_iou_by_hand():
    a = _mask((0, 0), (0, 1), (1, 0))
    b = _mask((0, 1), (1, 0), (1, 1), (2, 2))
    assert mask_iou(a, b) == pytest.approx(2 / 5)  # 2 shared of 5 set in either
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, np.zeros((4, 4), bool)) == 0.0
    assert mask_iou(a.astype(np.uint8) * 255, b.astype(np.uint8)) == pytest.approx(2 / 5)  # PNG-decoded masks


def test_mask_iou_undefined_for_two_empty_masks_and_refuses_mismatches():
    with pytest.raises(UndefinedMetricError):
        mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 4\)"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="0/1"):
        mask_iou(np.full((4, 4), 7, np.uint8), np.zeros((4, 4), bool))


def test_accumulator_compares_refined_and_conditioning_masks_and_merges():
    cond = _mask((0, 0), (0, 1), (1, 0), (1, 1))
    grown = _mask((0, 0), (0, 1), (1, 0), (1, 1), (2, 2))  # IoU 4/5, covers all of cond
    shrunk = _mask((0, 0))  # IoU 1/4, covers 1/4 of cond
    empty = np.zeros((4, 4), bool)

    first = AlignmentAccumulator()
    first.add_conditioning(grown, cond)
    first.add_conditioning(empty, empty)  # both empty: neither metric defined
    second = AlignmentAccumulator()
    second.add_conditioning(shrunk, cond)
    second.add_conditioning(shrunk, empty)  # empty cond: IoU 0, coverage undefined
    result = first.merge(second).result()

    assert result["refined_cond_iou"] == pytest.approx((4 / 5 + 1 / 4 + 0.0) / 3)
    assert result["refined_cond_coverage"] == pytest.approx((1.0 + 1 / 4) / 2)
    assert result["mask_alignment_samples"] == 0.0  # the pairs are not alignment samples
    with pytest.raises(ValueError, match="differ in shape"):
        first.add_conditioning(grown, np.zeros((3, 3), bool))


def test_accumulator_without_defined_pairs_omits_the_overlap_means():
    accumulator = AlignmentAccumulator()
    accumulator.add_conditioning(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    assert not {"refined_cond_iou", "refined_cond_coverage"} & accumulator.result().keys()
