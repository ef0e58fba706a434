"""CADiff's Self-Adaptive Interactive Module (SAIM, paper 004, Eqs. 9-10) and the noise predictor that uses it.

A plain ControlNet adds its trainable copy's zero-convolved output y_c to the locked U-Net's feature y. SAIM
fuses them instead: ``y_a = CrossAttn(RMSNorm(y), RMSNorm(y_c))``, queries from y and keys and values from y_c,
one token per pixel (Eq. 9), then ``y_f = concat(y, y + MLP(y_a))`` (Eq. 10). The paper leaves open how the
doubled channels are consumed; ours: the projection is a 1x1 convolution from 2C to C, zero-initialised, added
to y (``out = y + proj(y_f)``), so a fresh SAIM changes nothing, as ControlNet's zero convolutions do.

Wiring: ``SAIMPredictor`` runs the ControlNet, then the U-Net once with forward hooks that replace each skip
feature (conv_in's output, every down block's res samples) and the mid block's output by its fusion: exactly
where diffusers would add the ControlNet's residuals. As with a plain ControlNet, the down pass itself runs on
unfused features: the down blocks hand on their hidden state untouched, and a pre-hook gives the first down
block conv_in's own output, so only the skip copies (and the mid output) change.

Example:
    >>> fusion = SAIMFusion.for_model(model)  # doctest: +SKIP
    >>> predictor = SAIMPredictor(image=mask_image(mask), fusion=fusion)  # doctest: +SKIP
    >>> latents = denoise(model, latents, cond, sampler=sampler, predictor=predictor)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812

from defectsynth.diffusion.controlnet import PART, ControlNetPredictor

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from defectsynth.diffusion.model import DiffusionModel


class RMSNorm(torch.nn.Module):
    """RMSNorm (Zhang and Sennrich 2019) over the channels of (B, C, H, W), with a learnable per-channel scale."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each pixel's channel vector over its root mean square, times the scale; in float32 (no fp16 overflow)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=1, keepdim=True) + self.eps)
        return (normed * self.weight.float().view(1, -1, 1, 1)).to(x.dtype)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as one token per pixel, (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens (B, H*W, C) back to ``like``'s (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(like.shape)


class SAIM(torch.nn.Module):
    """Fuses a locked U-Net feature y with a ControlNet residual y_c (Eqs. 9-10); see the module docstring.

    The projection is a 1x1 convolution from 2C to C, zero-initialised, added to y: at initialisation out == y.
    """

    def __init__(self, channels: int, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            msg = f"heads {heads} must divide channels {channels}"
            raise ValueError(msg)
        self.channels, self.heads = channels, heads
        self.norm_y, self.norm_c = RMSNorm(channels), RMSNorm(channels)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(channels, channels) for _ in range(3))
        self.to_out = torch.nn.Linear(channels, channels)
        hidden = channels * mlp_ratio
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(channels, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, channels)
        )
        self.proj = torch.nn.Conv2d(2 * channels, channels, kernel_size=1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) to (B, heads, N, C / heads)."""
        batch, length, _ = tokens.shape
        return tokens.view(batch, length, self.heads, -1).transpose(1, 2)

    def attend(self, y: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        """Eq. 9 as tokens (B, H*W, C): queries from RMSNorm(y), keys and values from RMSNorm(y_c)."""
        query = self.split_heads(self.to_q(to_tokens(self.norm_y(y))))
        control = to_tokens(self.norm_c(y_c))
        key, value = self.split_heads(self.to_k(control)), self.split_heads(self.to_v(control))
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.to_out(attended.transpose(1, 2).flatten(2))

    def forward(self, y: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        """The fused feature (B, C, H, W): ``y + proj(concat(y, y + MLP(y_a)))``."""
        if y.shape != y_c.shape or y.dim() != 4 or y.shape[1] != self.channels:
            msg = f"y {tuple(y.shape)} and y_c {tuple(y_c.shape)} must both be (B, {self.channels}, H, W)"
            raise ValueError(msg)
        mixed = y + from_tokens(self.mlp(self.attend(y, y_c)), y)
        return y + self.proj(torch.cat([y, mixed], dim=1))  # Eq. 10, then our zero-initialised projection


def skip_widths(unet: UNet2DConditionModel) -> list[int]:
    """The channels of the U-Net's skip features in diffusers' order: conv_in's output, then each down block's."""
    widths = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        widths += [resnet.out_channels for resnet in block.resnets]
        widths += [downsampler.out_channels for downsampler in block.downsamplers or ()]
    return widths


class SAIMFusion(torch.nn.Module):
    """One SAIM per ControlNet residual: the skip features' (conv_in's, then the down blocks', in order), the mid's."""

    def __init__(self, widths: Sequence[int], mid_width: int, heads: int = 4) -> None:
        super().__init__()
        if not widths:
            msg = "SAIMFusion needs at least one skip width"
            raise ValueError(msg)
        self.down = torch.nn.ModuleList(SAIM(width, heads) for width in widths)
        self.mid = SAIM(mid_width, heads)

    @classmethod
    def for_model(cls, model: DiffusionModel, heads: int = 4) -> SAIMFusion:
        """Fresh SAIMs shaped for the model's U-Net (and so for its ControlNet), on its device and in its dtype."""
        unet = model.unet
        if unet.mid_block is None:
            msg = "SAIM needs a U-Net with a mid block (a ControlNet adds a residual there)"
            raise ValueError(msg)
        fusion = cls(skip_widths(unet), unet.config.block_out_channels[-1], heads)
        return fusion.to(device=model.device, dtype=model.dtype)

    @property
    def widths(self) -> tuple[int, ...]:
        """The skip features' channels, in diffusers' order."""
        return tuple(saim.channels for saim in self.down)

    def saims(self) -> list[SAIM]:
        """Every SAIM: the skip features' in order, then the mid block's."""
        return [*self.down, self.mid]

    def fuse(
        self, features: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor], start: int = 0
    ) -> list[torch.Tensor]:
        """Each feature fused with its residual by the SAIMs from position ``start`` of ``saims()`` on.

        With ``start=0`` and all of them: the skip features in diffusers' order, then the mid block's output.
        """
        saims = self.saims()
        if len(features) != len(residuals) or not 0 <= start <= start + len(features) <= len(saims):
            msg = f"{len(features)} features and {len(residuals)} residuals from SAIM {start} of {len(saims)}"
            raise ValueError(msg)
        return [saim(y, y_c.to(y)) for saim, y, y_c in zip(saims[start:], features, residuals, strict=False)]


@dataclass
class SkipFusion:
    """The hooks of one U-Net call that fuse its skip features and mid output with a ControlNet's residuals."""

    fusion: SAIMFusion
    down: Sequence[torch.Tensor]
    mid: torch.Tensor
    cursor: int = 0  # the next skip feature's position
    unfused: torch.Tensor | None = None  # conv_in's own output, for the first down block
    fused: torch.Tensor | None = None  # its fusion: the skip copy

    def conv_in(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook: conv_in's output becomes its fusion, which diffusers keeps as the first skip feature."""
        self.unfused = output
        self.fused = self.fusion.fuse([output], self.down[:1])[0]
        self.cursor = 1
        return self.fused

    def first_block_input(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Pre-hook: the first down block gets conv_in's own output; only the skip copy is fused."""
        given = kwargs.get("hidden_states", args[0] if args else None)
        if given is not self.fused:
            msg = "the first down block did not get conv_in's output: diffusers' U-Net is wired differently"
            raise RuntimeError(msg)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self.unfused}
        return (self.unfused, *args[1:]), kwargs

    def down_block(
        self, module: torch.nn.Module, args: tuple[Any, ...], output: tuple[torch.Tensor, tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Forward hook: the block's res samples become their fusions; the hidden state it hands on stays."""
        hidden, res_samples = output
        end = self.cursor + len(res_samples)
        fused = self.fusion.fuse(res_samples, self.down[self.cursor : end], start=self.cursor)
        self.cursor = end
        return hidden, tuple(fused)

    def mid_block(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the mid block's output becomes its fusion with the mid residual."""
        if self.cursor != len(self.down):
            msg = f"the U-Net made {self.cursor} skip features, the ControlNet {len(self.down)} residuals"
            raise RuntimeError(msg)
        return self.fusion.fuse([output], [self.mid], start=len(self.fusion.down))[0]


@contextmanager
def fused_skips(unet: UNet2DConditionModel, hooks: SkipFusion) -> Iterator[None]:
    """Register ``hooks`` on the U-Net for the calls inside the block; they are removed on leaving it."""
    handles = [
        unet.conv_in.register_forward_hook(hooks.conv_in),
        unet.down_blocks[0].register_forward_pre_hook(hooks.first_block_input, with_kwargs=True),
        *(block.register_forward_hook(hooks.down_block) for block in unet.down_blocks),
        unet.mid_block.register_forward_hook(hooks.mid_block),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True, eq=False)
class SAIMPredictor:
    """The U-Net with a ControlNet's residuals fused by SAIM: a ``NoisePredictor`` for ``denoise(predictor=...)``.

    Attributes:
        image: the conditioning image (B or 1, C, H, W) at the model's resolution (``mask_image`` gives one).
        fusion: the SAIMs, one per ControlNet residual (``SAIMFusion.for_model``).
        scale: the ControlNet's conditioning scale, applied to its residuals before they are fused.
        part: the model part that holds the ControlNet.
    """

    image: torch.Tensor
    fusion: SAIMFusion
    scale: float = 1.0
    part: str = PART
    _control: ControlNetPredictor = field(init=False, repr=False)  # runs the ControlNet; caches the moved image

    def __post_init__(self) -> None:
        object.__setattr__(self, "_control", ControlNetPredictor(image=self.image, scale=self.scale, part=self.part))

    def __call__(
        self, model: DiffusionModel, latents: torch.Tensor, timestep: int | torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """ControlNet, then the U-Net with fused skips in the model's dtype; the output in ``latents``' dtype."""
        sample, context, down, mid = self._control.residuals(model, latents, timestep, context)
        if len(down) != len(self.fusion.down):
            msg = f"the ControlNet gives {len(down)} down residuals, the fusion has {len(self.fusion.down)} SAIMs"
            raise ValueError(msg)
        with fused_skips(model.unet, SkipFusion(self.fusion, down, mid)):
            out = model.unet(sample, timestep, encoder_hidden_states=context)
        return out.sample.to(latents.dtype)
