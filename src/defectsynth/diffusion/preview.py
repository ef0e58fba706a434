"""Text-to-image sampling of a base model: previews in MLflow and the registered base's ``predict``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.sampling import denoise, generators_from_seeds, initial_noise


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1], (B, 3, H, W), to a list of H×W×3 uint8 arrays."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def sample_prompts(
    model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25, guidance: float = 3.0
) -> list[np.ndarray]:
    """One image per prompt: DDIM from each seed's noise with classifier-free guidance against the empty prompt."""
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(steps)
    generators = generators_from_seeds(seeds)
    latents = initial_noise(model.latent_shape, generators, device=model.device)
    latents = denoise(
        model,
        latents,
        model.encode_prompt(list(prompts)),
        sampler=sampler,
        uncond=model.encode_prompt([""]),
        guidance_scale=guidance,
    )
    return to_uint8(model.decode_latents(latents))
