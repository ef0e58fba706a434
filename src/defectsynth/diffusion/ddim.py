"""DDIM (Song et al., 2021) as a sampler with diffusers' scheduler contract, plus the forward-process helpers.

``DDIMSampler`` follows ``diffusers.DDIMScheduler``: ``set_timesteps(n)`` first, then
``step(model_output, timestep, sample)`` returns a frozen ``DDIMStepOutput``. Its keyword-only
``__init__`` arguments are its ``config``, which rebuilds it exactly (``DDIMSampler(**s.config)``).
With η = 0 and ε-prediction its ``step`` equals ``DDIMScheduler.step`` for the same config.

Two differences from diffusers, both about randomness and bookkeeping:

- η > 0 noise comes from a list of ``torch.Generator``, one per batch item, so a sample's result
  does not depend on its batch-mates (diffusers draws one tensor from one generator).
- The previous timestep is the next entry of the schedule (not ``t - T // n``). For "leading"
  spacing, the one Stable Diffusion uses, the two are the same.

Symbols (DDIM paper → code), with ᾱ the cumulative product the paper writes as α:

=============  ===========================  ==================================
paper          code                         meaning
=============  ===========================  ==================================
α_t            ``alpha_bar(t)``             ᾱ_t, the training schedule
x_t            ``sample``                   noisy sample at timestep t
ε_θ(x_t)       ``pred_eps``                 predicted noise
f_θ(x_t)       ``pred_x0``                  predicted clean sample (Eq. 9)
σ_t(η)         ``std``                      Eq. 16
=============  ===========================  ==================================

Example:
    >>> import torch
    >>> sampler = DDIMSampler(alphas_cumprod=torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))
    >>> sampler.set_timesteps(4)
    >>> sampler.timesteps.tolist()
    [751, 501, 251, 1]
    >>> out = sampler.step(torch.zeros(1, 4, 8, 8), 751, torch.randn(1, 4, 8, 8))
    >>> out.prev_sample.shape
    torch.Size([1, 4, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from defectsynth.diffusion.latent_range import LatentRange
    from defectsynth.diffusion.model import DiffusionModel

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL = -1  # the "timestep" after the last step: ᾱ is ``final_alpha_cumprod`` there


@dataclass(frozen=True)
class DDIMStepOutput:
    """One DDIM step, like ``diffusers.DDIMSchedulerOutput`` (no ``return_dict``).

    Attributes:
        prev_sample: x_{t-1}, shaped like the input sample.
        pred_x0: the x_0 prediction f_θ(x_t) used for the step (after clipping, if configured).
        pred_eps: the ε prediction used for the step.
    """

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


def per_sample_randn(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise, one draw of ``shape`` per generator, stacked to (len(generators), *shape).

    Item i depends only on ``generators[i]``, so results are the same whatever the batch. Each draw
    happens on its generator's device, then moves to ``device`` (default: the first generator's).
    """
    if not generators:
        msg = "per_sample_randn needs at least one generator"
        raise ValueError(msg)
    draws = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack([draw.to(device or generators[0].device) for draw in draws])


class DDIMSampler:
    """Deterministic (η = 0) or stochastic DDIM over a fixed training schedule; see the module docstring.

    Attributes:
        name: "ddim", the ``sampler`` recorded in the metadata of the samples it makes.
        order: 1, as for diffusers' first-order schedulers.
        init_noise_sigma: 1.0, the standard deviation of the initial noise.
        timesteps: the inference timesteps, descending; None until ``set_timesteps``.
    """

    name = "ddim"
    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        *,
        alphas_cumprod: Sequence[float] | torch.Tensor,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        eta: float = 0.0,
    ) -> None:
        """Build a sampler.

        Args:
            alphas_cumprod: ᾱ_t for t = 0..T-1 (kept in float64).
            prediction_type: what the model outputs: "epsilon", "v_prediction" or "sample".
            timestep_spacing: how ``set_timesteps`` spaces the steps, as in diffusers.
            steps_offset: added to "leading" timesteps (Stable Diffusion uses 1).
            set_alpha_to_one: ᾱ after the last step is 1 (True) or ᾱ_0 (False, Stable Diffusion).
            clip_sample: clamp ``pred_x0`` to ±``clip_sample_range`` (off for latents).
            clip_sample_range: the clamp bound.
            eta: η of DDIM Eq. 16; 0 is deterministic DDIM, 1 is DDPM-like.
        """
        alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if alphas.numel() < 2 or not bool(((alphas > 0) & (alphas <= 1)).all()):
            msg = "alphas_cumprod must hold two or more values in (0, 1]"
            raise ValueError(msg)
        if prediction_type not in PREDICTION_TYPES:
            msg = f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}"
            raise ValueError(msg)
        if timestep_spacing not in TIMESTEP_SPACINGS:
            msg = f"timestep_spacing {timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}"
            raise ValueError(msg)
        if eta < 0:
            msg = f"eta must be >= 0, got {eta}"
            raise ValueError(msg)
        self.alphas_cumprod = alphas
        self.final_alpha_cumprod = torch.ones((), dtype=torch.float64) if set_alpha_to_one else alphas[0].clone()
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.eta = float(eta)
        self.timesteps: torch.Tensor | None = None
        self._previous: dict[int, int] = {}

    # --- construction and config -------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments, plain Python values: ``DDIMSampler(**config)`` rebuilds this sampler."""
        return {
            "alphas_cumprod": self.alphas_cumprod.tolist(),
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "eta": self.eta,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DDIMSampler:
        """Rebuild a sampler from its ``config``."""
        return cls(**config)

    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin, *, eta: float = 0.0) -> DDIMSampler:
        """The noise schedule and sampling settings of a diffusers scheduler (any with ``alphas_cumprod``).

        Raises:
            ValueError: the scheduler uses dynamic thresholding, which this sampler does not implement.
        """
        config = scheduler.config
        if config.get("thresholding", False):
            msg = "dynamic thresholding (thresholding=True) is not supported by DDIMSampler"
            raise ValueError(msg)
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod,
            prediction_type=config.get("prediction_type", "epsilon"),
            timestep_spacing=config.get("timestep_spacing", "leading"),
            steps_offset=config.get("steps_offset", 0),
            set_alpha_to_one=config.get("set_alpha_to_one", False),
            clip_sample=config.get("clip_sample", False),
            clip_sample_range=config.get("clip_sample_range", 1.0),
            eta=eta,
        )

    @classmethod
    def from_model(cls, model: DiffusionModel, *, eta: float = 0.0) -> DDIMSampler:
        """The training schedule and prediction type of ``model.scheduler``."""
        return cls.from_scheduler(model.scheduler, eta=eta)

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.alphas_cumprod.numel()

    @property
    def num_inference_steps(self) -> int | None:
        """The n of the last ``set_timesteps(n)``, or None."""
        return None if self.timesteps is None else self.timesteps.numel()

    # --- schedule ------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the n inference timesteps (descending), as ``DDIMScheduler.set_timesteps`` does."""
        train = self.num_train_timesteps
        n = int(num_inference_steps)
        if not 1 <= n <= train:
            msg = f"num_inference_steps must be in [1, {train}], got {num_inference_steps}"
            raise ValueError(msg)
        if self.timestep_spacing == "leading":
            steps = torch.arange(n, dtype=torch.float64) * (train // n) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            steps = torch.arange(train, 0, -train / n, dtype=torch.float64).round().flip(0) - 1
        else:  # linspace
            steps = torch.linspace(0, train - 1, n, dtype=torch.float64).round()
        steps = steps.round().long().flip(0)
        if int(steps.max()) >= train or int(steps.min()) < 0:
            msg = f"steps_offset {self.steps_offset} puts timesteps outside [0, {train})"
            raise ValueError(msg)
        self.timesteps = steps.to(device) if device is not None else steps
        listed = steps.tolist()
        self._previous = dict(zip(listed, [*listed[1:], FINAL], strict=True))

    def prev_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after ``timestep`` in the schedule, or ``FINAL`` (-1) after the last one."""
        if self.timesteps is None:
            msg = "call set_timesteps(n) before stepping"
            raise RuntimeError(msg)
        t = int(timestep)
        if t not in self._previous:
            msg = f"timestep {t} is not in the schedule {self.timesteps.tolist()}"
            raise ValueError(msg)
        return self._previous[t]

    def index_for_timestep(self, timestep: int) -> int:
        """The first schedule index whose timestep is <= ``timestep`` (0 if ``timestep`` is above them all).

        Used to turn a training timestep (e.g. SeaS's noising level) into a ``start_index``.
        """
        if self.timesteps is None:
            msg = "call set_timesteps(n) first"
            raise RuntimeError(msg)
        below = (self.timesteps.cpu() <= int(timestep)).nonzero()
        if below.numel() == 0:
            msg = f"timestep {timestep} is below the whole schedule {self.timesteps.tolist()}"
            raise ValueError(msg)
        return int(below[0])

    def alpha_bar(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """ᾱ at ``timestep`` (int or a (B,) tensor) in float64; ``FINAL``/negative gives ``final_alpha_cumprod``."""
        t = torch.as_tensor(timestep).long().cpu()
        values = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, self.final_alpha_cumprod, values)

    def _coefficient(self, timestep: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t in ``like``'s dtype, broadcasting over a (B, ...) tensor: on ``like``'s device, or a CPU scalar."""
        alpha = self.alpha_bar(timestep)
        if alpha.dim() == 0:
            # A CPU scalar joins GPU arithmetic as is; copying it to the GPU would stall the stream every step.
            return alpha.to(like.dtype)
        alpha = alpha.reshape(-1, *([1] * (like.dim() - 1)))
        return alpha.to(device=like.device, dtype=like.dtype)

    # --- forward process and conversions ------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """A sample of q(x_t | x_0): ``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``; ``timestep`` is an int or (B,)."""
        alpha = self._coefficient(timestep, x0)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    def predict_x0(
        self, sample: torch.Tensor, model_output: torch.Tensor, timestep: int | torch.Tensor
    ) -> torch.Tensor:
        """One-step x_0 from a model output of this sampler's prediction type (DDIM Eq. 9, DiffusionAD Eq. 6)."""
        alpha = self._coefficient(timestep, sample)
        if self.prediction_type == "epsilon":  # x0 = (x_t - sqrt(1-ᾱ) ε) / sqrt(ᾱ)
            return (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
        if self.prediction_type == "v_prediction":  # v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0  =>  x0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v
            return alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        return model_output

    def predict_eps(
        self, sample: torch.Tensor, model_output: torch.Tensor, timestep: int | torch.Tensor
    ) -> torch.Tensor:
        """ε from a model output of this sampler's prediction type."""
        alpha = self._coefficient(timestep, sample)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":  # ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t
            return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
        return (sample - alpha.sqrt() * model_output) / (1 - alpha).sqrt()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """No scaling for DDIM (kept for interchangeability with diffusers schedulers)."""
        return sample

    def predictions(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, x0_range: LatentRange | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, ε) from a model output: x_0 clipped if configured, both moved into ``x0_range`` when given."""
        pred_x0 = self.predict_x0(sample, model_output, timestep)
        pred_eps = self.predict_eps(sample, model_output, timestep)
        if self.clip_sample:
            pred_x0 = pred_x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        if x0_range is not None:
            pred_eps = x0_range.clamp_eps(sample, pred_eps, self._coefficient(timestep, sample))
            pred_x0 = x0_range.clamp(pred_x0)
        return pred_x0, pred_eps

    # --- the step -----------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        *,
        generators: Sequence[torch.Generator] | None = None,
        x0_range: LatentRange | None = None,
    ) -> DDIMStepOutput:
        """One reverse step x_t -> x_{t-1} (DDIM Eq. 12).

        Args:
            model_output: the U-Net's output for ``sample`` at ``timestep`` (of ``prediction_type``).
            timestep: the current timestep, one of ``timesteps``.
            sample: x_t, shaped (B, ...).
            generators: one per batch item; required when η > 0.
            x0_range: per-channel bounds the x_0 prediction is clamped to, ε recomputed from it (``latent_range``).

        Returns:
            The previous sample with the x_0 and ε predictions it was built from.

        Raises:
            RuntimeError: ``set_timesteps`` was not called.
            ValueError: η > 0 without one generator per batch item.
        """
        # 1. the previous timestep: the next one in the schedule (FINAL after the last)
        prev_t = self.prev_timestep(timestep)

        # 2. ᾱ_t and ᾱ_{t-1} (the paper's α_t, α_{t-1})
        alpha_t = self._coefficient(int(timestep), sample)
        alpha_prev = self._coefficient(prev_t, sample)

        # 3. the "predicted x_0" f_θ(x_t) of Eq. 9 and the ε it implies, for any prediction type
        pred_x0, pred_eps = self.predictions(model_output, int(timestep), sample, x0_range)

        # 4. σ_t(η) of Eq. 16: η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1})
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std = self.eta * variance.sqrt()

        # 5. Eq. 12: x_{t-1} = sqrt(ᾱ_{t-1}) f_θ(x_t) + sqrt(1 - ᾱ_{t-1} - σ_t²) ε_θ(x_t) + σ_t z
        direction = (1 - alpha_prev - std**2).sqrt() * pred_eps  # "direction pointing to x_t"
        prev_sample = alpha_prev.sqrt() * pred_x0 + direction

        # 6. the random term σ_t z, drawn per batch item so no sample depends on its batch-mates
        if self.eta > 0:
            if generators is None or len(generators) != sample.shape[0]:
                msg = f"eta={self.eta} needs one torch.Generator per batch item ({sample.shape[0]})"
                raise ValueError(msg)
            noise = per_sample_randn(sample.shape[1:], generators, dtype=sample.dtype, device=sample.device)
            prev_sample = prev_sample + std * noise
        return DDIMStepOutput(prev_sample=prev_sample, pred_x0=pred_x0, pred_eps=pred_eps)
