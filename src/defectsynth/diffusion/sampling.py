"""Sampling loops shared by the diffusion generators: DDIM with guidance, blending, noised starts.

Everything is batched, and every random draw comes from an explicit list of ``torch.Generator``,
one per batch item, so a sample's result does not depend on its batch-mates.

- ``initial_noise``: per-sample seeded starting latents.
- ``NoisePredictor``: what a loop calls for the model's output; ``unet_output`` (the plain U-Net) by
  default, ``controlnet.ControlNetPredictor`` adds a ControlNet's residuals, without a forked loop.
- ``sampler_from_model``: a sampler by name (``SAMPLERS``: DDIM, DPM-Solver++(2M)).
- ``denoise``: the DDIM loop with classifier-free guidance, an optional step observer (the
  attention control or feature taps; ``begin_step`` marks each step), an optional per-step callback,
  and optional blending (AnomalyDiffusion Eq. 1, ``BlendTarget``).
- ``noised_start``: an SDEdit-style start from a forward-noised normal image (SeaS).
Masked DDIM inversion and its sampler (BADG) live in ``inversion``; DiffusionAD's norm-guided
one-step reconstruction in ``one_step``.

Example:
    >>> from defectsynth.diffusion.ddim import DDIMSampler  # doctest: +SKIP
    >>> sampler = DDIMSampler.from_model(model)  # doctest: +SKIP
    >>> sampler.set_timesteps(25)  # doctest: +SKIP
    >>> generators = generators_from_seeds([0, 1])  # doctest: +SKIP
    >>> latents = initial_noise(model.latent_shape, generators)  # doctest: +SKIP
    >>> cond, uncond = model.encode_prompt(["a wood"] * 2), model.encode_prompt([""] * 2)  # doctest: +SKIP
    >>> latents = denoise(model, latents, cond, uncond=uncond, guidance_scale=5.0, sampler=sampler)  # doctest: +SKIP
    >>> images = model.decode_latents(latents)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from defectsynth.diffusion.ddim import FINAL, DDIMSampler, per_sample_randn
from defectsynth.diffusion.dpm_solver import DPMSolverSampler

if TYPE_CHECKING:
    from defectsynth.diffusion.latent_range import LatentRange
    from defectsynth.diffusion.model import DiffusionModel

SAMPLERS: dict[str, type[DDIMSampler]] = {DDIMSampler.name: DDIMSampler, DPMSolverSampler.name: DPMSolverSampler}
"""The samplers a generator can name in its settings, by their ``name``."""

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``on_step(index, timestep, latents, pred_x0)``, called after each step with the new latents."""


class NoisePredictor(Protocol):
    """One network call of a sampling step: ``(model, latents, timestep, context) -> output``, like ``unet_output``.

    The output is what the U-Net predicts (ε, v or x_0, per the schedule), shaped and typed like
    ``latents``. Loops may call it on a doubled batch (guidance, BADG's two branches), so a predictor
    that holds per-sample inputs must tile them to the batch it is given.
    """

    def __call__(
        self, model: DiffusionModel, latents: torch.Tensor, timestep: int | torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The model's output for ``latents`` (B, C, h, w) at ``timestep`` with ``context`` (B, L, D)."""


class StepObserver(Protocol):
    """Anything told where a sampling step begins: the attention control, feature taps."""

    def begin_step(self, index: int, timestep: int) -> None:
        """Called before the U-Net call of step ``index`` (its position in ``sampler.timesteps``)."""


@dataclass(frozen=True)
class StepObservers:
    """Several step observers as one, e.g. an attention control and feature taps in the same loop."""

    observers: tuple[StepObserver, ...]

    def begin_step(self, index: int, timestep: int) -> None:
        """Tell every observer, in order."""
        for observer in self.observers:
            observer.begin_step(index, timestep)


@dataclass
class StepTrace:
    """An ``on_step`` callback that keeps every step's latents and x_0 prediction (detached), in order.

    Attributes:
        then: another callback to forward each step to.
    """

    then: StepCallback | None = None
    indices: list[int] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    pred_x0: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, index: int, timestep: int, latents: torch.Tensor, pred_x0: torch.Tensor) -> None:
        """Record one step."""
        self.indices.append(index)
        self.timesteps.append(timestep)
        self.latents.append(latents.detach().clone())
        self.pred_x0.append(pred_x0.detach().clone())
        if self.then is not None:
            self.then(index, timestep, latents, pred_x0)


def sampler_from_model(name: str, model: DiffusionModel, *, eta: float = 0.0) -> DDIMSampler:
    """The sampler called ``name`` (a key of ``SAMPLERS``) on ``model``'s training schedule."""
    if name not in SAMPLERS:
        msg = f"sampler {name!r} is not one of {sorted(SAMPLERS)}"
        raise ValueError(msg)
    return SAMPLERS[name].from_model(model, eta=eta)


def generators_from_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def initial_noise(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Starting latents x_T ~ N(0, I), one per generator: (len(generators), *shape) for a per-sample ``shape``."""
    return per_sample_randn(shape, generators, dtype=dtype, device=device) * DDIMSampler.init_noise_sigma


def unet_output(
    model: DiffusionModel, latents: torch.Tensor, timestep: int | torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """One U-Net call in the model's dtype; the output comes back in ``latents``' dtype (the default predictor).

    A loop passes ``timestep`` as a tensor already on the model's device: the U-Net would copy an int there,
    and each such copy waits for the GPU to finish all queued work.
    """
    out = model.unet(latents.to(model.device, model.dtype), timestep, encoder_hidden_states=context.to(model.dtype))
    return out.sample.to(latents.dtype)


def expand_batch(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``tensor`` with a batch of ``batch``: a batch of 1 is repeated, any other size must match."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    msg = f"{name} has batch {tensor.shape[0]}, expected 1 or {batch}"
    raise ValueError(msg)


@dataclass(frozen=True)
class BlendTarget:
    """What blended latent diffusion keeps outside the mask (AnomalyDiffusion Eq. 1).

    After each step, ``x_{t-1} = x_{t-1} ⊙ m + q(y_{t-1} | y_0) ⊙ (1 - m)``, where the background
    sample ``q(y_{t-1} | y_0) = sqrt(ᾱ) y_0 + sqrt(1 - ᾱ) ε`` uses one fixed ε per sample for the
    whole run, and after the last step the background is exactly y_0.

    Fixed rather than fresh noise each step (blended latent diffusion's code draws fresh noise):
    with fixed ε the background follows the path an ideal deterministic (η = 0) DDIM trajectory
    of y_0 takes, so the U-Net sees a coherent background across steps instead of one whose
    noise jumps each step; and a run depends only on the seed, with one draw per sample.

    Attributes:
        source: y_0, the normal image's latents, (B, C, h, w).
        mask: m at latent resolution, (B or 1, 1, h, w); 1 = generate, 0 = keep the source.
        noise: the fixed ε, shaped like ``source``.
    """

    source: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor

    def __post_init__(self) -> None:
        if self.noise.shape != self.source.shape:
            msg = f"noise {tuple(self.noise.shape)} does not match source {tuple(self.source.shape)}"
            raise ValueError(msg)
        if self.mask.dim() != 4 or self.mask.shape[1] != 1 or self.mask.shape[-2:] != self.source.shape[-2:]:
            msg = f"mask {tuple(self.mask.shape)} must be (B or 1, 1, h, w) with h, w of source {self.source.shape}"
            raise ValueError(msg)

    @classmethod
    def draw(cls, source: torch.Tensor, mask: torch.Tensor, generators: Sequence[torch.Generator]) -> BlendTarget:
        """A target whose fixed noise comes from one generator per sample."""
        noise = per_sample_randn(source.shape[1:], generators, dtype=source.dtype, device=source.device)
        return cls(source=source, mask=mask.to(source), noise=noise)

    def background(self, sampler: DDIMSampler, timestep: int) -> torch.Tensor:
        """q(y_t | y_0) with the fixed noise; exactly y_0 at ``FINAL`` (after the last step)."""
        if timestep == FINAL:
            return self.source
        return sampler.add_noise(self.source, self.noise, timestep)

    def apply(self, sampler: DDIMSampler, latents: torch.Tensor, timestep: int) -> torch.Tensor:
        """Eq. 1: keep ``latents`` inside the mask and the background sample at ``timestep`` outside."""
        return latents * self.mask + self.background(sampler, timestep) * (1 - self.mask)


def rescale_guided(guided: torch.Tensor, conditional: torch.Tensor, rescale: float) -> torch.Tensor:
    """Blend the guided prediction with itself scaled to the conditional one's per-sample std, by ``rescale``.

    Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps Are Flawed", Eq. 15-16; diffusers'
    ``guidance_rescale``): a high guidance scale inflates the prediction's std, which over-saturates colours.
    """
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return rescale * guided * ratio + (1 - rescale) * guided


def guided_output(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, ``uncond + scale·(cond − uncond)``, then ``rescale_guided`` by ``rescale``."""
    return rescale_guided(uncond + scale * (cond - uncond), cond, rescale)


def denoise(
    model: DiffusionModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    *,
    sampler: DDIMSampler,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    start_index: int = 0,
    control: StepObserver | None = None,
    blend: BlendTarget | None = None,
    on_step: StepCallback | None = None,
    generators: Sequence[torch.Generator] | None = None,
    predictor: NoisePredictor = unet_output,
    x0_range: LatentRange | None = None,
) -> torch.Tensor:
    """Run ``sampler.timesteps[start_index:]`` from ``latents`` (which are at ``timesteps[start_index]``).

    Args:
        model: the diffusion model whose U-Net predicts.
        latents: x_t, (B, C, h, w).
        cond: prompt embeddings (B or 1, L, D).
        sampler: a ``DDIMSampler`` after ``set_timesteps``.
        uncond: unconditional embeddings for classifier-free guidance (B or 1, L, D).
        guidance_scale: s in ``ε_u + s (ε_c - ε_u)``; no guidance (and no doubled batch) at 1 or without ``uncond``.
        guidance_rescale: φ of ``rescale_guided`` (0: plain guidance).
        start_index: the first step to run (after ``noised_start``).
        control: told ``begin_step(index, timestep)`` before each U-Net call.
        blend: keep a source's noised latents outside a mask (AnomalyDiffusion Eq. 1).
        on_step: ``on_step(index, timestep, latents, pred_x0)`` after each step (and blend).
        generators: one per sample; needed when the sampler's η > 0.
        predictor: the network call of each step (default: the plain U-Net); it sees the doubled batch
            [uncond; cond] when guided.
        x0_range: per-channel bounds each step's x_0 prediction is clamped to (``DDIMSampler.step``); None: none.

    Returns:
        The final latents x_0, (B, C, h, w).
    """
    # 1. check inputs
    if sampler.timesteps is None:
        msg = "call sampler.set_timesteps(n) before denoise"
        raise RuntimeError(msg)
    if not 0 <= start_index < len(sampler.timesteps):
        msg = f"start_index {start_index} outside [0, {len(sampler.timesteps)})"
        raise ValueError(msg)
    batch = latents.shape[0]
    latents = latents.to(model.device)
    guided = uncond is not None and guidance_scale != 1.0

    # 2. the context: [uncond; cond] when guided, so each step is one U-Net call on a doubled batch
    context = expand_batch(cond, batch, "cond")
    if guided:
        context = torch.cat([expand_batch(uncond, batch, "uncond"), context])

    # 3. the denoising loop
    device_timesteps = sampler.timesteps.to(model.device)
    for index in range(start_index, len(sampler.timesteps)):
        timestep = int(sampler.timesteps[index])
        if control is not None:
            control.begin_step(index, timestep)
        model_input = torch.cat([latents, latents]) if guided else latents
        output = predictor(model, sampler.scale_model_input(model_input, timestep), device_timesteps[index], context)
        if guided:
            output_uncond, output_cond = output.chunk(2)
            output = guided_output(output_uncond, output_cond, guidance_scale, guidance_rescale)
        step = sampler.step(output, timestep, latents, generators=generators, x0_range=x0_range)
        latents = step.prev_sample
        if blend is not None:
            latents = blend.apply(sampler, latents, sampler.prev_timestep(timestep))
        if on_step is not None:
            on_step(index, timestep, latents, step.pred_x0)
    return latents


def noised_start(
    sampler: DDIMSampler,
    source_latents: torch.Tensor,
    *,
    strength: float | None = None,
    start_index: int | None = None,
    timestep: int | None = None,
    generators: Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward-noise normal latents to the step where denoising starts (SDEdit; SeaS's starting point).

    Give exactly one of:

    - ``strength`` in (0, 1]: the share of the n steps to run, as diffusers' img2img does
      (``start_index = n - int(n * strength)``);
    - ``start_index``: the first step to run;
    - ``timestep``: a training timestep; denoising starts at the first scheduled timestep <= it.
      Values >= T are clipped, i.e. full strength.

    A timestep beyond the schedule (SeaS's "t = 1500") clips to full strength here; SeaS itself follows its
    authors' code instead, which stretches the beta schedule to 1500 steps (``generators.seas``).

    Args:
        sampler: a ``DDIMSampler`` after ``set_timesteps``.
        source_latents: y_0, (B, C, h, w).
        strength: see above.
        start_index: see above.
        timestep: see above.
        generators: one per sample, for the noise (unless ``noise`` is given).
        noise: explicit ε, shaped like ``source_latents`` (e.g. a ``BlendTarget``'s, for a consistent background).

    Returns:
        (x at ``timesteps[start_index]``, ``start_index``), ready for ``denoise(..., start_index=...)``.
    """
    # 1. check inputs
    if sampler.timesteps is None:
        msg = "call sampler.set_timesteps(n) before noised_start"
        raise RuntimeError(msg)
    if sum(value is not None for value in (strength, start_index, timestep)) != 1:
        msg = "give exactly one of strength, start_index, timestep"
        raise ValueError(msg)
    if (noise is None) == (generators is None):
        msg = "give exactly one of generators, noise"
        raise ValueError(msg)

    # 2. the starting step
    steps = len(sampler.timesteps)
    if strength is not None:
        if not 0 < strength <= 1:
            msg = f"strength must be in (0, 1], got {strength}"
            raise ValueError(msg)
        start_index = steps - max(int(steps * strength), 1)
    elif timestep is not None:
        start_index = sampler.index_for_timestep(min(int(timestep), sampler.num_train_timesteps - 1))
    if not 0 <= start_index < steps:
        msg = f"start_index {start_index} outside [0, {steps})"
        raise ValueError(msg)

    # 3. q(x_t | y_0) at that step's timestep
    if noise is None:
        noise = per_sample_randn(
            source_latents.shape[1:], generators, dtype=source_latents.dtype, device=source_latents.device
        )
    latents = sampler.add_noise(source_latents, noise, int(sampler.timesteps[start_index]))
    return latents, start_index
