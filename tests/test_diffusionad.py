"""DiffusionAD (paper 003): the one-step path by hand, L_noise's weighting, Eq. 12 anomalies, predict, a tiny fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError
from torch import nn

from defectsynth.core.perlin_noise import perlin_mask
from defectsynth.core.texture_augment import augment_texture
from defectsynth.evaluation.diffusionad import (
    DiffusionAD,
    DiffusionADConfig,
    DiffusionADOutput,
    blend_anomaly,
    build_diffusionad,
    configure_optimizer,
    linear_alphas_cumprod,
    predict,
    sample_training_noise,
    synthesize_anomalies,
)
from defectsynth.evaluation.segmenter import focal_loss, top_k_mean_score

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DiffusionADConfig(block_out_channels=(8, 16), attention_head_dim=8, seg_base_width=4, seg_depth=3)
SIDE = 32


class LinearEps(nn.Module):
    """A known "denoiser": ε = 0.3 x_t + 1e-3 t, with UNet2DModel's call signature."""

    def forward(self, x_t, t, return_dict=True):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        return (0.3 * x_t + 1e-3 * t.float().reshape(-1, 1, 1, 1),)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 3, SIDE, SIDE, generator=g)


def _by_hand(images, noise_s, noise_b, t_s, t_b, w=1.0):
    """Eq. 1 and 6-8 written out, on the code's linear schedule 1e-4..0.02, for the LinearEps denoiser."""
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a_s = alphas[t_s].float().reshape(-1, 1, 1, 1)
    a_b = alphas[t_b].float().reshape(-1, 1, 1, 1)
    t_s_f, t_b_f = torch.as_tensor(t_s).float().reshape(-1, 1, 1, 1), torch.as_tensor(t_b).float().reshape(-1, 1, 1, 1)
    x0 = 2 * images - 1  # the DDPM's [-1, 1]
    x_ts = a_s.sqrt() * x0 + (1 - a_s).sqrt() * noise_s
    x_tb = a_b.sqrt() * x0 + (1 - a_b).sqrt() * noise_b
    e_s, e_b = 0.3 * x_ts + 1e-3 * t_s_f, 0.3 * x_tb + 1e-3 * t_b_f
    n = (x_tb - (1 - a_b).sqrt() * e_b) / a_b.sqrt()  # Eq. 6 at t_b
    n_ts = a_s.sqrt() * n + (1 - a_s).sqrt() * e_s  # n noised with the predicted ε_θ(x_{t_s})
    e_hat = e_s - (1 - a_s).sqrt() * w * (n_ts - x_ts)  # Eq. 7
    x0_g = (x_ts - (1 - a_s).sqrt() * e_hat) / a_s.sqrt()  # Eq. 8
    recon = (x0_g.clamp(-1, 1) + 1) / 2
    return recon, e_s, e_b


# --- (a) the one-step path by hand ------------------------------------------------------------------


def test_forward_matches_eq_6_to_11_by_hand():
    torch.manual_seed(0)
    model = build_diffusionad(TINY)
    model.denoiser = LinearEps()
    images = _images(2)
    masks = torch.zeros(2, 1, SIDE, SIDE)
    masks[1, :, 4:12, 8:20] = 1.0
    anomalous = torch.tensor([0.0, 1.0])
    g = torch.Generator().manual_seed(1)
    noise_s, noise_b = torch.randn(2, 3, SIDE, SIDE, generator=g), torch.randn(2, 3, SIDE, SIDE, generator=g)
    t_s, t_b = torch.tensor([10, 250]), torch.tensor([300, 900])
    seen = []
    model.segmenter.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))

    out = model(images, masks, anomalous, noise_s, noise_b, t_s, t_b)

    recon, e_s, e_b = _by_hand(images, noise_s, noise_b, t_s, t_b)
    assert isinstance(out, DiffusionADOutput)
    assert float(((recon > 0) & (recon < 1)).float().mean()) > 0.5  # mostly inside the clamp: a real check
    torch.testing.assert_close(out.reconstruction, recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0], torch.cat((images, recon), dim=1), atol=1e-5, rtol=1e-5)
    # Eq. 9: only sample 0 is normal, so L_noise is its (per-pixel-mean) squared errors, halved
    expected_noise = ((e_s[0] - noise_s[0]).square().mean() + (e_b[0] - noise_b[0]).square().mean()) / 2
    torch.testing.assert_close(out.noise_loss, expected_noise, atol=1e-5, rtol=1e-5)
    # Eq. 10 with γ = 5, the code's focal exponent 4 and α = 0.5 (segmenter in train mode: same batch stats)
    seg = model.segmenter(seen[0])
    torch.testing.assert_close(out.anomaly_map, seg.anomaly_map)
    expected_mask = F.smooth_l1_loss(seg.anomaly_map, masks) + 5 * focal_loss(seg.logits, masks, gamma=4, alpha=0.5)
    torch.testing.assert_close(out.mask_loss, expected_mask)
    torch.testing.assert_close(out.loss, out.noise_loss + out.mask_loss)


def test_predict_matches_eq_6_to_8_at_the_fixed_levels():
    model = build_diffusionad(TINY)
    model.denoiser = LinearEps()
    images = _images(3)
    both = torch.randn((2, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(7))  # what seed 7 draws
    noise_s, noise_b = both[0].expand_as(images), both[1].expand_as(images)
    recon, _, _ = _by_hand(images, noise_s, noise_b, torch.full((3,), 200), torch.full((3,), 400))
    out = predict(model, images, seed=7)
    torch.testing.assert_close(out.reconstruction, recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred_score, top_k_mean_score(out.anomaly_map, 50))


def test_schedule_is_the_codes_linear_betas():
    alphas = linear_alphas_cumprod(TINY)
    assert alphas.dtype == torch.float64 and alphas.shape == (1000,)
    assert float(alphas[0]) == pytest.approx(1 - 1e-4)
    assert float(alphas[-1]) == pytest.approx(float(torch.prod(1 - torch.linspace(1e-4, 0.02, 1000).double())))
    model = DiffusionAD(TINY)
    assert float(model.sampler.alpha_bar(400)) == pytest.approx(float(alphas[400]))


@pytest.mark.parametrize("detach", [False, True])
def test_mask_loss_reaches_the_denoiser_unless_detached(detach):
    torch.manual_seed(0)
    model = build_diffusionad(TINY.model_copy(update={"detach_reconstruction": detach}))
    images = _images(2)
    noise = sample_training_noise(images.shape, torch.Generator().manual_seed(0), TINY)
    t_small = torch.tensor([5, 5])  # a small t_s keeps x̂_{0_g} mostly inside the clamp
    out = model(images, torch.zeros(2, 1, SIDE, SIDE), torch.ones(2), noise.noise_s, noise.noise_b, t_small, noise.t_b)
    out.mask_loss.backward()
    grads = [p.grad for p in model.denoiser.parameters()]
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached is not detach
    assert all(p.grad is not None for p in model.segmenter.parameters())


# --- (b) L_noise counts normal samples only ------------------------------------------------------------


def test_noise_loss_ignores_anomalous_samples():
    torch.manual_seed(0)
    model = build_diffusionad(TINY)
    images = _images(4)
    masks = torch.zeros(4, 1, SIDE, SIDE)
    anomalous = torch.tensor([0.0, 1.0, 0.0, 1.0])
    noise_s, noise_b, t_s, t_b = sample_training_noise(images.shape, torch.Generator().manual_seed(0), TINY)
    base = model(images, masks, anomalous, noise_s, noise_b, t_s, t_b).noise_loss

    other = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(9))
    swapped_s, swapped_b = noise_s.clone(), noise_b.clone()
    swapped_s[1], swapped_b[3] = other[0], other[1]  # new noise (input and target) for anomalous samples
    changed_anomalous = model(images, masks, anomalous, swapped_s, swapped_b, t_s, t_b).noise_loss
    torch.testing.assert_close(changed_anomalous, base, atol=1e-6, rtol=1e-6)

    swapped_s = noise_s.clone()
    swapped_s[0] = other[0]  # a normal sample's noise does count
    assert not torch.allclose(model(images, masks, anomalous, swapped_s, noise_b, t_s, t_b).noise_loss, base)

    all_anomalous = model(images, masks, torch.ones(4), noise_s, noise_b, t_s, t_b)
    assert all_anomalous.noise_loss.item() == 0.0 and torch.isfinite(all_anomalous.loss.detach())


def test_training_noise_ranges_and_reproducibility():
    cfg = TINY.model_copy(update={"t_b_max": 600})
    first = sample_training_noise((64, 3, 8, 8), torch.Generator().manual_seed(3), cfg)
    again = sample_training_noise((64, 3, 8, 8), torch.Generator().manual_seed(3), cfg)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert first.noise_s.shape == (64, 3, 8, 8) and not torch.equal(first.noise_s, first.noise_b)
    assert first.t_s.dtype == torch.long and int(first.t_s.min()) >= 0 and int(first.t_s.max()) < 300
    assert int(first.t_b.min()) >= 300 and int(first.t_b.max()) < 600
    with pytest.raises(ValueError, match="B, C, H, W"):
        sample_training_noise((3, 8, 8), None, TINY)


# --- (c) synthetic anomalies (Eq. 12) ---------------------------------------------------------------


def _left_half(n: int) -> torch.Tensor:
    fg = torch.zeros(n, 1, SIDE, SIDE)
    fg[..., : SIDE // 2] = 1.0
    return fg


def test_blend_anomaly_is_eq_12():
    normal, source = torch.full((1, 3, 2, 2), 0.2), torch.full((1, 3, 2, 2), 0.8)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    out = blend_anomaly(normal, source, mask, 0.25)
    assert out[0, 0, 0, 0] == pytest.approx(0.25 * 0.2 + 0.75 * 0.8)
    assert torch.equal(out[0, :, 0, 1], normal[0, :, 0, 1])
    assert out[0, 0, 1, 0] == pytest.approx(0.25 * 0.5 * 0.2 + 0.75 * 0.5 * 0.8 + 0.5 * 0.2)


def test_synthesize_anomalies_on_the_foreground_and_by_eq_12():
    normals, fg = _images(4, seed=2), _left_half(4)
    images, masks = synthesize_anomalies(normals, fg, np.random.default_rng(5), TINY)
    assert images.shape == normals.shape and masks.shape == (4, 1, SIDE, SIDE) and masks.dtype == normals.dtype
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert bool((masks.flatten(1).sum(1) >= TINY.perlin_min_area).all())
    assert float((masks * (1 - fg)).sum()) == 0.0  # inside the foreground
    outside = (masks == 0).expand_as(images)
    assert torch.equal(images[outside], normals[outside])  # untouched outside M, exactly
    assert not torch.equal(images, normals)

    # replay sample 0's draws (mask, texture, β) and check Eq. 12 on one pixel of its mask
    rng = np.random.default_rng(5)
    pixels = (normals * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mask0 = perlin_mask((SIDE, SIDE), rng, threshold=0.5, foreground=fg[0, 0].numpy() > 0.5, min_area=16)
    texture0 = augment_texture(pixels[0], rng, shift=True)
    beta0 = rng.uniform(0.2, 0.8)
    assert np.array_equal(mask0, masks[0, 0].numpy() > 0.5)
    y, x = np.argwhere(mask0)[0]
    expected = beta0 * normals[0, :, y, x] + (1 - beta0) * torch.from_numpy(texture0[y, x]).float() / 255
    torch.testing.assert_close(images[0, :, y, x], expected, atol=1e-6, rtol=1e-6)


def test_synthesize_anomalies_is_deterministic_per_seed_and_handles_textures_and_tiny_foregrounds():
    normals = _images(3, seed=4)
    first = synthesize_anomalies(normals, None, np.random.default_rng(11), TINY)
    again = synthesize_anomalies(normals, None, np.random.default_rng(11), TINY)
    other = synthesize_anomalies(normals, None, np.random.default_rng(12), TINY)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert bool((first[1].flatten(1).amax(1) > 0).all())  # no foreground: the whole image is eligible

    tiny_fg = torch.zeros(3, 1, SIDE, SIDE)
    tiny_fg[0, 0, 0, :3] = 1.0  # 3 px < perlin_min_area: sample 0 can hold no mask and stays normal
    tiny_fg[1:] = 1.0
    images, masks = synthesize_anomalies(normals, tiny_fg, np.random.default_rng(0), TINY)
    assert float(masks[0].sum()) == 0.0 and torch.equal(images[0], normals[0])
    assert bool((masks[1:].flatten(1).amax(1) > 0).all())
    with pytest.raises(ValueError, match="foregrounds"):
        synthesize_anomalies(normals, tiny_fg[:2], np.random.default_rng(0), TINY)


# --- (d) predict -------------------------------------------------------------------------------


def test_predict_is_deterministic_batch_independent_and_restores_mode():
    torch.manual_seed(0)
    model = build_diffusionad(TINY)
    images = _images(3)
    first = predict(model, images, seed=0)
    assert model.training
    assert first.anomaly_map.shape == (3, 1, SIDE, SIDE) and first.pred_score.shape == (3,)
    assert first.reconstruction.shape == (3, 3, SIDE, SIDE) and not first.anomaly_map.requires_grad
    assert float(first.reconstruction.min()) >= 0.0 and float(first.reconstruction.max()) <= 1.0
    again = predict(model, images, seed=0)
    assert torch.equal(first.anomaly_map, again.anomaly_map) and torch.equal(first.pred_score, again.pred_score)
    assert not torch.equal(predict(model, images, seed=1).reconstruction, first.reconstruction)
    alone = predict(model, images[1:2], seed=0)  # same noise whatever the batch (eval-mode BN is per sample)
    torch.testing.assert_close(alone.anomaly_map, first.anomaly_map[1:2], atol=1e-5, rtol=1e-5)
    model.eval()
    predict(model, images[:1])
    assert not model.training


# --- (e) a tiny model learns ---------------------------------------------------------------------


def test_tiny_model_loss_decreases():
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"lr": 1e-3})
    model = build_diffusionad(cfg)
    optimizer = configure_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.2, 0.8, SIDE)
    pool = torch.stack([torch.stack([ramp[None, :].expand(SIDE, SIDE), ramp[:, None].expand(SIDE, SIDE)] * 2)[:3]] * 8)
    pool = (pool + 0.05 * torch.randn(pool.shape, generator=generator)).clamp(0, 1)
    losses, mask_losses = [], []
    for _ in range(30):
        made, made_masks = synthesize_anomalies(pool[:4], None, rng, cfg)
        images = torch.cat([pool[4:], made])
        masks = torch.cat([torch.zeros(4, 1, SIDE, SIDE), made_masks])
        anomalous = torch.cat([torch.zeros(4), (made_masks.flatten(1).amax(1) > 0).float()])
        out = model(images, masks, anomalous, *sample_training_noise(images.shape, generator, cfg))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        mask_losses.append(out.mask_loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert np.mean(mask_losses[-5:]) < 0.8 * np.mean(mask_losses[:5])  # the segmenter learns too


# --- (f) validation and the optimiser ----------------------------------------------------------------


@pytest.mark.parametrize(
    "update",
    [
        {"attention_levels": (2,)},  # two levels only
        {"attention_levels": (-1, 1)},  # the same level twice
        {"norm_num_groups": 3},
        {"attention_head_dim": 5},
        {"beta_start": 0.03},  # above beta_end
        {"tau": 1000},
        {"t_b_max": 200},  # below tau
        {"t_s": 500},  # above t_b
        {"t_b": 1000},
        {"beta_range": (0.9, 0.1)},
        {"perlin_scale_exponents": (3, 3)},
        {"unknown_field": 1},
    ],
)
def test_config_rejects(update):
    with pytest.raises(ValidationError):
        DiffusionADConfig(**(TINY.model_dump() | update))


def test_config_paper_preset_and_defaults():
    paper = DiffusionADConfig.paper()
    assert paper.block_out_channels == (128, 128, 256, 256, 512, 512) and paper.resolved_attention_levels == (3, 4, 5)
    assert paper.resolved_norm_groups == 32 and paper.block_out_channels[3] // paper.attention_head_dim == 4
    assert DiffusionADConfig(block_out_channels=(16, 32, 32)).resolved_norm_groups == 16
    default = DiffusionADConfig()
    assert (default.t_s, default.t_b, default.w, default.tau, default.t_b_stop) == (200, 400, 1.0, 300, 1000)
    assert (default.lr, default.seg_lr, default.top_k, default.focal_weight) == (1e-4, None, 50, 5.0)
    with pytest.raises(ValidationError):
        default.tau = 10  # frozen


def test_forward_rejects_bad_inputs():
    model = build_diffusionad(TINY)
    images = torch.rand(2, 3, 30, 30)  # not a multiple of 4
    noise = sample_training_noise(images.shape, None, TINY)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(images, torch.zeros(2, 1, 30, 30), torch.zeros(2), *noise)
    images = torch.rand(2, 3, SIDE, SIDE)
    noise = sample_training_noise(images.shape, None, TINY)
    with pytest.raises(ValueError, match="masks"):
        model(images, torch.zeros(2, 1, 16, 16), torch.zeros(2), *noise)
    with pytest.raises(ValueError, match="anomalous"):
        model(images, torch.zeros(2, 1, SIDE, SIDE), torch.zeros(3), *noise)
    with pytest.raises(ValueError, match="t_s and t_b"):
        model(images, torch.zeros(2, 1, SIDE, SIDE), torch.zeros(2), noise[0], noise[1], noise[2], noise[3] + 1000)


def test_configure_optimizer_learning_rates_and_wrappers():
    model = build_diffusionad(TINY)
    single = configure_optimizer(model, TINY)
    assert len(single.param_groups) == 1 and single.param_groups[0]["lr"] == 1e-4
    n_params = sum(1 for _ in model.parameters())
    assert len(single.param_groups[0]["params"]) == n_params

    class Wrapper(nn.Module):  # DDP / DeepSpeed keep the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    split = configure_optimizer(Wrapper(model), TINY.model_copy(update={"seg_lr": 1e-5}))
    assert [g["lr"] for g in split.param_groups] == [1e-4, 1e-5]
    assert len(split.param_groups[1]["params"]) == sum(1 for _ in model.segmenter.parameters())
    with pytest.raises(TypeError):
        configure_optimizer(nn.Linear(2, 2), TINY)
