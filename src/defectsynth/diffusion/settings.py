"""Settings of the diffusion base model (config section ``diffusion``): light, no torch import.

``base_model: tiny`` is the small latent diffusion stack trained here from scratch (sizes and
pretraining length in ``tiny``); any other value is a local path to Stable Diffusion weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TINY = "tiny"
TINY_BASE_MARKER = "tiny_base.json"
"""Written by ``jobs.pretrain`` into the tiny base's directory, so the base is known as tiny by its path too."""
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")


MarkKind = Literal["line", "spot", "patch", "stain"]  # the generic prior's marks (``generic_prior.draw_mark``)


class TinyModelSettings(BaseModel):
    """Sizes of the tiny base model and how long it pretrains (VAE first, then the U-Net)."""

    model_config = ConfigDict(extra="forbid")

    vae_channels: tuple[int, ...] = Field((16, 32, 64), description="VAE block widths; downsampling 2^(n-1)")
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = Field((32, 64, 64), description="U-Net block widths, last block without attention")
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_groups: int = 16
    text_width: int = Field(64, description="text encoder hidden size = U-Net cross-attention width")
    text_layers: int = 2
    text_heads: int = 4
    max_prompt_length: int = Field(32, ge=8, description="token positions of the text encoder")
    text_embedding_std: float = Field(
        0.02, gt=0, description="std of the frozen text encoder's random token embeddings (CLIP's init: 0.02)"
    )
    vae_steps: int = Field(400, ge=0, description="VAE pretraining steps (reconstruction + KL)")
    unet_steps: int = Field(800, ge=0, description="U-Net pretraining steps on generic prompts")
    vae_sees_defects: bool = Field(True, description="VAE also trains on the training-side defect images")
    vae_crop: int | None = Field(
        None, ge=8, description="side of the random square crops the VAE trains on (None: whole images)"
    )
    vae_whole_image_steps: int = Field(
        0,
        ge=0,
        description="with vae_crop, the last of vae_steps train on whole images: GroupNorm then sees a whole image's "
        "statistics, as when encoding (crops alone tinted dark products)",
    )
    vae_hue_rotation: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the VAE's images turned about the grey axis by up to this share of a full turn, each its own "
        "draw (off: at 1 the VAE learned to draw grey; README, 'The VAE keeps a defect's darkness')",
    )
    prior_marks: float = Field(
        0.0, ge=0, le=1, description="share of pretraining images given a generic mark (one of prior_kinds)"
    )
    prior_kinds: list[MarkKind] = Field(
        ["line", "spot", "patch"], min_length=1, description="the generic marks drawn, equally often"
    )
    prior_shapes: float = Field(0.0, ge=0, le=1, description="share replaced by a binary shape ('a mask')")
    prior_captions: Literal["kind", "appearance"] = Field(
        "kind", description="a mark's caption: its kind ('a line'), or its look too ('a faint thin black line')"
    )
    prior_mark_weight: float = Field(
        1.0,
        ge=1.0,
        description="the U-Net loss's weight in the latent cells of a prior mark (1: the plain loss); a mark covers a "
        "few percent of its image. At 20 the base learned no colour words either (bench/README, base_prompts)",
    )
    prior_grounding_weight: float = Field(
        0.0,
        ge=0,
        description="ours: weight of the loss that puts a marked image's caption words' cross-attention on the mark "
        "(diffusion.grounding); 0: off, and a base reads every text position alike (README, 'Grounded words')",
    )
    batch_size: int = Field(8, ge=1)
    vae_learning_rate: float = 1e-3
    unet_learning_rate: float = 5e-4
    kl_weight: float = Field(
        1e-6,
        ge=0,
        description="the VAE's KL against its per-pixel losses, both per pixel value (Stable Diffusion's 1e-6)",
    )
    vae_edge_weight: float = Field(
        0.0, ge=0, description="weight of the image-gradient L1 in the VAE loss (keeps thin lines; 0: off)"
    )
    vae_chroma_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the colour parts' L1 in the VAE loss (off: at 5 to 20 it kept at most 0.18 of a "
        "discoloration's tint after 900 steps; README, 'The VAE keeps a defect's darkness')",
    )

    @model_validator(mode="after")
    def _check_widths(self) -> TinyModelSettings:
        for name in ("vae_channels", "unet_channels"):
            widths = getattr(self, name)
            if len(widths) < 2 or any(w % self.norm_groups for w in widths):
                msg = f"{name} {widths}: need two or more widths, each a multiple of norm_groups={self.norm_groups}"
                raise ValueError(msg)
        if self.prior_marks + self.prior_shapes > 1:
            msg = f"prior_marks + prior_shapes must be at most 1, got {self.prior_marks} + {self.prior_shapes}"
            raise ValueError(msg)
        if self.vae_whole_image_steps > self.vae_steps:
            msg = f"vae_whole_image_steps {self.vae_whole_image_steps} exceeds vae_steps {self.vae_steps}"
            raise ValueError(msg)
        if self.text_width % self.text_heads:
            msg = f"text_width {self.text_width} is not a multiple of text_heads {self.text_heads}"
            raise ValueError(msg)
        return self


class BaseModelSettings(BaseModel):
    """The base model of every diffusion generator in a run (config section ``diffusion``)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        TINY, description="'tiny', a models:/ URI of the run's registry, or a local diffusers directory or .ckpt file"
    )
    base_config: Path | None = Field(None, description="diffusers-layout directory with the configs of a single file")
    tiny: TinyModelSettings = Field(default_factory=TinyModelSettings)

    @field_validator("base_model")
    @classmethod
    def _the_runs_own_registry(cls, value: str) -> str:
        """A registry URI must name the configured store's registry: ``models:/...``, never ``models://<other>``."""
        match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):/", value)
        scheme = match[1] if match else ""
        if scheme in ("models", "runs") and value.startswith(f"{scheme}://"):
            msg = f"{value!r} names another registry; use {scheme}:/<name>/... against tracking.uri"
            raise ValueError(msg)
        if scheme and scheme not in ("models", "runs"):
            msg = f"{value!r}: base models load from the run's MLflow registry (models:/, runs:/) or a local path"
            raise ValueError(msg)
        return value

    @property
    def is_tiny(self) -> bool:
        """True when the base is the tiny model trained here."""
        return self.base_model == TINY


def is_tiny_base(base_model: str) -> bool:
    """Whether ``base_model`` (``tiny`` or a local path) is a tiny base trained here rather than Stable Diffusion."""
    return base_model == TINY or (Path(base_model) / TINY_BASE_MARKER).is_file()
