"""Tiny Stable Diffusion 1.x/2.x-structured models and writers of original (CompVis/LDM) single-file checkpoints.

``to_ldm_state_dict`` is the inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), the same mapping as diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` but driven by the model's config instead of
SD's fixed four blocks, so it also writes smaller models. The key layout is that of the released files:

- U-Net: ``model.diffusion_model.{time_embed, input_blocks, middle_block, output_blocks, out}.*``;
- VAE: ``first_stage_model.{encoder, decoder}.{down, mid, up}.*`` with 1×1-conv attention weights;
- text, SD 1.x: ``cond_stage_model.transformer.text_model.*`` (Hugging Face CLIP);
- text, SD 2.x: ``cond_stage_model.model.*`` (OpenCLIP: fused ``in_proj`` attention, ``resblocks``, ``ln_final``,
  ``text_projection``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from defectsynth.diffusion.model import DiffusionModel, stable_diffusion_schedule
from defectsynth.diffusion.tokenizer import build_offline_tokenizer

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."

RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
VAE_ATTENTION_TO_LDM = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


# --- tiny models with Stable Diffusion's block structure ------------------------------------------------------------


def tiny_sd_model(*, version: int = 1, seed: int = 0, resolution: int = 64) -> DiffusionModel:
    """A tiny randomly initialised model with SD 1.x's (or 2.x's) structure, narrow widths, float32 on the CPU.

    Both versions: 4 U-Net blocks with 2 layers each (the last down block and first up block without
    attention), a 4-block VAE with 2 layers per block (downsampling 8, so 8×8 latents at 64 px), a
    CLIP text encoder. Version 2 differs as SD 2.x does: linear attention projections, per-block
    ``attention_head_dim``, a GELU text encoder with ``projection_dim``, and v-prediction.
    """
    if version not in (1, 2):
        msg = f"version {version}: expected 1 or 2"
        raise ValueError(msg)
    torch.set_num_threads(1)
    tokenizer = build_offline_tokenizer(("wood",), max_length=16)
    sd2 = version == 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=resolution,
            scaling_factor=0.18215,
        )
        unet = UNet2DConditionModel(
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 4, 4) if sd2 else 2,
            use_linear_projection=sd2,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=16,
                hidden_act="gelu" if sd2 else "quick_gelu",
                projection_dim=16 if sd2 else 512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = stable_diffusion_schedule()
    if sd2:
        scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    return DiffusionModel.from_parts(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, resolution=resolution
    )


# --- diffusers → original (LDM) keys ---------------------------------------------------------------------------------


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The U-Net's weights under ``model.diffusion_model.*`` keys (inverse of ``convert_ldm_unet_checkpoint``)."""
    config = unet.config
    per_block = config.layers_per_block + 1  # LDM entries per block: its layers, then the down/upsampler
    renamed = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            side = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
            start = 1 + block * per_block if side == "input_blocks" else block * per_block
            if kind == "resnets":
                new = f"{side}.{start + index}.0.{_rename(rest, RESNET_TO_LDM)}"
            elif kind == "attentions":
                new = f"{side}.{start + index}.1.{rest}"
            elif side == "input_blocks":  # downsamplers.0.conv.*
                new = f"input_blocks.{start + config.layers_per_block}.0.op.{parts[-1]}"
            else:  # upsamplers.0.conv.*: after the last layer's resnet (and attention, if the block has it)
                slot = 2 if "CrossAttn" in config.up_block_types[block] else 1
                new = f"output_blocks.{start + config.layers_per_block}.{slot}.conv.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename(rest, RESNET_TO_LDM)}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            new = _rename(
                key,
                (
                    ("time_embedding.linear_1", "time_embed.0"),
                    ("time_embedding.linear_2", "time_embed.2"),
                    ("conv_in", "input_blocks.0.0"),
                    ("conv_norm_out", "out.0"),
                    ("conv_out", "out.2"),
                ),
            )
        renamed[UNET + new] = value
    return renamed


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights under ``first_stage_model.*`` keys (inverse of ``convert_ldm_vae_checkpoint``)."""
    n_up = len(vae.config.up_block_types)
    renamed = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        coder, group = parts[0], parts[1]
        if group == "down_blocks":
            block, rest = parts[2], ".".join(parts[3:])
            rest = rest.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
            new = f"{coder}.down.{block}.{rest}"
        elif group == "up_blocks":
            block, rest = n_up - 1 - int(parts[2]), ".".join(parts[3:])
            rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            new = f"{coder}.up.{block}.{rest}"
        elif group == "mid_block" and parts[2] == "resnets":
            new = f"{coder}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif group == "mid_block":  # attentions.0.*: linear in diffusers, 1×1 convolutions in LDM
            new = f"{coder}.mid.attn_1.{_rename('.'.join(parts[4:]), VAE_ATTENTION_TO_LDM)}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        renamed[VAE + new.replace("conv_shortcut", "nin_shortcut")] = value
    return renamed


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD 1.x text weights: the Hugging Face CLIP text model under ``cond_stage_model.transformer.text_model.*``."""
    state = text_encoder.state_dict()
    state.setdefault("embeddings.position_ids", text_encoder.embeddings.position_ids)  # released files carry it
    return {CLIP + key.removeprefix("text_model."): value for key, value in state.items()}


def open_clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD 2.x text weights in OpenCLIP's layout, ``cond_stage_model.model.*``; inverts ``convert_open_clip_checkpoint``.

    Query, key and value projections fuse into ``in_proj_weight``/``in_proj_bias``. ``text_projection``
    (width × projection_dim, unused by SD 2.x) is written as OpenCLIP has it, random here.
    """
    config = text_encoder.config
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": torch.randn(
            config.hidden_size, config.projection_dim, generator=torch.Generator().manual_seed(0)
        ),
    }
    state.pop("embeddings.position_ids", None)
    for layer in range(config.num_hidden_layers):
        prefix = f"encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            fused = [state.pop(f"{prefix}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(fused)
        for key in [k for k in state if k.startswith(prefix)]:
            out[f"transformer.resblocks.{layer}.{_rename(key.removeprefix(prefix), OPEN_CLIP_LAYER)}"] = state.pop(key)
    if state:
        msg = f"unmapped text-encoder weights: {sorted(state)}"
        raise ValueError(msg)
    return {OPEN_CLIP + key: value for key, value in out.items()}


def to_ldm_state_dict(model: DiffusionModel, *, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """The whole model in the original single-file layout; ``open_clip`` writes SD 2.x's text-encoder keys.

    Like the released files, it also carries LDM's noise-schedule buffers (which loaders ignore).
    """
    text = open_clip_to_ldm(model.text_encoder) if open_clip else clip_to_ldm(model.text_encoder)
    schedule = {
        "betas": model.scheduler.betas.float(),
        "alphas_cumprod": model.scheduler.alphas_cumprod.float(),
    }
    state = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae), **text, **schedule}
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def write_single_file(model: DiffusionModel, path: Path, *, open_clip: bool = False) -> Path:
    """Write ``model`` as one LDM-layout checkpoint: ``.safetensors``, or ``.ckpt`` as ``{"state_dict": ...}``."""
    path = Path(path)
    state = to_ldm_state_dict(model, open_clip=open_clip)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, path)
    else:
        msg = f"{path}: expected a .safetensors or .ckpt name"
        raise ValueError(msg)
    return path


def configs_only(model: DiffusionModel, directory: Path) -> Path:
    """Save ``model`` in diffusers layout, then delete its weight files: what ``diffusion.base_config`` needs."""
    directory = model.save(Path(directory))
    for weights in [*directory.rglob("*.safetensors"), *directory.rglob("*.bin")]:
        weights.unlink()
    return directory
