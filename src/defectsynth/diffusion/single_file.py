"""Load a Stable Diffusion 1.x/2.x single-file checkpoint (``.safetensors`` or ``.ckpt``) offline.

Released Stable Diffusion checkpoints keep the original CompVis/LDM key layout in one file: the
U-Net under ``model.diffusion_model.*``, the VAE under ``first_stage_model.*``, and the text encoder
under ``cond_stage_model.transformer.*`` (SD 1.x, Hugging Face CLIP) or ``cond_stage_model.model.*``
(SD 2.x, OpenCLIP). diffusers' own single-file machinery converts each part: the models'
``from_single_file`` for the U-Net and VAE, ``create_diffusers_clip_model_from_ldm`` for the text
encoder (what ``StableDiffusionPipeline.from_single_file`` calls per component).

A single file has weights but no configs, and diffusers would fetch those from the Hub; here they
come from ``config_dir`` (setting ``diffusion.base_config``), a diffusers-layout directory of the
same Stable Diffusion version with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/``. Only its configs and tokenizer files are read, so a configs-only copy is enough;
the scheduler config sets the prediction type (ε for SD 1.x and 2.x-base, v for SD 2.x 768-v).
Everything is read with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from itertools import chain
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from defectsynth.diffusion.model import DiffusionModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
CONFIG_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

logger = logging.getLogger(__name__)


def load_single_file(path: Path, *, config_dir: Path | None, resolution: int | None = None) -> DiffusionModel:
    """Convert an original-layout SD 1.x/2.x checkpoint file to a ``DiffusionModel``, with configs from ``config_dir``.

    Args:
        path: The ``.safetensors`` or ``.ckpt`` file (a ``.ckpt`` may nest its weights under ``state_dict``).
        config_dir: A diffusers-layout directory of the same Stable Diffusion version (its weights are not read).
        resolution: Image side; defaults to the U-Net config's sample size times the VAE's downsampling.

    Returns:
        The model in float32 on the CPU, in evaluation mode.

    Raises:
        ValueError: No ``config_dir``, an unreadable file, a file that is not an SD 1.x/2.x checkpoint, a
            ``config_dir`` without the component subfolders, or weights that do not fit its configs. Every
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such checkpoint file"
        raise ValueError(msg)
    if config_dir is None:
        msg = (
            f"{path}: a single checkpoint file has weights but no component configs, and none can be downloaded "
            "here; set diffusion.base_config to a diffusers-layout Stable Diffusion directory of the same version "
            f"(with {', '.join(f'{name}/' for name in CONFIG_SUBFOLDERS)}; configs are enough, weights are not read)"
        )
        raise ValueError(msg)
    config_dir = _check_config_dir(path, Path(config_dir).expanduser())
    checkpoint = read_checkpoint(path)
    text = check_layout(path, checkpoint)
    logger.info(
        "%s: Stable Diffusion %s checkpoint, configs from %s", path, "2.x" if text == "open_clip" else "1.x", config_dir
    )
    parts = {
        name: _load_part(path, config_dir, name, checkpoint)
        for name in ("unet", "vae", "text_encoder")  # one at a time, so an error can say which part failed
    }
    return DiffusionModel.from_parts(
        **parts,
        tokenizer=CLIPTokenizer.from_pretrained(config_dir, subfolder="tokenizer", local_files_only=True),
        scheduler=DDIMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True),
        resolution=resolution,
    )


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by key, on the CPU; a ``.ckpt``'s ``state_dict`` (nested or not) is unwrapped.

    ``.ckpt`` files are unpickled with ``weights_only=True`` (as diffusers does): tensors and plain
    containers only, never arbitrary Python objects.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such checkpoint file"
        raise ValueError(msg)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # a damaged pickle fails in many ways: UnpicklingError, EOFError, IndexError, ...
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            msg = (
                f"{path}: the .ckpt holds Python objects besides tensors, which are not unpickled here "
                "(torch.load weights_only=True); re-save its state_dict, e.g. as .safetensors"
            )
        else:
            msg = f"{path}: not a readable {path.suffix} checkpoint ({type(err).__name__}: {err})"
        raise ValueError(msg) from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        msg = f"{path}: expected a dict of tensors (or one under 'state_dict'), found {type(state).__name__}"
        raise ValueError(msg)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def check_layout(path: Path, checkpoint: dict[str, torch.Tensor]) -> str:
    """Check for SD 1.x/2.x's original key layout; returns ``"clip"`` (SD 1.x) or ``"open_clip"`` (SD 2.x) text keys."""
    keys = list(checkpoint)
    if any(key.startswith("conditioner.embedders.") for key in keys):
        msg = f"{path}: a Stable Diffusion XL checkpoint; only SD 1.x/2.x single files are supported"
        raise ValueError(msg)
    text = next(
        (name for name, prefix in (("clip", CLIP_PREFIX), ("open_clip", OPEN_CLIP_PREFIX)) if _has(keys, prefix)),
        None,
    )
    missing = [
        f"{part} ({prefix}*)"
        for part, prefix, present in (
            ("U-Net", UNET_PREFIX, _has(keys, UNET_PREFIX)),
            ("VAE", VAE_PREFIX, _has(keys, VAE_PREFIX)),
            ("text encoder", f"{CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}", text is not None),
        )
        if not present
    ]
    if missing:
        sample = ", ".join(keys[:3]) or "none"
        msg = (
            f"{path}: not a Stable Diffusion 1.x/2.x checkpoint in the original (CompVis/LDM) layout: "
            f"no {', '.join(missing)} weights among its {len(keys)} tensors (first keys: {sample}). "
            "Weights in diffusers layout load from their directory (base_model: <dir>) instead"
        )
        raise ValueError(msg)
    return text


def _has(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _check_config_dir(path: Path, config_dir: Path) -> Path:
    if not config_dir.is_dir():
        msg = f"{path}: base_config {config_dir} is not a directory (expected a diffusers-layout SD directory)"
        raise ValueError(msg)
    missing = [name for name in CONFIG_SUBFOLDERS if not (config_dir / name).is_dir()]
    if missing:
        msg = (
            f"{path}: base_config {config_dir} is not a diffusers Stable Diffusion directory "
            f"(missing {', '.join(f'{name}/' for name in missing)})"
        )
        raise ValueError(msg)
    return config_dir


def _load_part(path: Path, config_dir: Path, name: str, checkpoint: dict[str, torch.Tensor]) -> torch.nn.Module:
    """One component through diffusers' single-file conversion, with its config from ``config_dir/name``."""
    config = str(config_dir)
    try:
        if name == "text_encoder":
            module = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, checkpoint, config=config, subfolder=name, local_files_only=True
            )
        else:
            cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
            module = cls.from_single_file(checkpoint, config=config, subfolder=name, local_files_only=True)
    except (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError) as err:
        if name != "text_encoder" and "meta tensor" in str(err):  # diffusers placing weights the file lacks
            raise _missing_error(path, config_dir, name, _unconverted_keys(cls, name, checkpoint, config_dir)) from err
        msg = f"{path}: its {name} weights do not fit the {name} config of base_config {config_dir}: {err}"
        raise ValueError(msg) from err
    empty = [key for key, tensor in chain(module.named_parameters(), module.named_buffers()) if tensor.is_meta]
    if empty:
        raise _missing_error(path, config_dir, name, empty)
    return module


def _unconverted_keys(
    cls: type[torch.nn.Module], name: str, checkpoint: dict[str, torch.Tensor], config_dir: Path
) -> list[str]:
    """The ``cls`` weights that diffusers' conversion of ``checkpoint`` does not provide (for error messages)."""
    config = cls.load_config(str(config_dir), subfolder=name, local_files_only=True)
    convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
    with torch.device("meta"):
        expected = cls.from_config(config).state_dict()
    return sorted(set(expected) - set(convert(checkpoint=checkpoint, config=config)))


def _missing_error(path: Path, config_dir: Path, name: str, missing: list[str]) -> ValueError:
    msg = (
        f"{path}: no weights for {len(missing)} {name} tensors that the {name} config of base_config {config_dir} "
        f"expects (e.g. {', '.join(missing[:3])}); are the file and base_config the same Stable Diffusion version?"
    )
    return ValueError(msg)
