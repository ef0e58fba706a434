"""AnomalyDiffusion's spatial encoder E: shapes, mask sensitivity, init scale, gradients, checkpoints, settings."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from defectsynth.core.resnet import resnet
from defectsynth.generators.anomalydiffusion.spatial_encoder import (
    FeaturePyramid,
    SpatialEncoder,
    SpatialEncoderSettings,
    build_spatial_encoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width": 8, "fpn_channels": 16}


def _tiny(depth: int = 18, embedding_dim: int = 32, **overrides) -> SpatialEncoder:
    torch.manual_seed(0)
    return build_spatial_encoder(SpatialEncoderSettings(depth=depth, **{**TINY, **overrides}), embedding_dim)


def _square_masks(side: int = 64, size: int = 16) -> torch.Tensor:
    """Three masks: a square top-left, the same square shifted bottom-right, and a larger square."""
    masks = torch.zeros(3, 1, side, side)
    masks[0, :, 4 : 4 + size, 4 : 4 + size] = 1.0
    masks[1, :, side - 4 - size : side - 4, side - 4 - size : side - 4] = 1.0
    masks[2, :, 8 : 8 + 2 * size, 8 : 8 + 2 * size] = 1.0
    return masks


@pytest.mark.parametrize("depth", [18, 50])
def test_output_shape(depth: int) -> None:
    encoder = _tiny(depth, embedding_dim=24, tokens=3)
    out = encoder(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3, 24)
    assert torch.isfinite(out).all()
    # non-square and non-power-of-two sizes, and boolean masks, work too
    assert encoder(torch.rand(2, 1, 48, 40) > 0.5).shape == (2, 3, 24)


def test_default_settings_are_the_papers() -> None:
    settings = SpatialEncoderSettings()
    assert (settings.tokens, settings.depth, settings.width, settings.fpn_channels) == (4, 50, 64, 256)
    assert settings.pretrained_path is None


def test_feature_pyramid_keeps_sizes() -> None:
    fpn = FeaturePyramid((4, 8, 16, 32), 6)
    sizes = [(15, 13), (8, 7), (4, 4), (2, 2)]
    maps = [torch.rand(2, c, h, w) for c, (h, w) in zip((4, 8, 16, 32), sizes, strict=True)]
    assert [tuple(p.shape) for p in fpn(maps)] == [(2, 6, h, w) for h, w in sizes]
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        fpn(maps[:3])


def test_different_masks_give_different_tokens() -> None:
    encoder = _tiny(50).eval()
    masks = _square_masks()
    with torch.no_grad():
        tokens = encoder(torch.cat([masks, masks[:1]]))
        alone = encoder(masks[:1])
    for i in range(3):
        for j in range(i + 1, 3):
            gap = (tokens[i] - tokens[j]).abs().max()
            assert gap > 1e-3, f"masks {i} and {j} gave (nearly) the same tokens"
    # in eval mode a mask's tokens do not depend on the rest of the batch
    torch.testing.assert_close(tokens[3], tokens[0])
    torch.testing.assert_close(alone[0], tokens[0], rtol=1e-4, atol=1e-5)
    # each head gives its own token
    assert (tokens[0, 0] - tokens[0, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("init_scale", [0.02, 0.1])
def test_initial_tokens_have_the_requested_scale(init_scale: float) -> None:
    encoder = _tiny(18, embedding_dim=64, init_scale=init_scale)
    with torch.no_grad():
        out = encoder(_square_masks())
    std = float(out.std())
    assert 0.7 * init_scale < std < 1.4 * init_scale
    assert float(out.mean().abs()) < 0.2 * init_scale


def test_gradients_reach_heads_fpn_and_backbone() -> None:
    encoder = _tiny(50)
    target = torch.randn(3, 4, 32)
    loss = (encoder(_square_masks()) - target).square().mean()
    loss.backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    for module in (*encoder.heads, encoder.fpn.lateral[0], encoder.backbone.conv1, encoder.backbone.layer4):
        assert any(float(p.grad.abs().sum()) > 0 for p in module.parameters())


def test_input_normalisation() -> None:
    seen: list[torch.Tensor] = []
    masks = torch.stack([torch.zeros(1, 32, 32), torch.ones(1, 32, 32)])
    for norm, expected in (("signed", (-1.0, 1.0)), ("imagenet", ((0 - 0.485) / 0.229, (1 - 0.485) / 0.229))):
        encoder = _tiny(18, input_norm=norm)
        handle = encoder.backbone.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        encoder(masks)
        handle.remove()
        x = seen.pop()
        assert x.shape == (2, 3, 32, 32)
        torch.testing.assert_close(x[0, 0], torch.full((32, 32), expected[0]))
        torch.testing.assert_close(x[1, 0], torch.full((32, 32), expected[1]))


def test_loads_a_local_backbone(tmp_path) -> None:
    torch.manual_seed(123)
    source = resnet(18, num_classes=None, width=8)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    encoder = _tiny(18, pretrained_path=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(encoder.backbone.state_dict()[key], value, msg=key)
    scratch = _tiny(18)
    assert not torch.equal(scratch.backbone.conv1.weight, source.conv1.weight)
    # a classifier checkpoint (torchvision's layout, with fc) loads too; its head is skipped
    torch.save(resnet(18, num_classes=10, width=8).state_dict(), tmp_path / "classifier.pth")
    _tiny(18, pretrained_path=str(tmp_path / "classifier.pth"))


def test_backbone_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        _tiny(18, pretrained_path=str(missing))
    wrong_width = tmp_path / "wide.pth"
    torch.save(resnet(18, num_classes=None, width=16).state_dict(), wrong_width)
    with pytest.raises(ValueError, match="wide.pth"):
        _tiny(18, pretrained_path=str(wrong_width))


@pytest.mark.parametrize(
    "bad",
    [
        {"depth": 101},
        {"tokens": 0},
        {"width": 0},
        {"fpn_channels": 0},
        {"pool_size": 0},
        {"init_scale": 0.0},
        {"input_norm": "zscore"},
        {"pretrained_path": ""},
        {"layers": 3},
    ],
)
def test_settings_validation(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SpatialEncoderSettings(**bad)


def test_settings_are_frozen_and_inputs_checked() -> None:
    settings = SpatialEncoderSettings(**TINY, depth=18)
    with pytest.raises(ValidationError):
        settings.tokens = 8
    with pytest.raises(ValueError, match="embedding_dim"):
        build_spatial_encoder(settings, 0)
    encoder = build_spatial_encoder(settings, 16)
    for shape in ((2, 3, 32, 32), (2, 32, 32), (2, 2, 32, 32)):
        with pytest.raises(ValueError, match="B x 1 x H x W"):
            encoder(torch.rand(*shape))


def test_paper_config_parameter_count() -> None:
    # depth 50, width 64, fpn 256, pool 4, 4 tokens, CLIP's 768: 39.4M parameters (the count in the module doc)
    with torch.device("meta"):
        encoder = build_spatial_encoder(SpatialEncoderSettings(), 768)
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("backbone", encoder.backbone), ("fpn", encoder.fpn), ("heads", encoder.heads))
    }
    assert counts == {"backbone": 23_508_032, "fpn": 3_344_384, "heads": 12_585_984}
    assert sum(p.numel() for p in encoder.parameters()) == 39_446_592
