"""CADiff's prompt regularisers (paper 004, Eqs. 5-7) on hand-built tensors."""

from __future__ import annotations

import math

import pytest
import torch

from defectsynth.generators.cadiff.context_losses import (
    attention_pooled,
    downsample_mask,
    localization_loss,
    nt_xent,
    token_targets,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def square_mask(batch: int = 2, size: int = 16) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    masks[:, :, 4:12, 4:12] = 1.0
    return masks


def test_downsample_mask_keeps_a_one_pixel_line():
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, 13, :] = 1.0
    small = downsample_mask(masks, 4)
    assert small.shape == (1, 4, 4)
    assert small[0, 1].eq(1).all() and small.sum() == 4


def test_token_targets_give_anomaly_tokens_the_mask_and_the_context_token_its_complement():
    masks = square_mask()
    targets = token_targets(masks, [True, False, False], 8)
    defect = downsample_mask(masks, 8)
    assert targets.shape == (2, 3, 8, 8)
    assert torch.equal(targets[:, 0], 1 - defect)
    assert torch.equal(targets[:, 1], defect) and torch.equal(targets[:, 2], defect)


def test_localization_loss_is_zero_on_the_targets_and_positive_off_them():
    masks, is_context = square_mask(), [True, False]
    maps = {8: token_targets(masks, is_context, 8), 4: token_targets(masks, is_context, 4)}
    assert localization_loss(maps, masks, is_context).item() == 0.0
    off = {side: target + 0.1 for side, target in maps.items()}
    assert localization_loss(off, masks, is_context).item() > 0.0


def test_balanced_and_unbalanced_differ_when_token_errors_cancel():
    masks, is_context = square_mask(), [False, False]
    target = token_targets(masks, is_context, 4)
    maps = {4: target + torch.tensor([0.2, -0.2])[None, :, None, None]}
    assert localization_loss(maps, masks, is_context, balanced=True).item() == pytest.approx(0.0, abs=1e-7)
    assert localization_loss(maps, masks, is_context, balanced=False).item() == pytest.approx(0.04)


def test_balanced_loss_with_one_context_and_one_anomaly_token_ignores_the_mask():
    masks, is_context = square_mask(), [True, False]
    maps = {4: torch.full((2, 2, 4, 4), 0.5)}
    assert localization_loss(maps, masks, is_context).item() == pytest.approx(0.0, abs=1e-7)
    assert localization_loss(maps, masks, is_context, balanced=False).item() > 0.0


def test_localization_loss_sums_over_resolutions():
    masks, is_context = square_mask(), [True, False]
    low = {4: torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))}
    high = {8: torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))}
    both = localization_loss({**low, **high}, masks, is_context)
    separate = localization_loss(low, masks, is_context) + localization_loss(high, masks, is_context)
    assert both.item() == pytest.approx(separate.item())


def test_localization_loss_rejects_a_map_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 2, 4, 4\)"):
        localization_loss({4: torch.zeros(2, 3, 4, 4)}, square_mask(), [True, False])


def test_nt_xent_prefers_separated_concepts_to_random_vectors():
    separated = torch.eye(3, 8).expand(4, 3, 8)
    noise = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    assert nt_xent(separated).item() < nt_xent(noise).item()


def test_nt_xent_is_unchanged_by_a_consistent_concept_permutation():
    vectors = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    permuted = vectors[:, torch.tensor([2, 0, 3, 1])]
    assert nt_xent(permuted).item() == pytest.approx(nt_xent(vectors).item())


def test_nt_xent_matches_hand_computed_values():
    separated = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    assert nt_xent(separated).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))
    # x[example][concept]: x11 = (1, 0), x12 = (0, 1), x21 = (1, 1), x22 = (-1, 0); τ = 1.
    vectors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])
    r = 1 / math.sqrt(2)
    anchors = [
        -r + math.log(math.exp(r) + 1 + math.exp(-1)),  # x11: positive x21; others x12, x22
        -0.0 + math.log(2 + math.exp(r)),  # x12: positive x22; others x11, x21
        -r + math.log(2 * math.exp(r) + math.exp(-r)),  # x21: positive x11; others x12, x22
        -0.0 + math.log(math.exp(-1) + math.exp(-r) + 1),  # x22: positive x12; others x11, x21
    ]
    assert nt_xent(vectors, temperature=1.0).item() == pytest.approx(sum(anchors) / 4)


def test_nt_xent_passes_gradients():
    vectors = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    nt_xent(vectors).backward()
    assert vectors.grad is not None and vectors.grad.isfinite().all() and vectors.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 3, 4), (3, 1, 4), (3, 4)])
def test_nt_xent_rejects_fewer_than_two_examples_or_concepts(shape):
    with pytest.raises(ValueError, match=r"B >= 2 and C >= 2"):
        nt_xent(torch.ones(shape))


def test_attention_pooled_picks_a_pixel_or_averages():
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    maps = torch.zeros(2, 2, 4, 4)
    maps[:, 0, 1, 2] = 1.0
    maps[:, 1] = 1.0 / 16
    pooled = attention_pooled(features, maps)
    assert pooled.shape == (2, 2, 3)
    assert torch.allclose(pooled[:, 0], features[:, :, 1, 2])
    assert torch.allclose(pooled[:, 1], features.mean(dim=(2, 3)))


def test_attention_pooled_rejects_mismatched_sides():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\), \(2, 2, 8, 8\)"):
        attention_pooled(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 8, 8))
