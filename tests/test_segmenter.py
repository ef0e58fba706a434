"""The segmentation U-Net: shapes, scores, DRAEM's focal loss, a tiny overfit, and the predict wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from defectsynth.evaluation.metrics import auroc
from defectsynth.evaluation.segmenter import (
    DiscriminativeUNet,
    SegmentationOutput,
    SegmenterConfig,
    build_segmenter,
    configure_optimizer,
    focal_loss,
    image_score_from_map,
    predict,
    top_k_mean_score,
    training_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _squares(n: int = 4, side: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Noisy grey images with one bright square each, and the square as the mask."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 + 0.2 * torch.rand(n, 3, side, side, generator=g)
    masks = torch.zeros(n, 1, side, side)
    for i in range(n):
        y, x = torch.randint(0, side - 10, (2,), generator=g).tolist()
        size = 6 + i
        masks[i, :, y : y + size, x : x + size] = 1.0
        images[i, :, y : y + size, x : x + size] = 0.9
    return {"image": images, "mask": masks}


def _brute_pooled_max(amap: np.ndarray, kernel: int) -> float:
    """Max over centres of the k x k window sum / k^2, with zero padding counted (DRAEM's avg_pool2d)."""
    pad = kernel // 2
    padded = np.pad(amap, pad)
    h, w = amap.shape
    return max(padded[y : y + kernel, x : x + kernel].sum() / kernel**2 for y in range(h) for x in range(w))


def test_output_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(base_width=4))
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 32))
    assert isinstance(out, SegmentationOutput)
    assert out.anomaly_map.shape == (3, 1, 64, 32)
    assert out.pred_score.shape == (3,)
    assert out.logits.shape == (3, 2, 64, 32)
    assert 0.0 <= float(out.anomaly_map.min()) and float(out.anomaly_map.max()) <= 1.0
    torch.testing.assert_close(out.anomaly_map, out.logits.softmax(dim=1)[:, 1:])
    torch.testing.assert_close(out.pred_score, image_score_from_map(out.anomaly_map, 21))


def test_six_channel_input_and_size_checks() -> None:
    model = DiscriminativeUNet(in_channels=6, base_width=2, depth=4)
    assert model(torch.rand(1, 6, 16, 24)).anomaly_map.shape == (1, 1, 16, 24)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 6, 20, 16))
    with pytest.raises(ValueError, match="B x 6 x H x W"):
        model(torch.rand(1, 3, 16, 16))


def test_draem_widths_at_base_64() -> None:
    # DRAEM's DiscriminativeSubNetwork(in_channels=6, out_channels=2) has 28,374,146 parameters
    with torch.device("meta"):  # shapes only, no memory
        model = DiscriminativeUNet(in_channels=6, base_width=64, depth=6)
    assert sum(p.numel() for p in model.parameters()) == 28_374_146
    assert [block[0].out_channels for block in model.down] == [64, 128, 256, 512, 512, 512]


def test_image_score_is_max_of_21x21_average_pool_on_a_hand_built_map() -> None:
    amap = torch.zeros(2, 1, 32, 32)
    amap[0, 0, 10:13, 10:13] = 1.0  # a 3 x 3 blob fits in one 21 x 21 window: 9 / 441
    amap[1, 0, 0:3, 0:3] = 1.0  # in the corner, zero padding is counted: still 9 / 441
    amap[1, 0, 20:30, 25:27] = 0.5  # 20 pixels at 0.5 in one window: 10 / 441
    scores = image_score_from_map(amap)
    torch.testing.assert_close(scores, torch.tensor([9 / 441, 10 / 441]))
    # and against a brute-force window scan on random maps, B x H x W input included
    rand = torch.rand(2, 24, 40)
    for i in range(2):
        expected = _brute_pooled_max(rand[i].double().numpy(), 21)
        assert float(image_score_from_map(rand, kernel=21)[i]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="odd"):
        image_score_from_map(amap, kernel=20)


def test_top_k_mean_score() -> None:
    amap = torch.zeros(1, 1, 10, 10)
    amap.view(-1)[:5] = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])
    torch.testing.assert_close(top_k_mean_score(amap, k=2), torch.tensor([0.9]))
    torch.testing.assert_close(top_k_mean_score(amap, k=50), torch.tensor([3.0 / 50]))


def test_focal_loss_matches_hand_values() -> None:
    logits = torch.zeros(1, 2, 2, 2)  # p = 0.5 for both classes everywhere
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    p_t = 0.5 * (1 - 1e-5) + 0.5 * 1e-5 + 1e-5  # DRAEM: smoothed one-hot, then + smooth
    expected = (1 - p_t) ** 2 * -np.log(p_t)
    assert float(focal_loss(logits, mask)) == pytest.approx(expected, rel=1e-6)
    # alpha weighs anomalous pixels by alpha and normal ones by 1 - alpha
    assert float(focal_loss(logits, mask, alpha=0.25)) == pytest.approx(expected * (0.25 + 3 * 0.75) / 4, rel=1e-6)


def test_focal_loss_without_focusing_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    ce = F.cross_entropy(logits, mask[:, 0].long())
    torch.testing.assert_close(focal_loss(logits, mask, gamma=0.0, smooth=0.0), ce)
    # focusing down-weights easy pixels, so the loss shrinks
    assert float(focal_loss(logits, mask, gamma=2.0, smooth=0.0)) < float(ce)


def test_tiny_overfit_drives_pixel_auroc_up() -> None:
    torch.manual_seed(0)
    batch = _squares()
    # depth 5 leaves a 2 x 2 bottleneck at 32 px; at depth 6 it is 1 x 1, and BN statistics of 4 values per
    # channel are too noisy for the eval-mode running averages after 30 steps
    cfg = SegmenterConfig(base_width=8, depth=5, lr=1e-3)
    model = build_segmenter(cfg)
    optimizer, _ = configure_optimizer(model, cfg)
    model.train()
    losses = []
    for _ in range(30):
        loss = training_step(model, batch, gamma=cfg.focal_gamma, alpha=cfg.focal_alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    out = predict(model, batch["image"])
    assert auroc(out.anomaly_map.numpy(), batch["mask"].numpy().astype(bool)) > 0.9


def test_predict_runs_in_eval_mode_without_grad_and_restores_the_mode() -> None:
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(base_width=2, depth=3))
    model.train()
    images = torch.rand(2, 3, 8, 8)
    out = predict(model, images)
    assert not out.anomaly_map.requires_grad and not out.pred_score.requires_grad and out.logits.grad_fn is None
    assert model.training  # restored
    model.eval()
    torch.testing.assert_close(out.anomaly_map, model(images).anomaly_map)  # BN running stats were used
    predict(model, images)
    assert not model.training


def test_training_step_requires_its_fields() -> None:
    model = build_segmenter(SegmenterConfig(base_width=2, depth=3))
    with pytest.raises(ValueError, match=r"lacks the fields \['mask'\]"):
        training_step(model, {"image": torch.rand(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="does not match"):
        training_step(model, {"image": torch.rand(1, 3, 8, 8), "mask": torch.zeros(1, 1, 4, 4)})


def test_config_and_schedule() -> None:
    cfg = SegmenterConfig()
    assert (cfg.in_channels, cfg.base_width, cfg.depth, cfg.lr, cfg.batch_size, cfg.focal_gamma) == (
        3,
        16,
        6,
        1e-4,
        8,
        2.0,
    )
    with pytest.raises(ValueError):
        SegmenterConfig(unknown=1)
    model = build_segmenter(SegmenterConfig(base_width=2, depth=2))
    assert model.hparams == {"in_channels": 3, "base_width": 2, "depth": 2, "score_kernel": 21}
    optimizer, scheduler = configure_optimizer(model, SegmenterConfig(epochs=10))
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-4] * 8 + [2e-5, 4e-6])  # x0.2 at 80 % and 90 % of the epochs
