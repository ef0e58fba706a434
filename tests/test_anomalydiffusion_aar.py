"""AnomalyDiffusion's AAR (paper 000, Eq. 7-8): both weight-map forms, hand cases, the per-step updater."""

import math

import pytest
import torch

from defectsynth.diffusion.attention import AttentionControl, Select, SpatialReweight, installed
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.sampling import BlendTarget, denoise, generators_from_seeds, initial_noise
from defectsynth.generators.anomalydiffusion.aar import (
    AARUpdater,
    binary_mask,
    code_dilation_schedule,
    install_aar,
    latent_weight_map,
    paper_weight_map,
)
from helpers.tiny_diffusion import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


def masks(batch, side, generator):
    """Several masks per call: a random blob, a single pixel, the full frame, a rectangle (cycled over the batch)."""
    kinds = []
    blob = torch.rand(1, 1, side // 4, side // 4, generator=generator) > 0.5
    blob = torch.nn.functional.interpolate(blob.float(), size=(side, side), mode="nearest")
    blob[..., 0, 0] = 1.0  # never empty
    kinds.append(blob)
    pixel = torch.zeros(1, 1, side, side)
    pixel[..., side // 3, side // 2] = 1.0
    kinds.append(pixel)
    kinds.append(torch.ones(1, 1, side, side))
    rect = torch.zeros(1, 1, side, side)
    rect[..., 2 : side // 2, 1 : side - 3] = 1.0
    kinds.append(rect)
    return [torch.cat([kinds[(i + shift) % len(kinds)] for i in range(batch)]) for shift in range(len(kinds))]


def assert_mean_one_inside(weights, mask):
    inside = mask.bool().expand_as(weights)
    for w, m in zip(weights, inside, strict=True):
        assert w[m].mean().item() == pytest.approx(1.0, abs=ATOL)
        assert torch.all(w[~m] == 0)
        assert torch.all(w[m] >= 0)


# -- the paper form (Eq. 7 as printed) --------------------------------------------------------------------


def test_paper_form_averages_one_inside_and_zero_outside():
    generator = torch.Generator().manual_seed(0)
    for mask in masks(3, 16, generator):
        pred = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
        normal = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
        weights = paper_weight_map(pred, normal, mask)
        assert weights.shape == (3, 1, 16, 16) and weights.dtype == torch.float32
        assert torch.isfinite(weights).all()
        assert_mean_one_inside(weights, mask)


def test_paper_form_hand_computed_2x2():
    # distances (summed over channels) 1, 0.5 / 0.25, outside; f = 1/x -> 1, 2, 4; area 3
    normal = torch.zeros(1, 3, 2, 2)
    pred = torch.zeros(1, 3, 2, 2)
    pred[0, 0] = torch.tensor([[1.0, 0.5], [0.25, 7.0]]).sqrt()
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    weights = paper_weight_map(pred, normal, mask)
    exps = [math.exp(1.0), math.exp(2.0), math.exp(4.0)]
    expected = torch.tensor([[[[3 * exps[0], 3 * exps[1]], [3 * exps[2], 0.0]]]]) / sum(exps)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-6)


def test_paper_form_favours_pixels_still_normal_and_zero_distance_gets_zero():
    generator = torch.Generator().manual_seed(1)
    normal = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    pred = normal + 0.5 + torch.rand(1, 3, 8, 8, generator=generator)  # far from normal everywhere
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:7, 1:7] = 1.0
    pred[..., 3, 4] = normal[..., 3, 4] + 0.05  # still almost normal: the largest weight
    pred[..., 5, 5] = normal[..., 5, 5]  # exactly normal: f(0) = −∞, weight 0 (documented rule)
    pred[..., 0, 0] = normal[..., 0, 0] + 1e-3  # outside the mask: weight 0 however close
    weights = paper_weight_map(pred, normal, mask)
    assert weights[0, 0].argmax().item() == 3 * 8 + 4
    assert weights[0, 0, 5, 5] == 0 and weights[0, 0, 0, 0] == 0
    assert_mean_one_inside(weights, mask)


def test_paper_form_all_zero_distance_inside_is_uniform():
    normal = torch.rand(2, 3, 4, 4)
    pred = normal.clone()
    pred[1, :, 0, 0] += 1.0  # sample 1: one pixel differs, but it is outside the mask
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:, 1:] = 1.0
    weights = paper_weight_map(pred, normal, mask)
    torch.testing.assert_close(weights, mask.expand(2, -1, -1, -1))


def test_paper_form_is_stable_for_tiny_distances():
    normal = torch.zeros(1, 3, 4, 4)
    pred = torch.full((1, 3, 4, 4), 1e-20)
    pred[..., 0, 0] = 1e-22
    weights = paper_weight_map(pred, normal, torch.ones(1, 1, 4, 4))
    assert torch.isfinite(weights).all()
    assert weights[0, 0, 0, 0].item() == pytest.approx(16.0)


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="non-empty mask"):
        paper_weight_map(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))


# -- the latent form (the authors' code) ------------------------------------------------------------------


def test_latent_form_averages_one_inside_and_zero_outside():
    generator = torch.Generator().manual_seed(2)
    for mask in masks(3, 32, generator):  # image-resolution masks, brought to the 16×16 latent
        pred = torch.randn(3, 4, 16, 16, generator=generator)
        normal = torch.randn(1, 4, 16, 16, generator=generator)
        weights = latent_weight_map(pred, normal, mask)
        assert weights.shape == (3, 1, 16, 16) and weights.dtype == torch.float32
        assert_mean_one_inside(weights, binary_mask(mask, (16, 16)))


def test_latent_form_matches_the_code_formula_by_hand():
    # mean-over-channel distances 0.5, 0.25 / 0.125, outside -> 1/d = 2, 4, 8, sum 14, area 3
    normal = torch.zeros(1, 2, 2, 2)
    pred = torch.tensor([[[0.5, 0.25], [0.125, 3.0]]]).sqrt().expand(2, 2, 2).unsqueeze(0)
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    normalised = latent_weight_map(pred, normal, mask)
    torch.testing.assert_close(normalised, torch.tensor([[[[6 / 14, 12 / 14], [24 / 14, 0.0]]]]))
    clamped = latent_weight_map(pred, normal, mask, code_clamp=True)  # [1, 1.5], 1 outside
    torch.testing.assert_close(clamped, torch.tensor([[[[1.0, 1.0], [1.5, 1.0]]]]))


def test_latent_form_zero_distance_rules():
    # in-mask distances 0, 0.5 / 0.25, 0.125. Normalised: 0 gets weight 0, the rest 4·(2, 4, 8)/14.
    normal = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[[[0.0, 0.5], [0.25, 0.125]]]]).sqrt()
    mask = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(
        latent_weight_map(pred, normal, mask), torch.tensor([[[[0.0, 8 / 14], [16 / 14, 32 / 14]]]])
    )
    # The code: d = 0 -> 1/(−1) = −1 stays in the sum (13): 4·(−1, 2, 4, 8)/13, then clamp to [1, 1.5].
    expected = torch.tensor([[[[-4 / 13, 8 / 13], [16 / 13, 32 / 13]]]]).clamp(1.0, 1.5)
    torch.testing.assert_close(latent_weight_map(pred, normal, mask, code_clamp=True), expected)
    # every in-mask distance 0: uniform 1 inside (0 outside), the code: all ones
    half = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    same = torch.zeros(1, 1, 2, 2)
    torch.testing.assert_close(latent_weight_map(same, normal, half), half)
    torch.testing.assert_close(latent_weight_map(same, normal, half, code_clamp=True), torch.ones(1, 1, 2, 2))


def test_latent_form_dilation_and_code_schedule():
    schedule = code_dilation_schedule(50)
    assert (schedule(981), schedule(1), code_dilation_schedule(25)(961), code_dilation_schedule(25)(1)) == (17, 1, 8, 0)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4, 4] = 1.0
    pred, normal = torch.rand(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    weights = latent_weight_map(pred, normal, mask, dilation_radius=1)
    support = torch.zeros(1, 1, 8, 8)
    support[..., 3:6, 3:6] = 1.0
    assert_mean_one_inside(weights, support)


def test_binary_mask_keeps_small_defects_at_latent_resolution():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 5, 5] = 1.0  # a quarter of one 2×2 cell: kept as the touched cell
    mask[1, :, 4:8, 4:8] = 1.0
    small = binary_mask(mask, (8, 8))
    assert small[0].sum() == 1 and small[0, 0, 2, 2] == 1
    assert small[1].sum() == 4
    assert torch.equal(binary_mask(small, (16, 16))[1], mask[1])


# -- the per-step updater in a real sampling loop ---------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model(resolution=32)


def run_aar(model, form, seeds=(0, 1, 2), steps=4, **options):
    """Blended sampling with AAR on 3 samples; returns (final latents, blend target, maps set after each step)."""
    generators = generators_from_seeds(seeds)
    with torch.no_grad():
        normal_image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
        normal = model.encode_images(normal_image)
        cond = model.encode_prompt(["wood"])
    mask = torch.zeros(len(seeds), 1, 32, 32)
    mask[0, :, 4:20, 6:26] = 1.0
    mask[1, :, 10:14, 10:30] = 1.0
    mask[2, :, 16:, :16] = 1.0
    blend = BlendTarget.draw(normal.expand(len(seeds), -1, -1, -1), binary_mask(mask, (16, 16)), generators)
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(steps)
    control = AttentionControl()
    aar = install_aar(control, model=model, normal=normal, mask=mask, form=form, **options)
    maps = [control.reweights[0].weight_map.clone()]

    def on_step(index, timestep, latents, pred_x0):
        aar(index, timestep, latents, pred_x0)
        maps.append(control.reweights[0].weight_map.clone())

    latents = initial_noise(model.latent_shape, generators)
    with installed(model.unet, control), torch.no_grad():
        final = denoise(model, latents, cond, sampler=sampler, control=control, blend=blend, on_step=on_step)
    return final, blend, maps, mask


@pytest.mark.parametrize("form", ["paper", "latent"])
def test_updater_changes_the_map_every_step_and_keeps_the_background(model, form):
    final, blend, maps, mask = run_aar(model, form)
    assert len(maps) == 5
    side = 32 if form == "paper" else 16
    assert maps[0].shape == (3, 1, side, side)
    for before, after in zip(maps, maps[1:], strict=False):
        assert not torch.equal(before, after)
        assert_mean_one_inside(after, binary_mask(mask, (side, side)))
    outside = blend.mask.expand_as(final) == 0
    assert torch.equal(final[outside], blend.source[outside])  # exactly y_0 after the last step


def test_updater_is_deterministic_per_seed(model):
    first, _, maps_a, _ = run_aar(model, "paper")
    again, _, maps_b, _ = run_aar(model, "paper")
    other, _, _, _ = run_aar(model, "paper", seeds=(3, 4, 5))
    assert torch.equal(first, again)
    assert all(torch.equal(a, b) for a, b in zip(maps_a, maps_b, strict=True))
    assert not torch.equal(first, other)


def test_code_variant_in_the_loop(model):
    final, _, maps, _ = run_aar(
        model, "latent", steps=2, code_clamp=True, dilation=code_dilation_schedule(2), latent_source="latents"
    )
    assert torch.equal(maps[0], torch.ones_like(maps[0]))
    assert all(((m >= 1) & (m <= 1.5)).all() for m in maps)
    assert torch.isfinite(final).all()


def test_the_code_form_is_the_latent_form_clamped(model):
    code, _, code_maps, _ = run_aar(model, "code", steps=2)
    clamped, _, clamped_maps, _ = run_aar(model, "latent", steps=2, code_clamp=True)
    assert torch.equal(code, clamped)
    assert all(torch.equal(a, b) for a, b in zip(code_maps, clamped_maps, strict=True))
    assert all(((m >= 1) & (m <= 1.5)).all() for m in code_maps)


def test_install_aar_reweights_cross_attention_with_given_tokens(model):
    control = AttentionControl()
    mask = torch.ones(1, 1, 32, 32)
    normal = torch.zeros(1, *model.latent_shape)
    aar = install_aar(control, model=model, normal=normal, mask=mask, form="latent", tokens=[1, 2])
    (reweight,) = control.reweights
    assert isinstance(reweight, SpatialReweight) and aar.target is reweight
    assert list(reweight.tokens) == [1, 2] and reweight.where == Select()
    torch.testing.assert_close(reweight.weight_map, torch.ones(1, 1, 16, 16))


def test_updater_rejects_bad_options(model):
    control, normal, mask = AttentionControl(), torch.zeros(1, *model.latent_shape), torch.ones(1, 1, 32, 32)
    with pytest.raises(ValueError, match="form"):
        AARUpdater(control, model=model, mask=mask, normal_latent=normal, form="image")
    with pytest.raises(ValueError, match="latent form"):
        AARUpdater(control, model=model, mask=mask, normal_latent=normal, form="paper", code_clamp=True)
    with pytest.raises(ValueError, match="normal"):
        AARUpdater(control, model=model, mask=mask, form="latent")
