"""CADiff's SAIM (Eqs. 9-10), its fusion of every ControlNet residual, and the noise predictor, on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel

from defectsynth.diffusion.controlnet import ControlNetPredictor, mask_image, new_controlnet
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.sampling import denoise, generators_from_seeds, initial_noise, unet_output
from defectsynth.generators.cadiff.saim import SAIM, RMSNorm, SAIMFusion, SAIMPredictor
from helpers.tiny_diffusion import tiny_model

LATENT = (4, 16, 16)
SIDE = 32


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return tiny_model(resolution=SIDE)


@pytest.fixture(scope="module")
def prompts(model: DiffusionModel) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"crack": model.encode_prompt(["a crack on wood"]), "empty": model.encode_prompt([""])}


def masks(batch: int) -> torch.Tensor:
    """(batch, 1, SIDE, SIDE) boxes, one place per sample."""
    out = torch.zeros(batch, 1, SIDE, SIDE)
    for i in range(batch):
        out[i, :, 4 + 6 * i : 16 + 6 * i, 6 : 20 + 2 * i] = 1
    return out


def nudge(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """``module`` with seeded noise added to every parameter (so zero projections and convolutions act)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=gen) * std)
    return module


def trained_controlnet(model: DiffusionModel) -> ControlNetModel:
    """A fresh ControlNet whose zero output convolutions are nudged, so its residuals are not zero."""
    controlnet = new_controlnet(model)
    nudge(controlnet.controlnet_down_blocks, seed=1)
    nudge(controlnet.controlnet_mid_block, seed=2)
    return controlnet


def with_controlnet(model: DiffusionModel, controlnet: ControlNetModel) -> DiffusionModel:
    return dataclasses.replace(model, parts={"controlnet": controlnet})


def step_inputs(model: DiffusionModel, prompts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    latents = initial_noise(LATENT, generators_from_seeds([1, 2]))
    return latents, torch.cat([prompts["empty"], prompts["crack"]])


class Add(torch.nn.Module):
    """Plain ControlNet's fusion, y + y_c, in a SAIM's place."""

    def forward(self, y: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        return y + y_c


# --- SAIM ----------------------------------------------------------------------------------------------------


def test_rms_norm_gives_each_pixel_unit_rms_over_channels() -> None:
    x = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    norm = RMSNorm(8)
    out = norm(x)
    torch.testing.assert_close(out.square().mean(dim=1), torch.ones(2, 3, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm(3 * x), out, atol=1e-5, rtol=0)
    assert norm(x.half()).dtype == torch.float16


def test_a_fresh_saim_returns_y_and_a_trained_one_listens_to_y_c() -> None:
    gen = torch.Generator().manual_seed(0)
    y, y_c = torch.randn(2, 8, 5, 6, generator=gen), torch.randn(2, 8, 5, 6, generator=gen)
    torch.manual_seed(0)
    saim = SAIM(8, heads=2)
    out = saim(y, y_c)
    assert out.shape == y.shape and torch.equal(out, y)  # the zero-initialised projection adds exactly nothing

    nudge(saim.proj)
    out = saim(y, y_c)
    assert out.shape == y.shape and not torch.allclose(out, y, atol=1e-3)
    assert not torch.allclose(saim(y, 2 * y_c.flip(0)), out, atol=1e-3)  # depends on y_c
    # keys and values both come from y_c: shuffling its pixels changes nothing (no positions in the attention)
    shuffled = y_c.flatten(2)[..., torch.randperm(30, generator=gen)].view_as(y_c)
    torch.testing.assert_close(saim(y, shuffled), out, atol=1e-5, rtol=0)
    torch.testing.assert_close(saim(y[1:], y_c[1:]), out[1:], atol=1e-6, rtol=0)  # per sample


def test_heads_must_divide_channels_and_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="heads 3 must divide channels 8"):
        SAIM(8, heads=3)
    with pytest.raises(ValueError, match=r"y \(1, 8, 4, 4\) and y_c \(1, 8, 2, 2\)"):
        SAIM(8, heads=2)(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2))


# --- fusion and predictor ------------------------------------------------------------------------------------


def test_the_fusion_has_one_saim_per_controlnet_residual(model, prompts) -> None:
    latents, context = step_inputs(model, prompts)
    with torch.no_grad():
        down, mid = new_controlnet(model)(
            latents, 10, encoder_hidden_states=context, controlnet_cond=mask_image(masks(2)), return_dict=False
        )
    fusion = SAIMFusion.for_model(model)
    assert fusion.widths == tuple(residual.shape[1] for residual in down)
    assert fusion.mid.channels == mid.shape[1] and len(fusion.saims()) == len(down) + 1
    assert all(saim.heads == 4 for saim in fusion.saims())
    fused = fusion.fuse([*down, mid], [*down, mid])
    assert [f.shape for f in fused] == [r.shape for r in (*down, mid)]
    with pytest.raises(ValueError, match="2 features and 1 residuals"):
        fusion.fuse(down[:2], down[:1])


def test_a_fresh_saim_predictor_is_the_plain_unet_bit_for_bit(model, prompts) -> None:
    net = with_controlnet(model, new_controlnet(model))
    predictor = SAIMPredictor(image=mask_image(masks(2)), fusion=SAIMFusion.for_model(model))
    latents, context = step_inputs(model, prompts)
    with torch.no_grad():
        assert torch.equal(predictor(net, latents, 10, context), unet_output(model, latents, 10, context))
    assert not model.unet.conv_in._forward_hooks and not model.unet.mid_block._forward_hooks  # hooks removed


def test_addition_in_place_of_saim_is_the_plain_controlnet_bit_for_bit(model, prompts) -> None:
    # the hooks fuse exactly the features diffusers adds a ControlNet's residuals to, and nothing else
    net = with_controlnet(model, trained_controlnet(model))
    fusion = SAIMFusion.for_model(model)
    fusion.down = torch.nn.ModuleList(Add() for _ in fusion.down)
    fusion.mid = Add()
    image = mask_image(masks(2))
    latents, context = step_inputs(model, prompts)
    with torch.no_grad():
        ours = SAIMPredictor(image=image, fusion=fusion, scale=0.7)(net, latents, 10, context)
        plain = ControlNetPredictor(image=image, scale=0.7)(net, latents, 10, context)
    assert torch.equal(ours, plain)
    assert not torch.allclose(ours, unet_output(model, latents, 10, context), atol=1e-3)


def test_trained_saims_steer_and_gradients_reach_them_and_the_controlnet(model, prompts) -> None:
    controlnet = trained_controlnet(model).requires_grad_(True)
    net = with_controlnet(model, controlnet)
    fusion = SAIMFusion.for_model(model)
    for index, saim in enumerate(fusion.saims()):
        nudge(saim.proj, seed=10 + index)
    latents, context = step_inputs(model, prompts)
    out = SAIMPredictor(image=mask_image(masks(2)), fusion=fusion)(net, latents, 10, context)
    with torch.no_grad():
        assert not torch.allclose(out, unet_output(model, latents, 10, context), atol=1e-3)
    out.square().mean().backward()
    for saim in fusion.saims():
        for name, parameter in saim.named_parameters():
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        assert bool(conv.weight.grad.abs().sum() > 0)
    assert bool(controlnet.conv_in.weight.grad.abs().sum() > 0)
    assert all(p.grad is None for p in model.unet.parameters())  # the locked U-Net stays frozen


def test_a_fusion_for_another_controlnet_is_refused(model, prompts) -> None:
    net = with_controlnet(model, new_controlnet(model))
    fusion = SAIMFusion(SAIMFusion.for_model(model).widths[:-1], 32)
    latents, context = step_inputs(model, prompts)
    with pytest.raises(ValueError, match=r"gives \d+ down residuals, the fusion has \d+ SAIMs"), torch.no_grad():
        SAIMPredictor(image=mask_image(masks(2)), fusion=fusion)(net, latents, 10, context)


def guided(model, prompts, predictor=unet_output, seeds=(5, 6)):
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(2)
    with torch.no_grad():
        latents = initial_noise(LATENT, generators_from_seeds(seeds))
        return denoise(
            model,
            latents,
            prompts["crack"],
            uncond=prompts["empty"],
            guidance_scale=3.0,
            sampler=sampler,
            predictor=predictor,
        )


def test_the_predictor_runs_under_denoise_with_guidance(model, prompts) -> None:
    image = mask_image(masks(2))  # tiled to the doubled batch [uncond; cond]
    plain = guided(model, prompts)
    fresh = SAIMPredictor(image=image, fusion=SAIMFusion.for_model(model))
    assert torch.equal(guided(with_controlnet(model, new_controlnet(model)), prompts, fresh), plain)

    fusion = SAIMFusion.for_model(model)
    for index, saim in enumerate(fusion.saims()):
        nudge(saim.proj, seed=10 + index)
    net = with_controlnet(model, trained_controlnet(model))
    steered = guided(net, prompts, SAIMPredictor(image=image, fusion=fusion))
    assert torch.isfinite(steered).all() and not torch.allclose(steered, plain, atol=1e-3)
    alone = guided(net, prompts, SAIMPredictor(image=image[1:], fusion=fusion), seeds=(6,))
    torch.testing.assert_close(alone, steered[1:], atol=1e-5 * float(steered.abs().max()), rtol=0)
