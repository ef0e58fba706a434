"""DiffusionAD's norm-guided one-step reconstruction (paper 003, Eq. 6-8), for a pixel-space DDPM.

The detector reconstructs an image as normal from two noise levels in two U-Net passes, no
iterative loop: the big level t_b gives a "norm" n that is trusted to be anomaly-free, and the
small level t_s is pulled towards it (norm guidance) before its one-step x_0 prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from defectsynth.diffusion.ddim import DDIMSampler, per_sample_randn

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A pixel-space noise predictor ``eps_fn(x_t, t) -> ε``; ``t`` is a (B,) long tensor."""


@dataclass(frozen=True)
class NormGuidedOutput:
    """DiffusionAD's reconstructions (all (B, C, H, W), pixel space).

    Attributes:
        x0_guided: x̂_{0_g}, the norm-guided one-step reconstruction (Eq. 8).
        x0_small: x̂_{0_s}, the plain one-step reconstruction from x_{t_s} (Eq. 6).
        x0_big: n = x̂_{0_b}, the one-step reconstruction from x_{t_b} (Eq. 6), the guiding "norm".
    """

    x0_guided: torch.Tensor
    x0_small: torch.Tensor
    x0_big: torch.Tensor


def norm_guided_x0(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    *,
    t_s: int | torch.Tensor,
    t_b: int | torch.Tensor,
    sampler: DDIMSampler,
    w: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    noise_s: torch.Tensor | None = None,
    noise_b: torch.Tensor | None = None,
) -> NormGuidedOutput:
    """Norm-guided one-step denoising (DiffusionAD Eq. 6-8), for a pixel-space ε-predicting DDPM.

    Only the sampler's noise schedule is used (no ``set_timesteps``): build one for the detector's
    own schedule with ``DDIMSampler(alphas_cumprod=...)``. ``eps_fn`` must predict ε.

    Args:
        eps_fn: ``eps_fn(x_t, t) -> ε`` with ``t`` a (B,) long tensor.
        x0: the input image x_0, (B, C, H, W).
        t_s: the small noise level t_s ∈ {0..τ} (an int, or (B,) for training).
        t_b: the big noise level t_b ∈ {τ+1..T} (an int, or (B,)).
        sampler: holds ᾱ.
        w: the guidance weight (1 in the paper).
        generators: one per sample; draws ε_s then ε_b for each (unless both noises are given).
        noise_s: explicit ε for x_{t_s}.
        noise_b: explicit ε for x_{t_b}.

    Returns:
        The guided reconstruction with the two unguided ones.
    """
    # 1. the two forward-noised inputs (Eq. 1): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε_t, independent ε
    if noise_s is None or noise_b is None:
        if generators is None:
            msg = "give generators, or both noise_s and noise_b"
            raise ValueError(msg)
        both = per_sample_randn((2, *x0.shape[1:]), generators, dtype=x0.dtype, device=x0.device)
        noise_s = both[:, 0] if noise_s is None else noise_s
        noise_b = both[:, 1] if noise_b is None else noise_b
    batch_t_s = torch.as_tensor(t_s, device=x0.device).long().expand(x0.shape[0])
    batch_t_b = torch.as_tensor(t_b, device=x0.device).long().expand(x0.shape[0])
    x_ts = sampler.add_noise(x0, noise_s, batch_t_s)
    x_tb = sampler.add_noise(x0, noise_b, batch_t_b)

    # 2. one diffusion pass per noise level: ε_θ(x_{t_s}) and ε_θ(x_{t_b})
    eps_s = eps_fn(x_ts, batch_t_s)
    eps_b = eps_fn(x_tb, batch_t_b)

    # 3. Eq. 6 at t_b: n = x̂_{0_b} = (x_{t_b} - sqrt(1 - ᾱ_{t_b}) ε_θ(x_{t_b})) / sqrt(ᾱ_{t_b}); at t_s: x̂_{0_s}
    alpha_s = sampler.alpha_bar(batch_t_s).reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    alpha_b = sampler.alpha_bar(batch_t_b).reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    norm = (x_tb - (1 - alpha_b).sqrt() * eps_b) / alpha_b.sqrt()
    x0_small = (x_ts - (1 - alpha_s).sqrt() * eps_s) / alpha_s.sqrt()

    # 4. n_{t_s}: n noised to t_s with the *predicted* noise ε_θ(x_{t_s}), not a random one
    norm_ts = alpha_s.sqrt() * norm + (1 - alpha_s).sqrt() * eps_s

    # 5. Eq. 7: ε̂ = ε_θ(x_{t_s}) - sqrt(1 - ᾱ_{t_s}) w (n_{t_s} - x_{t_s});
    #    (n_{t_s} - x_{t_s}) is the gradient of sim = -½ (n_{t_s} - x_{t_s})² with respect to x_{t_s}
    eps_guided = eps_s - (1 - alpha_s).sqrt() * w * (norm_ts - x_ts)

    # 6. Eq. 8: x̂_{0_g} = (x_{t_s} - sqrt(1 - ᾱ_{t_s}) ε̂) / sqrt(ᾱ_{t_s})
    x0_guided = (x_ts - (1 - alpha_s).sqrt() * eps_guided) / alpha_s.sqrt()
    return NormGuidedOutput(x0_guided=x0_guided, x0_small=x0_small, x0_big=norm)
