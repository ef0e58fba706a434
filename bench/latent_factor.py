"""What a smaller VAE downsampling factor costs the tiny base: one training step, factor 4 against factor 2.

Builds the tiny base twice at ``--resolution`` (VAE widths 16-32-64: factor 4; 16-32: factor 2) and times a
VAE step and a U-Net step (batch 8, one thread) for each, interleaved, best of ``--repeats``. The last line is
one JSON object with the per-step seconds and ``unet_step_ratio`` / ``vae_step_ratio`` (factor 2 over 4).

Usage:
    .venv/bin/python bench/latent_factor.py [--resolution 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss, vae_loss
from defectsynth.diffusion.settings import TinyModelSettings

FACTORS = {4: (16, 32, 64), 2: (16, 32)}


def timed_step(part: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> float:
    """Seconds of one AdamW step of ``part`` on ``loss_fn``'s loss."""
    part.requires_grad_(True)
    optimizer = torch.optim.AdamW(part.parameters(), lr=1e-4)
    started = time.perf_counter()
    loss = loss_fn()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    part.requires_grad_(False)
    return time.perf_counter() - started


def step_seconds(model: DiffusionModel, images: torch.Tensor) -> tuple[float, float]:
    """Seconds of one VAE and one U-Net training step on ``images``."""
    generator = torch.Generator().manual_seed(0)
    vae = timed_step(model.vae, lambda: vae_loss(model, images, generator, 1e-6))
    with torch.no_grad():
        latents = model.encode_images(images, generator)
        context = model.encode_prompt(["a photo of wood"] * len(images))
    unet = timed_step(model.unet, lambda: denoising_loss(model, latents, context, generator))
    return vae, unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {
        f: build_tiny(TinyModelSettings(vae_channels=c), resolution=args.resolution, words=["wood"])
        for f, c in FACTORS.items()
    }
    images = torch.rand(8, 3, args.resolution, args.resolution) * 2 - 1
    best = {f: [float("inf"), float("inf")] for f in FACTORS}
    for _ in range(args.repeats):
        for factor, model in models.items():
            vae, unet = step_seconds(model, images)
            best[factor] = [min(best[factor][0], vae), min(best[factor][1], unet)]
    result = {
        f"{kind}_step_s_factor{f}": round(best[f][i], 3) for f in FACTORS for i, kind in enumerate(("vae", "unet"))
    }
    result |= {
        "vae_step_ratio": round(best[2][0] / best[4][0], 2),
        "unet_step_ratio": round(best[2][1] / best[4][1], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
