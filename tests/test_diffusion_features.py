"""Feature taps on U-Net and VAE-decoder up-blocks: what is recorded, when, and that outputs do not change."""

from __future__ import annotations

import pytest
import torch

from defectsynth.diffusion.features import FeatureTaps
from helpers.tiny_diffusion import tiny_model


def run_steps(model, taps: FeatureTaps | None, steps: int = 3) -> torch.Tensor:
    latents = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    context = model.encode_prompt(["a photo of wood"] * 2)
    out = latents
    for index, timestep in enumerate((900, 500, 100)[:steps]):
        if taps is not None:
            taps.begin_step(index, timestep)
        out = model.unet(latents, timestep, encoder_hidden_states=context).sample
    return model.decode_latents(out)


def test_taps_record_chosen_blocks_at_chosen_steps_without_changing_outputs() -> None:
    model = tiny_model()
    plain = run_steps(model, None)
    taps = FeatureTaps(unet_blocks=(1, 2), vae_blocks=(0, 1), steps={1, 2})
    with taps.attached(model):
        tapped = run_steps(model, taps)
    torch.testing.assert_close(tapped, plain, rtol=0, atol=0)
    assert len(taps.unet_features(1)) == 2 and len(taps.unet_features(2)) == 2
    assert taps.unet_features(2)[0].shape[0] == 2
    side = model.latent_shape[-1]
    assert taps.unet_features(2)[0].shape[-1] == side  # the last up-block works at latent resolution
    assert len(taps.vae_features(0)) == 1 and taps.vae_features(1)[0].shape[-1] == model.resolution
    assert not taps.unet_features(1)[0].requires_grad


def test_detached_taps_record_nothing_more() -> None:
    model = tiny_model()
    taps = FeatureTaps(unet_blocks=(0,))
    with taps.attached(model):
        run_steps(model, taps, steps=1)
    run_steps(model, taps, steps=1)
    assert len(taps.unet_features(0)) == 1


def test_keep_grad_lets_a_loss_reach_the_unet() -> None:
    model = tiny_model()
    model.unet.requires_grad_(True)
    taps = FeatureTaps(unet_blocks=(2,), keep_grad=True)
    with taps.attached(model):
        run_steps(model, taps, steps=1)
    taps.unet_features(2)[0].mean().backward()
    assert model.unet.conv_in.weight.grad is not None and model.unet.conv_in.weight.grad.abs().sum() > 0


def test_a_missing_block_is_an_error() -> None:
    with pytest.raises(ValueError, match="up_blocks\\[7\\]"):
        FeatureTaps(unet_blocks=(7,)).attach(tiny_model())
