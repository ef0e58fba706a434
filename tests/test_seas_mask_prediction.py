"""SeaS's Refined Mask Prediction branch: shapes, the focal loss, coarse targets, Eq. 7 and a training signal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError

from defectsynth.generators.seas.mask_prediction import (
    MaskPrediction,
    MaskPredictionSettings,
    RefinedMaskPrediction,
    binary_mask,
    coarse_target,
    focal_loss,
    mask_prediction_loss,
)

SMALL = MaskPredictionSettings(
    coarse_channels=(16, 8), refine_channels=16, attention_heads=2, norm_groups=8, transformer_layers=1
)

# (unet_channels, unet sides, vae_channels, vae sides, output size, settings)
TINY_LIKE = ((64, 64), (4, 8), (64, 32, 16), (16, 32, 32), 32, SMALL)  # the tiny base at 1/4 of its sizes
SD_LIKE = ((80, 40), (2, 4), (32, 32, 16), (8, 16, 32), 32, MaskPredictionSettings())  # SD's channels / 16


def _features(config: tuple, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    unet_channels, unet_sides, vae_channels, vae_sides, _, _ = config
    unet = [torch.randn(batch, c, s, s) for c, s in zip(unet_channels, unet_sides, strict=True)]
    vae = [torch.randn(batch, c, s, s) for c, s in zip(vae_channels, vae_sides, strict=True)]
    return unet, vae


@pytest.mark.parametrize("config", [TINY_LIKE, SD_LIKE], ids=["tiny", "sd"])
def test_shapes_and_softmax(config):
    torch.manual_seed(0)
    unet_channels, unet_sides, vae_channels, _, out, settings = config
    model = RefinedMaskPrediction(unet_channels, vae_channels, settings)
    unet, vae = _features(config, batch=2)
    with torch.no_grad():
        prediction = model(unet, vae, out)
    side = unet_sides[1]
    assert prediction.coarse.shape == (2, 2, side, side)
    assert prediction.refined.shape == (2, 2, out, out)
    for probabilities in (prediction.coarse, prediction.refined):
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(()), atol=1e-5)
        assert probabilities.min() >= 0


def test_output_size_beyond_the_last_vae_feature():
    torch.manual_seed(0)
    model = RefinedMaskPrediction((64, 64), (64, 32, 16), SMALL).eval()
    unet, vae = _features(TINY_LIKE, batch=1)
    with torch.no_grad():
        prediction = model(unet, vae, 48)
    assert prediction.refined.shape == (1, 2, 48, 48)
    assert torch.allclose(prediction.refined.sum(dim=1), torch.ones(()), atol=1e-5)


def test_coarse_only_ignores_vae_features():
    torch.manual_seed(0)
    settings = SMALL.model_copy(update={"refinement": "coarse_only"})
    model = RefinedMaskPrediction((64, 64), (), settings).eval()
    assert len(model.refiners) == 0
    unet, _ = _features(TINY_LIKE, batch=2)
    with torch.no_grad():
        prediction = model(unet, [], 32)
    expected = F.interpolate(prediction.coarse, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(prediction.refined, expected)


def test_normal_rows_get_the_upsampled_coarse_mask():
    torch.manual_seed(0)
    model = RefinedMaskPrediction((64, 64), (64, 32, 16), SMALL).eval()
    unet, vae = _features(TINY_LIKE, batch=3)
    normal = torch.tensor([False, True, False])
    with torch.no_grad():
        prediction = model(unet, vae, 32, normal=normal)
        cascade = model(unet, vae, 32)
    upsampled = F.interpolate(prediction.coarse, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(prediction.refined[1], upsampled[1])
    assert torch.allclose(prediction.refined[~normal], cascade.refined[~normal], atol=1e-6)
    assert not torch.allclose(prediction.refined[0], upsampled[0], atol=1e-3)


def test_all_normal_batch_skips_the_cascade():
    torch.manual_seed(0)
    model = RefinedMaskPrediction((64, 64), (64, 32, 16), SMALL)
    unet, vae = _features(TINY_LIKE, batch=2)
    prediction = model(unet, vae, 32, normal=torch.tensor([True, True]))
    upsampled = F.interpolate(prediction.coarse, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(prediction.refined, upsampled)


def test_focal_loss_closed_form():
    defect = torch.tensor([0.9, 0.3, 0.6, 0.05])
    probabilities = torch.stack([1 - defect, defect]).view(2, 1, 2, 2).permute(1, 0, 2, 3)  # (1, 2, 2, 2)
    target = torch.tensor([1, 0, 1, 0]).view(1, 1, 2, 2)
    p_t = [0.9, 0.7, 0.6, 0.95]
    expected = sum(-((1 - p) ** 2) * math.log(p) for p in p_t) / 4
    assert focal_loss(probabilities, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-5)
    assert focal_loss(probabilities, target.squeeze(1), gamma=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    probabilities = torch.randn(2, 2, 3, 3).softmax(dim=1)
    target = torch.randint(0, 2, (2, 3, 3))
    expected = F.nll_loss(probabilities.log(), target)
    assert focal_loss(probabilities, target, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_loss_of_a_confident_correct_prediction_is_about_zero():
    target = torch.tensor([[[0, 1], [1, 0]]])
    probabilities = torch.stack([1 - target.float(), target.float()], dim=1) * 0.9998 + 0.0001
    assert focal_loss(probabilities, target).item() < 1e-8
    assert torch.isfinite(focal_loss(1 - probabilities, target))


def test_coarse_target_keeps_a_one_pixel_line():
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, :, 13] = 1  # a vertical 1-px crack
    target = coarse_target(masks, 8)
    assert target.shape == (1, 1, 8, 8)
    assert torch.equal(target[0, 0, :, 3], torch.ones(8))
    assert target.sum() == 8
    lost = F.interpolate(masks, size=(8, 8), mode="bilinear", align_corners=False).floor()
    assert lost.sum() == 0  # what the authors' bilinear resize + floor would keep


def test_mask_prediction_loss_supervises_normal_rows_with_zeros():
    masks = torch.ones(1, 1, 16, 16)  # a "defect" mask on a row flagged normal must be ignored
    normal = torch.tensor([True])

    def constant(defect: float) -> MaskPrediction:
        def probs(side: int) -> torch.Tensor:
            return torch.tensor([1 - defect, defect]).view(1, 2, 1, 1).expand(1, 2, side, side)

        return MaskPrediction(coarse=probs(4), refined=probs(16))

    all_defect = mask_prediction_loss(constant(0.99), masks, normal, gamma=2.0)
    all_normal = mask_prediction_loss(constant(0.01), masks, normal, gamma=2.0)
    assert all_defect > 10 * all_normal
    # The same prediction on an abnormal row with a full mask is the cheap one.
    assert mask_prediction_loss(constant(0.99), masks, ~normal, gamma=2.0) < all_normal + 1e-6


def test_binary_mask_thresholds_the_defect_channel():
    defect = torch.tensor([[[0.1, 0.2], [0.21, 0.9]]])
    mask = binary_mask(torch.stack([1 - defect, defect], dim=1), 0.2)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[[False, False], [True, True]]]


def _squares(batch: int, side: int, normal: torch.Tensor) -> torch.Tensor:
    masks = torch.zeros(batch, 1, side, side)
    for row in range(batch):
        if normal[row]:
            continue
        size = int(torch.randint(side // 4, side // 2, ()))
        top, left = (int(v) for v in torch.randint(0, side - size, (2,)))
        masks[row, 0, top : top + size, left : left + size] = 1
    return masks


def _encode(masks: torch.Tensor, channels: tuple[int, ...], sides: tuple[int, ...]) -> list[torch.Tensor]:
    """Features that carry the mask: its area-downsampled indicator plus noise, broadcast over channels."""
    features = []
    for c, s in zip(channels, sides, strict=True):
        indicator = F.adaptive_avg_pool2d(masks, s).expand(-1, c, -1, -1)
        features.append(indicator + 0.3 * torch.randn(masks.shape[0], c, s, s))
    return features


def test_training_learns_to_segment_a_square():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, unet_sides, _, vae_sides, out, _ = TINY_LIKE
    unet_channels, vae_channels = (16, 16), (16, 8, 8)  # narrower than the tiny base, to train in about a second
    model = RefinedMaskPrediction(unet_channels, vae_channels, SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    normal = torch.tensor([False, False, True, True])  # the paper's batch: 2 abnormal + 2 normal
    losses = []
    for _ in range(60):
        masks = _squares(4, out, normal)
        prediction = model(
            _encode(masks, unet_channels, unet_sides), _encode(masks, vae_channels, vae_sides), out, normal=normal
        )
        loss = mask_prediction_loss(prediction, masks, normal, SMALL.focal_gamma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 5  # a 11-30x fall over seeds 0-4

    model.eval()
    test_normal = torch.zeros(4, dtype=torch.bool)
    masks = _squares(4, out, test_normal)
    with torch.no_grad():
        prediction = model(_encode(masks, unet_channels, unet_sides), _encode(masks, vae_channels, vae_sides), out)
    predicted = binary_mask(prediction.refined, SMALL.threshold)
    truth = masks[:, 0].bool()
    iou = (predicted & truth).sum() / (predicted | truth).sum()
    assert iou > 0.8  # about 0.98 over seeds 0-4


def test_settings_reject_unknown_keys():
    with pytest.raises(ValidationError):
        MaskPredictionSettings(coarse_channel=(8, 8))


def test_heads_mismatch_is_a_value_error_naming_the_values():
    settings = MaskPredictionSettings(coarse_channels=(16, 8), attention_heads=5, norm_groups=8)
    with pytest.raises(ValueError, match=r"24.*attention_heads 5"):
        RefinedMaskPrediction((64, 64), (64,), settings)
    settings = MaskPredictionSettings(coarse_channels=(16, 8), attention_heads=2, norm_groups=5)
    with pytest.raises(ValueError, match=r"24.*norm_groups 5"):
        RefinedMaskPrediction((64, 64), (64,), settings)


def test_cascade_checks_the_vae_features():
    model = RefinedMaskPrediction((64, 64), (64, 32, 16), SMALL)
    unet, vae = _features(TINY_LIKE, batch=1)
    with pytest.raises(ValueError, match="channels"):
        model(unet, vae[:2], 32)
    with pytest.raises(ValueError, match="at least one"):
        RefinedMaskPrediction((64, 64), (), SMALL)


@pytest.mark.parametrize(("normalization", "same"), [("group", True), ("batch", False)])
def test_group_norm_predicts_in_training_as_at_generation(normalization: str, same: bool):
    # BatchNorm's batch statistics (2 abnormal rows per step) differ from its running averages at generation
    torch.manual_seed(0)
    settings = SMALL.model_copy(update={"normalization": normalization})
    model = RefinedMaskPrediction(TINY_LIKE[0], TINY_LIKE[2], settings)
    unet, vae = _features(TINY_LIKE, batch=2)
    training = model.train()(unet, vae, 32).refined
    generating = model.eval()(unet, vae, 32).refined
    assert torch.allclose(training, generating, atol=1e-6) == same
