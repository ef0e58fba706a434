"""Settings of the downstream evaluation as plain pydantic data (no torch), so the run config can hold them.

The detectors' own modules (``classifier``, ``diffusionad``) build models from these; ``QualitySettings``
points at the local feature-network weights the generation-quality metrics need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ClassifierConfig(BaseModel):
    """Hyper-parameters of the anomaly-type classifier and its optimiser.

    The architecture fields (``depth``, ``width``) and the class names rebuild the model exactly
    (``classifier.build_classifier``); ``lr`` and ``weight_decay`` feed ``classifier.configure_optimizer``;
    ``augment`` makes the job call ``classifier.augment_batch``. Batch size and steps are in ``evaluate``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: Literal[18, 34] = Field(18, description="ResNet depth: 18 per paper 000's Table 4 caption, 34 per text")
    width: int = Field(64, ge=4, description="ResNet channel scale; torchvision: 64; the demo uses less")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (Adam's usual 1e-3, for training from scratch)")
    weight_decay: float = Field(1e-4, ge=0, description="Adam's L2 penalty (the ResNet-recipe 1e-4)")
    pretrained_path: str | None = Field(
        None, description="local torchvision ResNet state dict; None = train from scratch (the platform default)"
    )
    augment: bool = Field(True, description="random flips and quarter turns per training sample (augment_batch)")


class DiffusionADConfig(BaseModel):
    """Hyper-parameters of DiffusionAD: architecture, diffusion, losses, optimiser and synthetic anomalies.

    The defaults are small enough to train on a CPU; :meth:`paper` gives the paper's architecture. Paper and
    released-code values are noted per field; the module docstring lists where they differ and why.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int | None = Field(
        None, ge=16, description="side it trains and infers at (maps resized back); None = the run's resolution"
    )

    # --- reconstruction sub-network (diffusers UNet2DModel) ---
    block_out_channels: tuple[int, ...] = Field(
        (32, 64, 64), min_length=1, description="U-Net width per level; paper/ADM at 256 px: (1,1,2,2,4,4) x 128"
    )
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per level (ADM: 2)")
    attention_levels: tuple[int, ...] = Field(
        (-1,), description="levels with self-attention (level i at H/2^i; negatives from the lowest); paper (3,4,5)"
    )
    attention_head_dim: int = Field(16, ge=1, description="channels per attention head (paper: 4 heads = 64 at 256)")
    mid_attention: bool = Field(True, description="self-attention in the middle block (ADM)")
    norm_num_groups: int | None = Field(
        None, ge=1, description="GroupNorm groups; None = the largest of 32, 16, ... dividing every width"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="ResNet-block dropout (code: 0)")

    # --- diffusion ---
    num_train_timesteps: int = Field(1000, ge=2, description="T (paper: 1000)")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="linear β_1 (paper and code: 1e-4)")
    beta_end: float = Field(0.02, gt=0, lt=1, description="linear β_T: code 0.02; the paper writes 1e-2")
    tau: int = Field(300, ge=1, description="τ: training t_s ~ U{0..τ-1}, t_b ~ U{τ..t_b_max-1} (code: 300)")
    t_b_max: int | None = Field(
        None, description="exclusive upper bound of the training t_b; None = T (code); 600 = args1.json's unread range"
    )
    t_s: int = Field(200, ge=0, description="inference small noise level (code: eval_normal_t = 200)")
    t_b: int = Field(400, ge=1, description="inference big noise level (code: eval_noisier_t = 400)")
    w: float = Field(1.0, description="norm-guidance weight of Eq. 7 (paper: 1)")
    clip_reconstruction: bool = Field(True, description="clamp x̂_{0_g} to [-1, 1] (code), i.e. the output to [0, 1]")
    detach_reconstruction: bool = Field(
        False, description="stop L_mask's gradient into the denoiser through x̂_{0_g} (paper/code: False, joint)"
    )

    # --- segmentation sub-network (DRAEM's discriminative U-Net, 6 input channels) ---
    seg_base_width: int = Field(16, ge=1, description="first encoder width (code/DRAEM: 64)")
    seg_depth: int = Field(4, ge=2, le=8, description="encoder blocks (code/DRAEM: 6)")

    # --- losses (Eq. 9-11) and score ---
    focal_weight: float = Field(5.0, ge=0, description="γ of Eq. 10, the focal term's weight in L_mask (paper: 5)")
    focal_gamma: float = Field(4.0, ge=0, description="focal exponent (code's BinaryFocalLoss: 4)")
    focal_alpha: float | None = Field(0.5, ge=0, le=1, description="focal class weight (code: 0.5 on both classes)")
    smooth_l1_beta: float = Field(1.0, gt=0, description="SmoothL1 transition point (torch/code default 1)")
    top_k: int = Field(50, ge=1, description="image score = mean of the top-k anomaly-map pixels (paper: 50)")

    # --- optimiser and schedule (read by the training job) ---
    lr: float = Field(
        1e-4, gt=0, description="Adam learning rate (paper: 1e-4, for 3000 epochs; a few hundred CPU steps need 1e-3)"
    )
    seg_lr: float | None = Field(None, gt=0, description="segmenter lr; None = lr (paper); code: 1e-5")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay (code: 0)")

    # --- synthetic anomalies (Eq. 12) ---
    beta_range: tuple[float, float] = Field(
        (0.2, 0.8), description="β ~ U(range), the weight of N inside M (code: 0.2-0.8; paper: unstated)"
    )
    perlin_threshold: float = Field(0.5, description="Perlin noise above this is the mask (code/DRAEM: 0.5)")
    perlin_scale_exponents: tuple[int, int] = Field((0, 6), description="Perlin cells per axis 2^k, k in [lo, hi)")
    perlin_min_area: int = Field(16, ge=1, description="smallest mask in pixels after the foreground")
    perlin_max_attempts: int = Field(50, ge=1, description="Perlin fields tried per sample (code: 50)")

    @model_validator(mode="after")
    def _check(self) -> DiffusionADConfig:
        levels = len(self.block_out_channels)
        if min(self.block_out_channels) < 1:
            msg = f"block_out_channels must be positive, got {self.block_out_channels}"
            raise ValueError(msg)
        if any(not -levels <= level < levels for level in self.attention_levels):
            msg = f"attention_levels {self.attention_levels} out of range for {levels} levels"
            raise ValueError(msg)
        if len(set(self.resolved_attention_levels)) != len(self.attention_levels):
            msg = f"attention_levels {self.attention_levels} name a level twice"
            raise ValueError(msg)
        if self.norm_num_groups is not None and any(c % self.norm_num_groups for c in self.block_out_channels):
            msg = f"norm_num_groups {self.norm_num_groups} must divide every width {self.block_out_channels}"
            raise ValueError(msg)
        attended = [self.block_out_channels[i] for i in self.resolved_attention_levels]
        attended += [self.block_out_channels[-1]] if self.mid_attention else []
        if any(c % self.attention_head_dim for c in attended):
            msg = f"attention_head_dim {self.attention_head_dim} must divide the attended widths {attended}"
            raise ValueError(msg)
        if self.beta_start > self.beta_end:
            msg = f"need beta_start <= beta_end, got {self.beta_start} > {self.beta_end}"
            raise ValueError(msg)
        if not self.tau < self.t_b_stop <= self.num_train_timesteps:
            msg = f"need tau < t_b_max <= T, got tau={self.tau}, t_b_max={self.t_b_stop}, T={self.num_train_timesteps}"
            raise ValueError(msg)
        if not self.t_s < self.t_b < self.num_train_timesteps:
            msg = f"need 0 <= t_s < t_b < T, got t_s={self.t_s}, t_b={self.t_b}, T={self.num_train_timesteps}"
            raise ValueError(msg)
        low, high = self.beta_range
        if not 0.0 <= low <= high <= 1.0:
            msg = f"beta_range must satisfy 0 <= low <= high <= 1, got {self.beta_range}"
            raise ValueError(msg)
        low_k, high_k = self.perlin_scale_exponents
        if not 0 <= low_k < high_k:
            msg = f"perlin_scale_exponents must satisfy 0 <= low < high, got {self.perlin_scale_exponents}"
            raise ValueError(msg)
        return self

    @property
    def resolved_attention_levels(self) -> tuple[int, ...]:
        """``attention_levels`` as non-negative level indices, sorted."""
        levels = len(self.block_out_channels)
        return tuple(sorted(level % levels for level in self.attention_levels))

    @property
    def t_b_stop(self) -> int:
        """Exclusive upper bound of the training t_b (``t_b_max`` or T)."""
        return self.num_train_timesteps if self.t_b_max is None else self.t_b_max

    @property
    def resolved_norm_groups(self) -> int:
        """GroupNorm groups of the U-Net: ``norm_num_groups``, or the largest power of two <= 32 dividing all."""
        if self.norm_num_groups is not None:
            return self.norm_num_groups
        groups = 32  # ADM's GroupNorm32; fewer groups when a width is not a multiple of 32
        while any(c % groups for c in self.block_out_channels):
            groups //= 2
        return groups

    @classmethod
    def paper(cls, **overrides: Any) -> DiffusionADConfig:
        """The paper's architecture at 256 px (ADM U-Net, 128 base channels, attention at 32/16/8, 4 heads).

        Widths (1, 1, 2, 2, 4, 4) x 128 and two ResNet blocks per level are ADM's for 256 px, as in the released
        code; the segmenter is DRAEM-sized (64, depth 6) as the code's ``SegmentationSubNetwork``.

        Args:
            overrides: fields to change on top of the paper's values.

        Returns:
            The config.
        """
        values: dict[str, Any] = {
            "block_out_channels": (128, 128, 256, 256, 512, 512),
            "layers_per_block": 2,
            "attention_levels": (3, 4, 5),
            "attention_head_dim": 64,
            "seg_base_width": 64,
            "seg_depth": 6,
        }
        return cls(**(values | overrides))


class QualitySettings(BaseModel):
    """Generation-quality measurements of each dataset (``evaluate.quality``).

    IS and KID need NVlabs' TorchScript Inception (``inception-2015-12-05.pt``) and IC-LPIPS their VGG16
    LPIPS network (``vgg16.pt``), as local files: nothing is downloaded, and without them those metrics are
    reported as not computed. Mask alignment and mask sanity need no network and always run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    inception_weights: Path | None = Field(None, description="local inception-2015-12-05.pt (TorchScript)")
    lpips_weights: Path | None = Field(None, description="local vgg16.pt LPIPS network (TorchScript)")
    max_images: int = Field(1000, ge=2, description="generated images per product and method the networks see")
    tiny_mask_area: int = Field(16, ge=1, description="masks with fewer pixels than this count as tiny")
