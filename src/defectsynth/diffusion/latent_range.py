"""The per-channel range of the latents a VAE gave a fit's training images, and x0 predictions clamped to it.

Classifier-free guidance at a high scale pushes a U-Net's x0 prediction far past any latent the VAE's encoder
ever produced (on the tiny base at 7.5, channel 0 reaches -16 where the training images span -4.8 to 4.9), and the
decoder turns such latents into saturated colours: cyan, black, rainbow mottles. DDIM's ``clip_sample`` clamps
x0 to one symmetric bound, which suits pixels; latents need a bound per channel, taken from the data. The ε
that a step uses is then recomputed from the clamped x0, as diffusers' DDIM does after its thresholding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentRange:
    """Per-channel bounds ``low`` ≤ ``high``, each (C,): where a clamped x0 prediction may lie."""

    low: torch.Tensor
    high: torch.Tensor

    def __post_init__(self) -> None:
        if self.low.shape != self.high.shape or self.low.dim() != 1:
            msg = f"low {tuple(self.low.shape)} and high {tuple(self.high.shape)} must both be (C,)"
            raise ValueError(msg)
        if bool((self.low > self.high).any()):
            msg = f"low {self.low.tolist()} exceeds high {self.high.tolist()} in some channel"
            raise ValueError(msg)

    @classmethod
    def of(cls, latents: torch.Tensor) -> LatentRange:
        """The smallest and largest value of each channel over a batch of latents (B, C, h, w)."""
        return cls(
            low=latents.amin(dim=(0, 2, 3)).detach().float().cpu(),
            high=latents.amax(dim=(0, 2, 3)).detach().float().cpu(),
        )

    def to_json(self) -> dict[str, list[float]]:
        """The bounds as plain lists (an artifact manifest's field)."""
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentRange:
        """The inverse of ``to_json``; a missing or malformed field raises ValueError naming it."""
        try:
            return cls(
                low=torch.tensor(data["low"], dtype=torch.float32), high=torch.tensor(data["high"], dtype=torch.float32)
            )
        except (KeyError, TypeError) as err:
            msg = f"latent range needs 'low' and 'high' lists of numbers, got {data!r}"
            raise ValueError(msg) from err

    def clamp(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` (B, C, h, w) with each channel clamped to its bounds."""
        if x0.shape[1] != self.low.numel():
            msg = f"latents have {x0.shape[1]} channels, the range {self.low.numel()}"
            raise ValueError(msg)
        low, high = (bound.to(x0).view(1, -1, 1, 1) for bound in (self.low, self.high))
        return torch.maximum(torch.minimum(x0, high), low)

    def clamp_eps(self, sample: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The ε under which ``sample`` at ᾱ = ``alpha_bar`` predicts the clamped x0 (ε itself where x0 is in range)."""
        x0 = (sample - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        clamped = self.clamp(x0)
        return torch.where(clamped == x0, eps, (sample - alpha_bar.sqrt() * clamped) / (1 - alpha_bar).sqrt())
