"""Where a diffusion generator's base model comes from: ``tiny`` (built here, trained from scratch) or local weights.

``base_model: tiny`` builds a small latent diffusion stack from ``TinyModelSettings`` with an
offline tokenizer; ``jobs.pretrain`` trains it on the run's normal images and registers it as
``defectsynth-base-tiny``. Any other value is a local path: a Stable Diffusion 1.x/2.x directory
in diffusers layout, or a single ``.ckpt``/``.safetensors`` file (read with the component configs of
``base_config``, a diffusers-layout directory, because none can be fetched from a hub here).

Example:
    >>> settings = BaseModelSettings(tiny=TinyModelSettings(unet_channels=(32, 32), vae_channels=(32, 32)))
    >>> model = build_tiny(settings.tiny, resolution=32, words=["wood"], seed=0)
    >>> model.latent_shape
    (4, 16, 16)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from defectsynth.diffusion.model import DiffusionModel, stable_diffusion_schedule, vae_downsampling
from defectsynth.diffusion.settings import SINGLE_FILE_SUFFIXES, TINY, BaseModelSettings, TinyModelSettings
from defectsynth.diffusion.tokenizer import build_offline_tokenizer


def build_tiny(
    settings: TinyModelSettings, *, resolution: int, words: Iterable[str] = (), seed: int = 0
) -> DiffusionModel:
    """A randomly initialised tiny model; ``words`` (product names) join the tokenizer's vocabulary."""
    scale = vae_downsampling(settings.vae_channels)
    if resolution % scale:
        msg = f"resolution {resolution} is not a multiple of the tiny VAE's downsampling {scale}"
        raise ValueError(msg)
    tokenizer = build_offline_tokenizer(words, max_length=settings.max_prompt_length)
    n_blocks = len(settings.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(settings.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(settings.vae_channels),
            block_out_channels=settings.vae_channels,
            latent_channels=settings.latent_channels,
            norm_num_groups=settings.norm_groups,
            sample_size=resolution,
            scaling_factor=1.0,  # set from the latents' spread after VAE pretraining
        )
        unet = UNet2DConditionModel(
            sample_size=resolution // scale,
            in_channels=settings.latent_channels,
            out_channels=settings.latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
            block_out_channels=settings.unet_channels,
            layers_per_block=settings.layers_per_block,
            norm_num_groups=settings.norm_groups,
            cross_attention_dim=settings.text_width,
            attention_head_dim=settings.attention_heads,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=settings.text_width,
                intermediate_size=settings.text_width * 4,
                num_hidden_layers=settings.text_layers,
                num_attention_heads=settings.text_heads,
                max_position_embeddings=settings.max_prompt_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        # At CLIP's 0.02 the random layers wash a word out ("wood" and "pill" prompts 0.96 alike where they differ),
        # and the tiny U-Net hardly reads them. Larger embeddings keep words apart, as CLIP's trained layers do.
        text_encoder.get_input_embeddings().weight.data.normal_(0.0, settings.text_embedding_std)
    return DiffusionModel.from_parts(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=stable_diffusion_schedule(),
        resolution=resolution,
    )


def load_local_base(settings: BaseModelSettings, *, resolution: int | None = None) -> DiffusionModel:
    """Load a non-tiny base from a local diffusers directory or single checkpoint file."""
    path = Path(settings.base_model).expanduser()
    if path.is_dir():
        return DiffusionModel.load(path, resolution=resolution)
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        from defectsynth.diffusion.single_file import load_single_file

        return load_single_file(path, config_dir=settings.base_config, resolution=resolution)
    if path.exists():
        msg = f"base_model {path}: expected a diffusers directory or a {'/'.join(SINGLE_FILE_SUFFIXES)} file"
        raise ValueError(msg)
    msg = f"base_model {settings.base_model!r}: no such file or directory (and not {TINY!r})"
    raise ValueError(msg)


def load_base_model(uri: str, *, resolution: int | None = None, base_config: Path | None = None) -> DiffusionModel:
    """Load a base model from the registry (``models:/``, ``runs:/``) or a local path, ready to sample.

    MLflow is imported only for a registry URI, so a process loading a local base needs none.
    """
    if uri.startswith(("models:/", "runs:/")):
        import mlflow

        model = mlflow.pyfunc.load_model(uri).unwrap_python_model().model
        if resolution is not None:
            model.resolution = resolution
        return model
    return load_local_base(BaseModelSettings(base_model=uri, base_config=base_config), resolution=resolution)
