"""The latent diffusion bundle every diffusion generator works with: VAE, U-Net, text encoder, tokenizer.

``DiffusionModel`` owns the four parts and the training noise schedule, and does the three
conversions around the U-Net: prompts to embeddings, images to latents, latents to images. It saves
and loads in diffusers' Stable Diffusion layout (``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), so a saved model is also a ``StableDiffusionPipeline`` directory.

Optional extra parts (``parts``, e.g. a ControlNet) sit beside them, each in the subfolder named by
its key, in the part's own diffusers layout (``controlnet/`` read back with
``ControlNetModel.from_pretrained(directory, subfolder="controlnet")``). The pipeline ignores them;
``load`` reads back every subfolder named in ``PART_CLASSES``.

Images are float tensors in [-1, 1], shaped (B, 3, H, W); latents are scaled by the VAE's
``scaling_factor``, as Stable Diffusion does.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
PART_CLASSES: dict[str, type[ModelMixin]] = {"controlnet": ControlNetModel}
"""The extra parts ``load`` knows, by subfolder name; each saves and loads with diffusers' ``save_pretrained``."""


@dataclass
class DiffusionModel:
    """A latent diffusion model in parts; see the module docstring."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler  # holds the training noise schedule (betas, prediction type)
    resolution: int
    parts: dict[str, ModelMixin] = field(default_factory=dict)  # extra networks by subfolder name ("controlnet")

    def __post_init__(self) -> None:
        clashing = sorted(name for name in self.parts if name in SUBFOLDERS or not name.isidentifier())
        if clashing:
            msg = f"extra part names {clashing} must be plain subfolder names other than {', '.join(SUBFOLDERS)}"
            raise ValueError(msg)

    @property
    def device(self) -> torch.device:
        """Where the U-Net lives; inputs are moved there."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's compute dtype."""
        return self.unet.dtype

    @property
    def latent_scale(self) -> int:
        """How many pixels one latent cell covers (8 for Stable Diffusion)."""
        return vae_downsampling(self.vae.config.block_out_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of a latent at the model's resolution."""
        side = self.resolution // self.latent_scale
        return self.unet.config.in_channels, side, side

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T-1 of the training schedule, in float64 on the CPU."""
        return self.scheduler.alphas_cumprod.to(torch.float64)

    def networks(self) -> list[torch.nn.Module]:
        """VAE, U-Net, text encoder, then the extra parts in key order."""
        return [self.vae, self.unet, self.text_encoder, *(self.parts[name] for name in sorted(self.parts))]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move every network, extra parts included (in place), and return self."""
        for module in self.networks():
            module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> DiffusionModel:
        """Evaluation mode for every network, extra parts included; returns self."""
        for module in self.networks():
            module.eval()
        return self

    def part(self, name: str) -> ModelMixin:
        """The extra part saved under subfolder ``name``; a missing one is an error naming those present."""
        if name not in self.parts:
            msg = f"the diffusion model has no {name!r} part (parts: {sorted(self.parts) or 'none'})"
            raise KeyError(msg)
        return self.parts[name]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the text encoder's length, shaped (B, L)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.text_encoder.device)

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D): the U-Net's cross-attention context."""
        return self.text_encoder(self.tokenize(prompts))[0].to(self.dtype)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] to scaled latents: the posterior mean, or a sample when a generator is given."""
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to images in [-1, 1]."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    def pipeline(self) -> StableDiffusionPipeline:
        """The same parts as a diffusers ``StableDiffusionPipeline`` (shared, not copied)."""
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save(self, directory: Path) -> Path:
        """Write the model in diffusers' Stable Diffusion layout, each extra part in its subfolder; returns it.

        A part ``load`` would not read back (its name is not in ``PART_CLASSES``) is an error. Saving over
        an earlier save replaces it, as diffusers' ``save_pretrained`` does: the subfolder of a known part
        this model lacks is removed, so the directory loads back as this model; other files are left alone.
        """
        unknown = sorted(set(self.parts) - set(PART_CLASSES))
        if unknown:
            msg = f"extra parts {unknown} would not load back; known parts: {', '.join(PART_CLASSES)}"
            raise ValueError(msg)
        remove_stale_parts(Path(directory), keep=set(self.parts))
        self.pipeline().save_pretrained(str(directory), safe_serialization=True)
        for name, part in self.parts.items():
            part.save_pretrained(str(Path(directory) / name), safe_serialization=True)
        return Path(directory)

    @classmethod
    def load(cls, directory: Path, *, resolution: int | None = None) -> DiffusionModel:
        """Load a diffusers-layout directory (one of ours, or Stable Diffusion 1.x/2.x weights).

        The resolution defaults to the U-Net's sample size times the VAE's downsampling. Every subfolder
        named in ``PART_CLASSES`` is loaded as an extra part.
        """
        directory = Path(directory)
        missing = [name for name in SUBFOLDERS if not (directory / name).is_dir()]
        if missing:
            msg = f"{directory}: not a diffusers Stable Diffusion directory (missing {', '.join(missing)})"
            raise ValueError(msg)
        return cls.from_parts(
            vae=AutoencoderKL.from_pretrained(directory, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(directory, subfolder="unet"),
            text_encoder=CLIPTextModel.from_pretrained(directory, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(directory, subfolder="scheduler"),
            resolution=resolution,
            parts={
                name: part_class.from_pretrained(directory, subfolder=name)
                for name, part_class in PART_CLASSES.items()
                if (directory / name).is_dir()
            },
        )

    @classmethod
    def from_parts(
        cls,
        *,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler | None,
        resolution: int | None = None,
        parts: dict[str, ModelMixin] | None = None,
    ) -> DiffusionModel:
        """Assemble a model from loaded or injected parts (tests pass tiny seeded ones); every network is frozen.

        Any scheduler's config becomes a ``DDIMScheduler`` (only its noise schedule is used); None
        gives Stable Diffusion's schedule. ``parts`` are the extra networks, keyed by subfolder name.
        """
        ddim = DDIMScheduler.from_config(scheduler.config) if scheduler is not None else stable_diffusion_schedule()
        scale = vae_downsampling(vae.config.block_out_channels)
        sample_size = unet.config.sample_size
        side = sample_size if isinstance(sample_size, int) else sample_size[0]
        model = cls(vae, unet, text_encoder, tokenizer, ddim, resolution or side * scale, dict(parts or {}))
        if model.resolution % scale:
            msg = f"resolution {model.resolution} is not a multiple of the VAE's downsampling {scale}"
            raise ValueError(msg)
        for module in model.networks():
            module.requires_grad_(False)
        return model.eval()


def remove_stale_parts(directory: Path, keep: set[str]) -> None:
    """Delete the subfolders of known extra parts not in ``keep``: ``load`` would bring them back."""
    for name in sorted(set(PART_CLASSES) - keep):
        stale = directory / name
        if stale.is_dir():
            logger.info("%s: removing the %r part of an earlier save", directory, name)
            shutil.rmtree(stale)


def vae_downsampling(block_out_channels: Sequence[int]) -> int:
    """Pixels per latent cell of an AutoencoderKL with these block widths: 2^(blocks - 1)."""
    return 2 ** (len(block_out_channels) - 1)


def stable_diffusion_schedule() -> DDIMScheduler:
    """Stable Diffusion 1.x's training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps, ε-prediction."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
