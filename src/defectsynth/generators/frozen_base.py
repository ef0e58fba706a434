"""The first step of every fit that trains on the run's diffusion base: the base, loaded and frozen."""

from __future__ import annotations

from defectsynth.core.devices import compute_device
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.generators.base import FitContext


def frozen_base(method: str, context: FitContext) -> DiffusionModel:
    """The context's base on the compute device, in eval mode, every network frozen; the fit unfreezes what it trains.

    Refuses a context without a base, and companion products: these methods fit one model per product.
    """
    if context.base_model is None:
        msg = f"{method} needs a diffusion base model (FitContext.base_model)"
        raise ValueError(msg)
    if context.companions:
        msg = f"{method} fits one model per product; companion products are not supported"
        raise ValueError(msg)
    model = load_base_model(context.base_model).to(compute_device()).eval()
    for network in model.networks():
        network.requires_grad_(False)
    return model
