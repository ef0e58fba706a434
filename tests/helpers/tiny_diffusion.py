"""Tiny seeded diffusion models for tests: random weights, built in well under a second."""

from __future__ import annotations

import torch

from defectsynth.diffusion.factory import TinyModelSettings, build_tiny
from defectsynth.diffusion.model import DiffusionModel

TEST_SIZES = TinyModelSettings(
    vae_channels=(16, 32),
    unet_channels=(32, 32, 32),
    norm_groups=8,
    text_width=32,
    text_layers=1,
    text_heads=2,
    attention_heads=2,
    max_prompt_length=16,
)

# Config overrides that make ``jobs.pretrain`` train a base about as small as TEST_SIZES for a few steps (seconds).
TINY_BASE_OVERRIDES = [
    "diffusion.tiny.vae_channels=[16,32]",
    "diffusion.tiny.unet_channels=[32,32]",
    "diffusion.tiny.norm_groups=8",
    "diffusion.tiny.text_width=32",
    "diffusion.tiny.text_layers=1",
    "diffusion.tiny.text_heads=2",
    "diffusion.tiny.attention_heads=2",
    "diffusion.tiny.max_prompt_length=16",
    "diffusion.tiny.batch_size=2",
    "diffusion.tiny.vae_steps=3",
    "diffusion.tiny.unet_steps=3",
    "pretrain.checkpoint_every=2",
]


def tiny_model(
    *,
    resolution: int = 32,
    seed: int = 0,
    words: tuple[str, ...] = ("wood",),
    prompt_length: int = TEST_SIZES.max_prompt_length,
) -> DiffusionModel:
    """A tiny model (latents 4×(resolution/2)²) with random weights, in float32 on the CPU.

    The VAE's scaling factor is 1 and its weights are untrained, so decoded images are noise: tests
    check mechanics (shapes, invariances, identities), not image quality. ``prompt_length`` is the text
    encoder's position count (16 fits "a photo of wood" with six placeholder tokens, not much more).
    """
    torch.set_num_threads(1)
    sizes = TEST_SIZES.model_copy(update={"max_prompt_length": prompt_length})
    return build_tiny(sizes, resolution=resolution, words=words, seed=seed)
