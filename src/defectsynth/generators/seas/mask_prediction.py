"""SeaS's Refined Mask Prediction (RMP) branch (paper 002, Sec. 3.3, Eq. 7; appendix A.5 Tables 6, 16, 17).

Coarse Feature Extraction compresses the U-Net up-2 and up-3 outputs with 1x1 convs, upsamples the first,
concatenates them and fuses them with self-attention transformer layers into F-hat; a BN-ReLU-3x3 head gives the
coarse 2-class mask. Cascaded Mask Refinement Modules (MRM) then lift F-hat to the resolution of the VAE-decoder
up-block features, gating it with them, and the same head (its own if the widths differ) gives the refined mask.
Normal images skip the MRMs: their refined mask is the coarse one upsampled, and both are supervised with zeros
(focal loss, Eq. 7).

Where we depart from the authors' code: each MRM ends with the 3x3 fuse conv the paper describes (the released
module defines it but never calls it), and coarse targets are max-pooled, so a 1-px defect keeps its coarse cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import Transformer2DModel
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

EPS = 1e-5  # floor of p_t inside the focal loss's log (the authors smooth by the same 1e-5)


class MaskPredictionSettings(BaseModel):
    """Architecture, loss and binarisation of the RMP branch (paper values noted)."""

    model_config = ConfigDict(extra="forbid")

    coarse_channels: tuple[int, int] = Field(
        (128, 64),
        description="1x1-conv widths of the U-Net up-2 (low-res) and up-3 (high-res) features (paper: 128, 64)",
    )
    transformer_layers: int = Field(4, ge=1, description="self-attention transformer layers fusing F-hat (paper: 4)")
    attention_heads: int = Field(8, ge=1, description="heads of those layers (authors' code: 8)")
    refine_channels: int = Field(192, ge=1, description="width inside the MRMs (paper: 192, F-hat's width)")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups of the transformer; must divide F-hat's width")
    refinement: Literal["cascade", "coarse_only"] = Field(
        "cascade", description="'coarse_only' drops the MRMs (paper Table 6 row 1: CMS only)"
    )
    # The authors' BatchNorm sees 2 abnormal rows per step in the MRMs: its running averages did not match the
    # features at generation, and the refined masks covered most of the image (docs/tier_runs.md, "seas in the tier").
    normalization: Literal["group", "batch"] = Field(
        "group", description="normalisation of the conv blocks: 'group' (ours, batch-independent) or 'batch' (authors')"
    )
    focal_gamma: float = Field(2.0, ge=0, description="focusing exponent of the focal loss")
    learning_rate: float = Field(5e-4, gt=0, description="learning rate of the RMP branch (paper: 5e-4)")
    threshold: float = Field(0.2, gt=0, lt=1, description="tau on the defect channel of the refined mask (paper: 0.2)")


@dataclass(frozen=True)
class MaskPrediction:
    """Softmax probabilities (channel 1 = defect) of the coarse and the refined mask."""

    coarse: torch.Tensor  # (B, 2, r, r) at the high-res U-Net feature's resolution
    refined: torch.Tensor  # (B, 2, H, W) at output_size


def _norm(channels: int, settings: MaskPredictionSettings) -> nn.Module:
    """BatchNorm (the authors') or GroupNorm with the largest group count dividing both ``norm_groups`` and width."""
    if settings.normalization == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(settings.norm_groups, channels), channels)


def _conv_block(
    in_channels: int, out_channels: int, kernel_size: int, settings: MaskPredictionSettings
) -> nn.Sequential:
    """Conv (no bias) + norm + ReLU, the authors' unit block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        _norm(out_channels, settings),
        nn.ReLU(),
    )


def _bottleneck(channels: int, settings: MaskPredictionSettings) -> nn.Sequential:
    """One of the MRM's chained conv blocks: 1x1, 3x3, 1x1."""
    return nn.Sequential(*(_conv_block(channels, channels, k, settings) for k in (1, 3, 1)))


def _output_head(channels: int, settings: MaskPredictionSettings) -> nn.Sequential:
    """Norm + ReLU + 3x3 conv to the two classes (normal, defect); logits."""
    return nn.Sequential(_norm(channels, settings), nn.ReLU(), nn.Conv2d(channels, 2, kernel_size=3, padding=1))


def _resize(tensor: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size``; a no-op when the size already matches."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(tensor.shape[-2:]) == target:
        return tensor
    return F.interpolate(tensor, size=target, mode="bilinear", align_corners=False)


class _RefinementModule(nn.Module):
    """One MRM: upsample the discriminative feature, refine it with conv blocks, gate it with a VAE feature."""

    def __init__(self, in_channels: int, vae_channels: int, settings: MaskPredictionSettings) -> None:
        super().__init__()
        width = settings.refine_channels
        # A 1x1 conv commutes with bilinear upsampling, so project at the cheaper low resolution.
        self.project = nn.Conv2d(in_channels, width, 1, bias=False) if in_channels != width else nn.Identity()
        self.chain_1 = _bottleneck(width, settings)
        self.chain_2 = _bottleneck(width, settings)
        self.local = _conv_block(width, width, 1, settings)
        self.vae = _conv_block(vae_channels, width, 1, settings)
        # The paper's 3x3 fuse conv; the authors' code defines one (conv6) but never calls it.
        self.fuse = _conv_block(width, width, 3, settings)

    def forward(self, feature: torch.Tensor, vae_feature: torch.Tensor) -> torch.Tensor:
        """Refine ``feature`` to ``vae_feature``'s resolution, (B, width, h, w)."""
        upsampled = _resize(self.project(feature), tuple(vae_feature.shape[-2:]))
        first = self.chain_1(upsampled)
        summed = first + self.chain_2(first) + self.local(upsampled)
        gated = self.vae(vae_feature) * summed
        return self.fuse(gated + upsampled)


class RefinedMaskPrediction(nn.Module):
    """The RMP branch: U-Net up-block features (+ VAE-decoder up-block features) -> coarse and refined masks."""

    def __init__(
        self, unet_channels: tuple[int, int], vae_channels: tuple[int, ...], settings: MaskPredictionSettings
    ) -> None:
        super().__init__()
        width = sum(settings.coarse_channels)
        _check_widths(width, settings)
        if settings.refinement == "cascade" and not vae_channels:
            msg = "refinement 'cascade' needs at least one VAE feature channel count, got none"
            raise ValueError(msg)
        self.settings = settings
        self.vae_channels = tuple(vae_channels)
        self.compress_low = nn.Conv2d(unet_channels[0], settings.coarse_channels[0], 1, bias=False)
        self.compress_high = nn.Conv2d(unet_channels[1], settings.coarse_channels[1], 1, bias=False)
        heads = settings.attention_heads
        self.fusion = Transformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=width,
            num_layers=settings.transformer_layers,
            cross_attention_dim=None,
            norm_num_groups=settings.norm_groups,
        )
        self.head = _output_head(width, settings)
        self.refiners = nn.ModuleList()
        self.refined_head: nn.Module | None = None
        if settings.refinement == "cascade":
            widths = [width] + [settings.refine_channels] * (len(vae_channels) - 1)
            self.refiners.extend(_RefinementModule(w, v, settings) for w, v in zip(widths, vae_channels, strict=True))
            # The head is shared as in the authors' code; only a different MRM width needs a head of its own.
            if settings.refine_channels != width:
                self.refined_head = _output_head(settings.refine_channels, settings)

    def forward(
        self,
        unet_features: Sequence[torch.Tensor],
        vae_features: Sequence[torch.Tensor],
        output_size: int,
        *,
        normal: torch.Tensor | None = None,
    ) -> MaskPrediction:
        """Predict the masks; rows flagged ``normal`` (bool (B,)) get the coarse mask upsampled as refined."""
        feature = self._coarse_feature(unet_features)
        coarse = self.head(feature).softmax(dim=1)
        batch = feature.shape[0]
        if self.settings.refinement == "coarse_only":
            return MaskPrediction(coarse=coarse, refined=_resize(coarse, output_size))
        self._check_vae_features(vae_features, batch)
        abnormal = None if normal is None else ~_rows(normal, batch)
        if abnormal is None or bool(abnormal.all()):
            return MaskPrediction(coarse=coarse, refined=self._refine(feature, vae_features, output_size))
        refined = _resize(coarse, output_size)
        if bool(abnormal.any()):
            rows = self._refine(feature[abnormal], [v[abnormal] for v in vae_features], output_size)
            refined = refined.index_put((abnormal,), rows)
        return MaskPrediction(coarse=coarse, refined=refined)

    def _coarse_feature(self, unet_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """F-hat: compressed, aligned, concatenated and transformer-fused U-Net features."""
        if len(unet_features) != 2:
            msg = f"expected 2 U-Net features (low-res F1, high-res F2), got {len(unet_features)}"
            raise ValueError(msg)
        low, high = unet_features
        high = self.compress_high(high)
        low = _resize(self.compress_low(low), tuple(high.shape[-2:]))
        return self.fusion(torch.cat([low, high], dim=1), return_dict=False)[0]

    def _refine(self, feature: torch.Tensor, vae_features: Sequence[torch.Tensor], output_size: int) -> torch.Tensor:
        """Run the MRM cascade and the head; probabilities at ``output_size``."""
        for refiner, vae_feature in zip(self.refiners, vae_features, strict=True):
            feature = refiner(feature, vae_feature)
        head = self.refined_head if self.refined_head is not None else self.head
        return _resize(head(feature).softmax(dim=1), output_size)

    def _check_vae_features(self, vae_features: Sequence[torch.Tensor], batch: int) -> None:
        channels = tuple(v.shape[1] for v in vae_features)
        if channels != self.vae_channels:
            msg = f"VAE features have channels {channels}, the MRM cascade expects {self.vae_channels}"
            raise ValueError(msg)
        if any(v.shape[0] != batch for v in vae_features):
            msg = f"VAE feature batch sizes {[v.shape[0] for v in vae_features]} differ from the U-Net's {batch}"
            raise ValueError(msg)


def _check_widths(width: int, settings: MaskPredictionSettings) -> None:
    """F-hat's width must split evenly into attention heads and GroupNorm groups."""
    for name in ("attention_heads", "norm_groups"):
        divisor = getattr(settings, name)
        if width % divisor:
            msg = f"F-hat width {width} (coarse_channels {settings.coarse_channels}) not divisible by {name} {divisor}"
            raise ValueError(msg)


def _rows(normal: torch.Tensor, batch: int) -> torch.Tensor:
    """Validate the per-row normal flags: bool, shape (B,)."""
    if normal.dtype != torch.bool or normal.shape != (batch,):
        msg = f"normal must be a bool tensor of shape ({batch},), got {normal.dtype} {tuple(normal.shape)}"
        raise ValueError(msg)
    return normal


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)^gamma log p_t`` of softmax ``probabilities`` (B, 2, H, W).

    ``target`` is (B, 1, H, W) or (B, H, W); values above 0.5 are defect. p_t is floored at 1e-5 inside the log.
    """
    if probabilities.dim() != 4 or probabilities.shape[1] != 2:
        msg = f"probabilities must be (B, 2, H, W), got {tuple(probabilities.shape)}"
        raise ValueError(msg)
    labels = target.squeeze(1) if target.dim() == 4 else target
    batch, _, height, width = probabilities.shape
    if tuple(labels.shape) != (batch, height, width):
        msg = f"target {tuple(target.shape)} does not match probabilities {tuple(probabilities.shape)}"
        raise ValueError(msg)
    p_t = probabilities.gather(1, (labels > 0.5).long().unsqueeze(1)).squeeze(1)
    return (-((1 - p_t) ** gamma) * torch.log(p_t.clamp(min=EPS))).mean()


def coarse_target(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Image-resolution masks (B, 1, H, W) -> (B, 1, side, side), a cell defect when any of its pixels is.

    Our choice: the authors resize bilinearly and floor, which loses defects thinner than a cell (cracks, scratches);
    adaptive max pooling keeps them.
    """
    return F.adaptive_max_pool2d((masks > 0.5).float(), side)


def mask_prediction_loss(
    prediction: MaskPrediction, masks: torch.Tensor, normal: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Paper Eq. 7: focal loss of the coarse and the refined mask; ``normal`` rows (bool (B,)) get all-zero targets.

    ``masks`` are (B, 1, H, W) at the refined (output) resolution.
    """
    if tuple(masks.shape[-2:]) != tuple(prediction.refined.shape[-2:]):
        msg = f"masks {tuple(masks.shape)} are not at the refined resolution {tuple(prediction.refined.shape)}"
        raise ValueError(msg)
    keep = (~_rows(normal, masks.shape[0])).float().view(-1, 1, 1, 1)
    targets = (masks > 0.5).float() * keep
    side = prediction.coarse.shape[-1]
    return focal_loss(prediction.coarse, coarse_target(targets, side), gamma) + focal_loss(
        prediction.refined, targets, gamma
    )


def binary_mask(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Defect channel strictly above ``threshold`` (as the authors' pipeline): bool (B, H, W)."""
    return probabilities[:, 1] > threshold
