"""``x0_clamp`` for the diffusion generators: the fit records its training latents' range, sampling clamps to it.

Guidance at the quality tier's scales drives the x0 prediction past every latent the VAE produced, which decodes to
saturated colours (``diffusion.latent_range``). A fit writes the per-channel range of its training images' latents
into ``generator.json``; a generator with ``x0_clamp`` on clamps each sampling step's x0 prediction to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field

from defectsynth.diffusion.latent_range import LatentRange
from defectsynth.generators.training_pairs import to_model_range

if TYPE_CHECKING:
    from defectsynth.diffusion.model import DiffusionModel

LATENT_RANGE_FIELD = "latent_range"
ENCODE_CHUNK = 16  # images per VAE call: bounded memory at Stable Diffusion sizes


def x0_clamp_field() -> Any:
    """The ``x0_clamp`` setting of a diffusion generator: off by default (no paper clamps)."""
    return Field(False, description="clamp each step's x0 to the latent range of the fit's training images (ours)")


def training_latent_range(model: DiffusionModel, images: Sequence[np.ndarray]) -> LatentRange:
    """The per-channel range of the posterior-mean latents of ``images`` (uint8 H x W x 3)."""
    if not images:
        msg = "no training images to take a latent range from"
        raise ValueError(msg)
    with torch.no_grad():
        chunks = [
            model.encode_images(to_model_range(images[start : start + ENCODE_CHUNK]))
            for start in range(0, len(images), ENCODE_CHUNK)
        ]
    return LatentRange.of(torch.cat(chunks))


def read_latent_range(manifest: dict[str, Any], artifacts: Path, *, required: bool) -> LatentRange | None:
    """The range a fit recorded, or None; ``required`` (``x0_clamp`` on) without one raises, naming the artifacts."""
    if LATENT_RANGE_FIELD in manifest:
        return LatentRange.from_json(manifest[LATENT_RANGE_FIELD])
    if required:
        msg = (
            f"{artifacts}: x0_clamp needs the fit's {LATENT_RANGE_FIELD}, which these artifacts (fitted before it) lack"
        )
        raise ValueError(msg)
    return None
