"""DPM-Solver++(2M) (Lu et al., 2022) as a sampler with ``DDIMSampler``'s contract: the sampler SeaS's authors use.

A multistep ODE solver on the data prediction x_0: each step combines this step's x_0 prediction with the
previous step's, in λ = log(α/σ) (α = sqrt(ᾱ), σ = sqrt(1 - ᾱ)). It follows diffusers'
``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
``solver_type="midpoint"`` and ``lower_order_final=True``, on the schedule of its ``timestep_spacing`` as
``DDIMSampler`` spaces it, and the last step lands on ᾱ_0 (diffusers' ``final_sigmas_type="sigma_min"``).

The first step of a run is first order, which is DDIM with η = 0, and so is a step whose previous call was not
the schedule's previous timestep: a run that starts mid-schedule (``noised_start``) or a second run on the same
sampler never mixes in a stale x_0.

Example:
    >>> import torch
    >>> sampler = DPMSolverSampler(alphas_cumprod=torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))
    >>> sampler.set_timesteps(4)
    >>> out = sampler.step(torch.zeros(1, 4, 8, 8), 751, torch.randn(1, 4, 8, 8))
    >>> out.prev_sample.shape
    torch.Size([1, 4, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from defectsynth.diffusion.ddim import FINAL, DDIMSampler, DDIMStepOutput

if TYPE_CHECKING:
    from defectsynth.diffusion.latent_range import LatentRange

LOWER_ORDER_FINAL_BELOW = 15  # diffusers: with fewer steps than this, the last step is first order


@dataclass(frozen=True)
class _Previous:
    """The step before: its timestep and x_0 prediction (the multistep's history)."""

    timestep: int
    pred_x0: torch.Tensor


class DPMSolverSampler(DDIMSampler):
    """Deterministic DPM-Solver++(2M) over a fixed training schedule; see the module docstring.

    Takes ``DDIMSampler``'s arguments; η must be 0 (an ODE solver has no stochastic term).
    """

    name = "dpm_solver++"

    def __init__(self, *, eta: float = 0.0, **schedule: Any) -> None:
        """Build a sampler from ``DDIMSampler``'s keyword arguments (``eta`` is there for ``config`` round trips)."""
        if eta != 0.0:
            msg = f"DPMSolverSampler is deterministic: eta must be 0, got {eta}"
            raise ValueError(msg)
        super().__init__(**schedule)
        self._last: _Previous | None = None

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the timesteps as ``DDIMSampler`` does, and forget the previous run's history."""
        super().set_timesteps(num_inference_steps, device)
        self._last = None

    def _lambda(self, timestep: int) -> torch.Tensor:
        """λ_t = log(α_t / σ_t), in float64."""
        alpha = self.alpha_bar(timestep)
        return 0.5 * (alpha.log() - (1 - alpha).log())

    def _second_order(self, timestep: int, prev_t: int, sample: torch.Tensor) -> _Previous | None:
        """The previous step to combine with, or None where this step is first order."""
        last = self._last
        if last is None or self.prev_timestep(last.timestep) != timestep or last.pred_x0.shape != sample.shape:
            return None
        if prev_t == FINAL and len(self.timesteps) < LOWER_ORDER_FINAL_BELOW:
            return None
        return last

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        *,
        generators: Sequence[torch.Generator] | None = None,
        x0_range: LatentRange | None = None,
    ) -> DDIMStepOutput:
        """One reverse step x_t -> x_{t_prev}: first order (DDIM) or the 2M midpoint update.

        ``generators`` is accepted for the contract and unused. ``x0_range`` clamps this step's x_0 prediction
        before it enters the update and the history.
        """
        t, prev_t = int(timestep), self.prev_timestep(timestep)
        pred_x0, pred_eps = self.predictions(model_output, t, sample, x0_range)
        alpha_t, alpha_prev = self._coefficient(t, sample), self._coefficient(prev_t, sample)
        h = (self._lambda(prev_t) - self._lambda(t)).to(sample.dtype)
        decay = torch.expm1(-h)  # e^{-h} - 1
        direction = pred_x0
        previous = self._second_order(t, prev_t, sample)
        if previous is not None:
            ratio = (self._lambda(t) - self._lambda(previous.timestep)).to(sample.dtype) / h  # r = h_{i-1} / h_i
            direction = pred_x0 + (pred_x0 - previous.pred_x0) / (2 * ratio)
        prev_sample = ((1 - alpha_prev) / (1 - alpha_t)).sqrt() * sample - alpha_prev.sqrt() * decay * direction
        self._last = _Previous(t, pred_x0)
        return DDIMStepOutput(prev_sample=prev_sample, pred_x0=pred_x0, pred_eps=pred_eps)
