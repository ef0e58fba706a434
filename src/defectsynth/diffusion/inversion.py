"""BADG's masked DDIM inversion (Eq. 8) and the sampler that starts from it (Eq. 9), with η = 0.

Symbols (BADG → code); as in the paper, α_t here is the cumulative ᾱ_t (``sampler.alpha_bar``):

=============  ======================  ==============================================
paper          code                    meaning
=============  ======================  ==============================================
z_0^normal     ``latents``             the normal image's latents
m              ``mask``                1 = defect region, 0 = background
C1, C2         ``cond_defect``,        [C_def, C_bg] and [C_m, C_bg] prompt embeddings
               ``cond_background``
z̃^m_t          ``inverted[k]``         masked inversion latents (zero inside m)
z*_t           ``latents`` (sampler)   the sampled latents
=============  ======================  ==============================================

Both equations are DDIM's Euler form (DDIM Eq. 13) run in the two directions, with ε replaced by a
mask-mixed prediction. Timesteps come from ``sampler.timesteps``; "t - 1" is the previous
scheduled timestep, and before the first inversion step the latent sits at ``FINAL`` (ᾱ =
``final_alpha_cumprod``; the U-Net sees timestep 0 there).

Example:
    >>> sampler = DDIMSampler.from_model(model)  # doctest: +SKIP
    >>> sampler.set_timesteps(50)  # doctest: +SKIP
    >>> inverted = masked_ddim_invert(model, z0, mask, c2, sampler=sampler)  # doctest: +SKIP
    >>> z = masked_inversion_sample(  # doctest: +SKIP
    ...     model, inverted[-1], mask, c1, c2, sampler=sampler, generators=gens
    ... )
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from defectsynth.diffusion.ddim import DDIMSampler, per_sample_randn
from defectsynth.diffusion.sampling import (
    NoisePredictor,
    StepCallback,
    StepObserver,
    expand_batch,
    guided_output,
    unet_output,
)

if TYPE_CHECKING:
    from defectsynth.diffusion.latent_range import LatentRange
    from defectsynth.diffusion.model import DiffusionModel

BackgroundInput = Literal["masked", "full"]


def _check(sampler: DDIMSampler, start_index: int, latents: torch.Tensor, mask: torch.Tensor) -> None:
    if sampler.timesteps is None:
        msg = "call sampler.set_timesteps(n) first"
        raise RuntimeError(msg)
    if sampler.eta != 0:
        msg = f"masked DDIM inversion and its sampler are deterministic (η = 0); the sampler has eta={sampler.eta}"
        raise ValueError(msg)
    if not 0 <= start_index < len(sampler.timesteps):
        msg = f"start_index {start_index} outside [0, {len(sampler.timesteps)})"
        raise ValueError(msg)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != latents.shape[-2:]:
        msg = f"mask {tuple(mask.shape)} must be (B or 1, 1, h, w) with h, w of the latents {tuple(latents.shape)}"
        raise ValueError(msg)


def _alpha(sampler: DDIMSampler, timestep: int, like: torch.Tensor) -> torch.Tensor:
    return sampler.alpha_bar(timestep).to(device=like.device, dtype=like.dtype)


def masked_ddim_invert(
    model: DiffusionModel,
    latents: torch.Tensor,
    mask: torch.Tensor,
    cond_background: torch.Tensor,
    *,
    sampler: DDIMSampler,
    start_index: int = 0,
    control: StepObserver | None = None,
    predictor: NoisePredictor = unet_output,
) -> list[torch.Tensor]:
    """Masked DDIM inversion (BADG Eq. 8) of the background of normal latents, with prompt C2.

    ``z̃^m_t = sqrt(α_t) [ sqrt(1/α_{t-1}) z̃^m_{t-1}
    + (1 - m) ⊙ (sqrt(1/α_t - 1) - sqrt(1/α_{t-1} - 1)) ε_θ(z̃^m_{t-1}, t-1, C2) ]``,
    from ``z̃^m_0 = (1 - m) ⊙ z_0``. The ε-update acts only outside the mask, so the latent stays 0
    inside it. An all-zero mask gives plain DDIM inversion.

    Args:
        model: the diffusion model.
        latents: z_0 of the normal image, (B, C, h, w).
        mask: m at latent resolution, (B or 1, 1, h, w), 1 = defect region.
        cond_background: C2 embeddings (B or 1, L, D).
        sampler: a ``DDIMSampler`` (η = 0) after ``set_timesteps``.
        start_index: invert up to ``timesteps[start_index]`` (0: all the way to the noisiest step).
        control: told ``begin_step(index, timestep)`` before each U-Net call; ``index`` is the schedule
            position of the step's target timestep.
        predictor: the network call of each step (default: the plain U-Net).

    Returns:
        ``[z̃^m_0, z̃^m at timesteps[-1], ..., z̃^m at timesteps[start_index]]``: clean to noisy.
    """
    # 1. check inputs; the masked start z̃^m_0 = (1 - m) ⊙ z_0
    _check(sampler, start_index, latents, mask)
    keep = 1 - mask.to(latents)
    context = expand_batch(cond_background, latents.shape[0], "cond_background")
    current = keep * latents
    inverted = [current]

    # 2. from the cleanest step up: source s = "t - 1" (the previous scheduled timestep, FINAL first), target t
    for index in range(len(sampler.timesteps) - 1, start_index - 1, -1):
        target = int(sampler.timesteps[index])
        source = sampler.prev_timestep(target)
        if control is not None:  # told the sampling step this inversion step mirrors, as denoise tells it
            control.begin_step(index, target)
        query = max(source, 0)  # the U-Net's timestep for the source latent (0 at FINAL)
        eps = sampler.predict_eps(current, predictor(model, current, query, context), query)

        # 3. Eq. 8 with α_s = ᾱ_{t-1}, α_t = ᾱ_t
        alpha_s, alpha_t = _alpha(sampler, source, current), _alpha(sampler, target, current)
        step = (1 / alpha_t - 1).sqrt() - (1 / alpha_s - 1).sqrt()
        current = alpha_t.sqrt() * ((1 / alpha_s).sqrt() * current + keep * step * eps)
        inverted.append(current)
    return inverted


def masked_inversion_sample(
    model: DiffusionModel,
    inverted: torch.Tensor,
    mask: torch.Tensor,
    cond_defect: torch.Tensor,
    cond_background: torch.Tensor,
    *,
    sampler: DDIMSampler,
    start_index: int = 0,
    generators: Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    background_input: BackgroundInput = "masked",
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    x0_range: LatentRange | None = None,
    control: StepObserver | None = None,
    on_step: StepCallback | None = None,
    predictor: NoisePredictor = unet_output,
) -> torch.Tensor:
    """BADG's sampler (Eq. 9) from the masked inversion, with noise inside the mask.

    Starts at ``z*_T = z̃^m_T + m ⊙ ε`` and runs
    ``z*_{t-1} = sqrt(α_{t-1}) [ sqrt(1/α_t) z*_t + (sqrt(1/α_{t-1} - 1) - sqrt(1/α_t - 1)) ε̃ ]`` with
    ``ε̃ = (1 - m) ⊙ ε_θ((1 - m) ⊙ z*_t, t, C2) + m ⊙ ε_θ(z*_t, t, C1)``. Both branches go through the
    U-Net in one call (batch [C2 branch; C1 branch]). With ``guidance_scale`` > 1 the C1 branch is guided,
    ``ε_θ(z*_t, ∅) + g·(ε_θ(z*_t, C1) − ε_θ(z*_t, ∅))`` (ours: the paper states no guidance), and the batch gains
    the unconditional rows: [C2 branch; C1 branch; ∅].

    Args:
        model: the diffusion model.
        inverted: z̃^m at ``timesteps[start_index]`` (the last entry of ``masked_ddim_invert``).
        mask: m at latent resolution, (B or 1, 1, h, w), 1 = defect region.
        cond_defect: C1 embeddings (B or 1, L, D), the defect branch.
        cond_background: C2 embeddings (B or 1, L, D), the background branch.
        sampler: a ``DDIMSampler`` (η = 0) after ``set_timesteps``.
        start_index: the step ``inverted`` sits at.
        generators: one per sample, for ε inside the mask (unless ``noise`` is given).
        noise: explicit ε, shaped like ``inverted``.
        background_input: what the C2 branch sees. "masked" (default): ``(1 - m) ⊙ z*_t``, as in
            training (Eq. 5, 7) and in the proof of Prop. 3.3, so the background evolves exactly as
            the inversion in reverse, whatever grows in the mask. "full": ``z*_t``, as Eq. 9 is printed.
        uncond: the unconditional embeddings (B or 1, L, D) of the guided C1 branch.
        guidance_scale: g of the C1 branch's classifier-free guidance (1: none, Eq. 9 as printed).
        guidance_rescale: φ of guidance rescale on the guided C1 branch (``sampling.rescale_guided``; 0: off).
        x0_range: where the C1 branch's x0 prediction is clamped each step (ours; ``latent_range``); None: nowhere.
            The C2 branch is left alone, so the background still evolves exactly as the inversion in reverse.
        control: told ``begin_step(index, timestep)`` before each U-Net call.
        on_step: ``on_step(index, timestep, latents, pred_x0)`` after each step.
        predictor: the network call of each step (default: the plain U-Net); it sees the batch
            [C2 branch; C1 branch] (and ∅ when guided), twice (three times) the samples.

    Returns:
        z*_0, (B, C, h, w).
    """
    # 1. check inputs
    _check(sampler, start_index, inverted, mask)
    if background_input not in ("masked", "full"):
        msg = f"background_input must be 'masked' or 'full', got {background_input!r}"
        raise ValueError(msg)
    if (noise is None) == (generators is None):
        msg = "give exactly one of generators, noise"
        raise ValueError(msg)
    guided = guidance_scale > 1
    if guided and uncond is None:
        msg = f"guidance_scale {guidance_scale} needs the unconditional embeddings (uncond)"
        raise ValueError(msg)
    batch = inverted.shape[0]
    mask = mask.to(inverted)
    keep = 1 - mask
    contexts = [
        expand_batch(cond_background, batch, "cond_background"),
        expand_batch(cond_defect, batch, "cond_defect"),
    ]
    if guided:
        contexts.append(expand_batch(uncond, batch, "uncond"))
    context = torch.cat(contexts)

    # 2. z*_T = z̃^m_T + m ⊙ ε (Theorem 3.2: inside the mask the inversion gap tends to m ⊙ ε)
    if noise is None:
        noise = per_sample_randn(inverted.shape[1:], generators, dtype=inverted.dtype, device=inverted.device)
    latents = inverted + mask * noise

    # 3. the Eq. 9 loop
    for index in range(start_index, len(sampler.timesteps)):
        timestep = int(sampler.timesteps[index])
        prev_t = sampler.prev_timestep(timestep)
        if control is not None:
            control.begin_step(index, timestep)
        # the C2 branch sees the masked latent (the digest's [INF]: Eq. 9's printed z*_t contradicts its proof)
        background = keep * latents if background_input == "masked" else latents
        model_input = torch.cat([background, latents, latents] if guided else [background, latents])
        output_bg, output_def, *output_uncond = predictor(model, model_input, timestep, context).chunk(len(contexts))
        if guided:
            output_def = guided_output(output_uncond[0], output_def, guidance_scale, guidance_rescale)
        eps_bg = sampler.predict_eps(background, output_bg, timestep)
        eps_def = sampler.predict_eps(latents, output_def, timestep)
        alpha_t, alpha_prev = _alpha(sampler, timestep, latents), _alpha(sampler, prev_t, latents)
        if x0_range is not None:
            eps_def = x0_range.clamp_eps(latents, eps_def, alpha_t)
        eps = keep * eps_bg + mask * eps_def

        pred_x0 = (latents - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        step = (1 / alpha_prev - 1).sqrt() - (1 / alpha_t - 1).sqrt()
        latents = alpha_prev.sqrt() * ((1 / alpha_t).sqrt() * latents + step * eps)
        if on_step is not None:
            on_step(index, timestep, latents, pred_x0)
    return latents
