"""Extra model parts (a ControlNet saved in diffusers' layout) and pluggable noise predictors, on the tiny model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline

from defectsynth.diffusion.controlnet import ControlNetPredictor, mask_image, new_controlnet, tile_batch
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.inversion import masked_ddim_invert, masked_inversion_sample
from defectsynth.diffusion.model import SUBFOLDERS, DiffusionModel
from defectsynth.diffusion.sampling import (
    denoise,
    generators_from_seeds,
    initial_noise,
    rescale_guided,
    unet_output,
)
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


def make_sampler(model: DiffusionModel, steps: int) -> DDIMSampler:
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(steps)
    return sampler


def perturbed(controlnet: ControlNetModel, seed: int = 0, std: float = 0.05) -> ControlNetModel:
    """``controlnet`` with seeded noise added to every weight, so its zero output convolutions act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=gen) * std)
    return controlnet


def with_controlnet(model: DiffusionModel, controlnet: ControlNetModel) -> DiffusionModel:
    """The same base parts with ``controlnet`` as an extra part (the module's model keeps none)."""
    return dataclasses.replace(model, parts={"controlnet": controlnet})


def masks(batch: int) -> torch.Tensor:
    """(batch, 1, SIDE, SIDE) boxes, one place per sample."""
    out = torch.zeros(batch, 1, SIDE, SIDE)
    for i in range(batch):
        out[i, :, 4 + 6 * i : 16 + 6 * i, 6 : 20 + 2 * i] = 1
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- parts: saving and loading ------------------------------------------------------------------------------


def test_a_controlnet_round_trips_in_diffusers_layout(tmp_path: Path, model: DiffusionModel) -> None:
    controlnet = perturbed(new_controlnet(model))
    saved = with_controlnet(model, controlnet).save(tmp_path / "model")
    assert {p.name for p in saved.iterdir()} == {"model_index.json", "controlnet", *SUBFOLDERS}
    assert {p.name for p in (saved / "controlnet").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert "controlnet" not in json.loads((saved / "model_index.json").read_text())

    by_diffusers = ControlNetModel.from_pretrained(saved, subfolder="controlnet")
    loaded = DiffusionModel.load(saved)
    assert set(loaded.parts) == {"controlnet"} and isinstance(loaded.parts["controlnet"], ControlNetModel)
    expected = controlnet.state_dict()
    for state in (by_diffusers.state_dict(), loaded.parts["controlnet"].state_dict()):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[key], expected[key]) for key in expected)
    assert not any(p.requires_grad for p in loaded.parts["controlnet"].parameters())  # frozen, like the others

    pipeline = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipeline, StableDiffusionPipeline)  # still a Stable Diffusion directory: the extra is ignored


def test_a_model_without_parts_saves_and_loads_as_before(tmp_path: Path, model: DiffusionModel) -> None:
    ours = model.save(tmp_path / "ours")
    model.pipeline().save_pretrained(str(tmp_path / "pipeline"), safe_serialization=True)  # what save did before
    assert files(ours) == files(tmp_path / "pipeline")
    loaded = DiffusionModel.load(ours)
    assert loaded.parts == {}
    assert loaded.networks() == [loaded.vae, loaded.unet, loaded.text_encoder]


def test_saving_over_an_earlier_save_drops_a_part_the_model_lacks(tmp_path: Path, model: DiffusionModel) -> None:
    directory = with_controlnet(model, new_controlnet(model)).save(tmp_path / "model")
    (directory / "notes.txt").write_text("kept")
    model.save(directory)
    assert not (directory / "controlnet").exists() and (directory / "notes.txt").read_text() == "kept"
    assert DiffusionModel.load(directory).parts == {}
    (directory / "notes.txt").unlink()
    assert files(directory) == files(model.save(tmp_path / "fresh"))  # as if saved into an empty directory


def test_to_and_eval_move_the_extra_parts() -> None:
    model = tiny_model(resolution=SIDE)
    controlnet = new_controlnet(model).train()
    model = with_controlnet(model, controlnet)
    model.to("cpu", torch.float64).eval()
    assert controlnet.dtype == torch.float64 and not controlnet.training
    assert model.unet.dtype == torch.float64


def test_part_names_must_not_clash_and_must_load_back(tmp_path: Path, model: DiffusionModel) -> None:
    with pytest.raises(ValueError, match="unet"):
        dataclasses.replace(model, parts={"unet": new_controlnet(model)})
    with pytest.raises(ValueError, match=r"\['adapter'\] would not load back"):
        dataclasses.replace(model, parts={"adapter": new_controlnet(model)}).save(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(KeyError, match="no 'controlnet' part"):
        model.part("controlnet")


# --- predictors --------------------------------------------------------------------------------------------


def reference_denoise(model, latents, cond, uncond, guidance_scale, guidance_rescale, sampler):
    """The loop as ``denoise`` ran it before predictors: ``unet_output`` on [uncond; cond], then one DDIM step."""
    context = torch.cat([uncond.expand_as(cond), cond]) if guidance_scale != 1.0 else cond
    for index in range(len(sampler.timesteps)):
        timestep = int(sampler.timesteps[index])
        model_input = torch.cat([latents, latents]) if guidance_scale != 1.0 else latents
        output = unet_output(model, sampler.scale_model_input(model_input, timestep), timestep, context)
        if guidance_scale != 1.0:
            output_uncond, output_cond = output.chunk(2)
            output = output_uncond + guidance_scale * (output_cond - output_uncond)
            output = rescale_guided(output, output_cond, guidance_rescale)
        latents = sampler.step(output, timestep, latents).prev_sample
    return latents


@pytest.mark.parametrize(("guidance_scale", "guidance_rescale"), [(1.0, 0.0), (4.0, 0.0), (4.0, 0.7)])
def test_the_default_predictor_is_the_plain_unet_bit_for_bit(model, prompts, guidance_scale, guidance_rescale):
    sampler = make_sampler(model, 3)
    cond = prompts["crack"].expand(2, -1, -1)
    with torch.no_grad():
        latents = initial_noise(LATENT, generators_from_seeds([3, 4]))
        ours = denoise(
            model,
            latents,
            cond,
            uncond=prompts["empty"],
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            sampler=sampler,
        )
        reference = reference_denoise(model, latents, cond, prompts["empty"], guidance_scale, guidance_rescale, sampler)
    assert torch.equal(ours, reference)


def guided(model, prompts, predictor=unet_output, seeds=(5, 6)):
    sampler = make_sampler(model, 3)
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


def test_a_zero_initialised_controlnet_changes_nothing(model, prompts) -> None:
    with_zero = with_controlnet(model, new_controlnet(model))  # from_unet: its output convolutions are zero
    predictor = ControlNetPredictor(image=mask_image(masks(2)))
    assert torch.equal(guided(with_zero, prompts, predictor), guided(model, prompts))


def test_a_trained_controlnet_steers_and_scale_zero_switches_it_off(model, prompts) -> None:
    with_trained = with_controlnet(model, perturbed(new_controlnet(model)))
    image = mask_image(masks(2))
    plain = guided(model, prompts)
    steered = guided(with_trained, prompts, ControlNetPredictor(image=image))
    assert not torch.allclose(steered, plain, atol=1e-3)
    assert torch.equal(guided(with_trained, prompts, ControlNetPredictor(image=image, scale=0.0)), plain)
    other = guided(with_trained, prompts, ControlNetPredictor(image=image.flip(0)))
    assert not torch.allclose(other, steered, atol=1e-3)  # the image matters, per sample


def test_the_conditioning_image_follows_its_sample_through_the_doubled_batch(model, prompts) -> None:
    with_trained = with_controlnet(model, perturbed(new_controlnet(model)))
    image = mask_image(masks(2))
    batch = guided(with_trained, prompts, ControlNetPredictor(image=image))
    alone = guided(with_trained, prompts, ControlNetPredictor(image=image[1:]), seeds=(6,))
    torch.testing.assert_close(alone, batch[1:], atol=1e-5 * float(batch.abs().max()), rtol=0)


def test_the_masked_inversion_takes_a_predictor(model, prompts) -> None:
    sampler = make_sampler(model, 3)
    mask = torch.zeros(1, 1, *LATENT[1:])
    mask[..., 4:10, 5:12] = 1
    z0 = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(2))
    zero = ControlNetPredictor(image=mask_image(masks(1)))
    with_zero = with_controlnet(model, new_controlnet(model))
    with torch.no_grad():
        runs = []
        for net, predictor in ((model, unet_output), (with_zero, zero)):
            inverted = masked_ddim_invert(net, z0, mask, prompts["empty"], sampler=sampler, predictor=predictor)
            runs.append(
                masked_inversion_sample(
                    net,
                    inverted[-1],
                    mask,
                    prompts["crack"],
                    prompts["empty"],
                    sampler=sampler,
                    noise=z0,
                    predictor=predictor,
                )
            )
    assert torch.equal(runs[0], runs[1])


def test_the_conditioning_image_is_moved_once_per_batch(model, prompts) -> None:
    controlnet = new_controlnet(model)
    seen: list[torch.Tensor] = []
    hook = controlnet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["controlnet_cond"]), with_kwargs=True
    )
    predictor = ControlNetPredictor(image=mask_image(masks(2)))
    net = with_controlnet(model, controlnet)
    context = prompts["crack"].expand(4, -1, -1)
    latents = initial_noise(LATENT, generators_from_seeds([1, 2, 3, 4]))
    with torch.no_grad():
        first, again = predictor(net, latents, 10, context), predictor(net, latents, 10, context)
        predictor(net, latents[:2], 10, context[:2])
    hook.remove()
    assert seen[0] is seen[1] and torch.equal(first, again)  # the same tensor, not a fresh copy each step
    assert seen[2] is not seen[0] and seen[2].shape[0] == 2
    assert torch.equal(seen[0], tile_batch(mask_image(masks(2)), 4, "image"))


def test_a_missing_part_is_named(model, prompts) -> None:
    with pytest.raises(KeyError, match="no 'controlnet' part"):
        guided(model, prompts, ControlNetPredictor(image=mask_image(masks(1))))


def test_tile_batch_and_mask_image_check_shapes() -> None:
    image = torch.arange(2.0).view(2, 1, 1, 1)
    assert tile_batch(image, 4, "image").flatten().tolist() == [0.0, 1.0, 0.0, 1.0]  # [uncond; cond] order
    assert tile_batch(image[:1], 3, "image").shape[0] == 3
    with pytest.raises(ValueError, match="image has batch 2"):
        tile_batch(image, 3, "image")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        mask_image(torch.zeros(1, 3, 4, 4))
    assert mask_image(torch.ones(2, 1, 4, 4)).shape == (2, 3, 4, 4)
