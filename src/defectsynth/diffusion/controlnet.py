"""A ControlNet as an extra part of the diffusion model, and the noise predictor that uses it.

The ControlNet lives in ``DiffusionModel.parts["controlnet"]`` (saved in ``controlnet/``, diffusers'
layout). ``ControlNetPredictor`` is a ``sampling.NoisePredictor``: handed to ``denoise`` (or BADG's
inversion) as ``predictor=``, it runs the ControlNet on its conditioning image and the U-Net with the
ControlNet's residuals, as diffusers' ``StableDiffusionControlNetPipeline`` does, so a method such as
CADiff adds a ControlNet without a sampling loop of its own.

Example:
    >>> model.parts["controlnet"] = new_controlnet(model)  # doctest: +SKIP
    >>> predictor = ControlNetPredictor(image=mask_image(mask), scale=1.0)  # doctest: +SKIP
    >>> latents = denoise(model, latents, cond, sampler=sampler, predictor=predictor)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import ControlNetModel

if TYPE_CHECKING:
    from defectsynth.diffusion.model import DiffusionModel

PART = "controlnet"
EMBEDDING_WIDTHS = (16, 32, 96, 256)  # diffusers' conditioning-embedding widths: three stride-2 steps for SD's 8x


def new_controlnet(model: DiffusionModel, *, conditioning_channels: int = 3) -> ControlNetModel:
    """A ControlNet copied from the model's U-Net (its output convolutions zero, so it adds nothing yet).

    Its conditioning embedding downsamples an image at the model's resolution to the latents' size.
    """
    downsamplings = model.latent_scale.bit_length() - 1
    if downsamplings >= len(EMBEDDING_WIDTHS):
        msg = f"no ControlNet conditioning embedding for a latent scale of {model.latent_scale}"
        raise ValueError(msg)
    controlnet = ControlNetModel.from_unet(
        model.unet,
        conditioning_embedding_out_channels=EMBEDDING_WIDTHS[: downsamplings + 1],
        conditioning_channels=conditioning_channels,
    )
    return controlnet.to(device=model.device, dtype=model.dtype)


def mask_image(mask: torch.Tensor) -> torch.Tensor:
    """A mask (B, 1, H, W) in [0, 1] as a 3-channel conditioning image (B, 3, H, W), as ControlNets take them."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        msg = f"mask {tuple(mask.shape)} must be (B, 1, H, W)"
        raise ValueError(msg)
    return mask.float().expand(-1, 3, -1, -1)


def tile_batch(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``tensor`` for a batch of ``batch``: a batch of 1 is expanded, a batch dividing it is repeated whole.

    Repeating whole batches matches the loops' doubled batches ([uncond; cond], BADG's [C2; C1]).
    """
    size = tensor.shape[0]
    if size == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if batch % size:
        msg = f"{name} has batch {size}, expected 1 or a divisor of {batch}"
        raise ValueError(msg)
    return tensor.repeat(batch // size, *([1] * (tensor.dim() - 1)))


@dataclass(frozen=True)
class ControlNetPredictor:
    """The U-Net with a ControlNet's residuals: a ``NoisePredictor`` for ``denoise(predictor=...)``.

    Attributes:
        image: the conditioning image (B or 1, C, H, W) at the model's resolution, in the range the
            ControlNet was trained on (diffusers' pipelines feed [0, 1]; ``mask_image`` gives one).
        scale: the ControlNet's conditioning scale (0 leaves the U-Net's output unchanged).
        part: the model part that holds the ControlNet.
    """

    image: torch.Tensor
    scale: float = 1.0
    part: str = PART
    _moved: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # the tiled image on the ControlNet, made on the first step that needs it (see ``conditioning``)

    def conditioning(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The image tiled to ``batch`` on ``device`` in ``dtype``, made once and reused.

        Every denoising step asks for the same tensor; copying it from the CPU each step would make a
        GPU wait for the copy, so it is cached per (batch, device, dtype).
        """
        key = (batch, device, dtype)
        if key not in self._moved:
            self._moved[key] = tile_batch(self.image, batch, "image").to(device, dtype)
        return self._moved[key]

    def residuals(
        self, model: DiffusionModel, latents: torch.Tensor, timestep: int | torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """The ControlNet's down and mid residuals, with the latents and context in the model's dtype.

        Returns (sample, context, down residuals, mid residual), what a U-Net call with them needs.
        """
        controlnet = model.part(self.part)
        sample, context = latents.to(model.device, model.dtype), context.to(model.dtype)
        image = self.conditioning(latents.shape[0], controlnet.device, controlnet.dtype)
        down, mid = controlnet(
            sample,
            timestep,
            encoder_hidden_states=context,
            controlnet_cond=image,
            conditioning_scale=self.scale,
            return_dict=False,
        )
        return sample, context, down, mid

    def __call__(
        self, model: DiffusionModel, latents: torch.Tensor, timestep: int | torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """ControlNet then U-Net in the model's dtype; the output comes back in ``latents``' dtype."""
        sample, context, down, mid = self.residuals(model, latents, timestep, context)
        out = model.unet(
            sample,
            timestep,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
        return out.sample.to(latents.dtype)
