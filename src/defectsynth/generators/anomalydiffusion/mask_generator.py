"""AnomalyDiffusion's mask generator (paper 000, Eq. 9-10): one learned mask embedding e_m per defect type.

The paper has too few real masks per defect type to condition on, so it learns their distribution:
textual inversion on the masks themselves (Eq. 9), ``e_m* = argmin E ||ε − ε_θ(z_t, t, e_m)||²`` with
z_0 the frozen VAE's latent of a mask drawn as an image (white defect on black), and then samples new
masks from the frozen LDM under classifier-free guidance against the empty prompt (Eq. 10),
``ε̃ = ε_θ(x_t) + s (ε_θ(x_t, e_m) − ε_θ(x_t))`` with s = 5, DDIM, decoded, averaged over the
channels and binarised at 0.5 (as the released code does).

Only e_m's rows of the token-embedding table change; the VAE, U-Net, text encoder and every other row
(the vocabulary and any other placeholder group, e.g. the anomaly embeddings e_a) stay bit-identical.

Choices where the paper is silent or inconsistent:

- k' = 4 tokens (main text); the supplement says 2. The paper initialises them as "random tokens";
  here each row starts at the mean embedding of ``initializer`` (as textual inversion does), since
  ``PlaceholderTokens`` initialises from a word.
- The prompt is the mask tokens alone (``tokens.prompt(group)``), as in Eq. 9.
- Optimiser: AdamW with weight decay 0.01, as textual inversion (LDM's and diffusers') uses.
- Latents are posterior samples, as the base model's U-Net pretraining uses.
- The training masks are augmented each step (random flips, quarter turns, a small rotation,
  translation, the mask kept wholly in the frame; no scaling by default, so the sizes stay those of the
  type's real masks) with ``masks.augment_mask``: with 1-2 real masks per type, e_m would otherwise
  memorise their positions.

Example:
    >>> tokens = PlaceholderTokens(model)  # doctest: +SKIP
    >>> curve = train_mask_embedding(model, tokens, "crack_mask", masks, settings, seed=0)  # doctest: +SKIP
    >>> sample_masks(model, tokens, "crack_mask", settings, seeds=[0, 1]).shape  # doctest: +SKIP
    (2, 256, 256)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from defectsynth.core.resize import resize_mask
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss
from defectsynth.diffusion.sampling import denoise, generators_from_seeds, initial_noise
from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.masks import AugmentOptions, augment_mask

logger = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-2  # AdamW's, as in textual inversion


class MaskGeneratorSettings(BaseModel):
    """Training and sampling of the per-type mask embedding e_m (paper values noted; CPU-sized step count)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(4, ge=1, description="k', tokens of e_m (paper main text: 4; supplement: 2)")
    steps: int = Field(200, ge=1, description="training steps per defect type (paper: 30K)")
    learning_rate: float = Field(5e-3, gt=0, description="AdamW rate of e_m's rows (paper: 0.005)")
    batch_size: int = Field(4, ge=1, description="augmented masks per step (paper: 4)")
    guidance_scale: float = Field(5.0, ge=1.0, description="s of Eq. 10, against the empty prompt (paper: 5)")
    sampling_steps: int = Field(25, ge=1, description="DDIM steps of mask sampling (paper: unstated; code: DDIM)")
    sampling_batch: int = Field(8, ge=1, description="masks denoised together; results do not depend on it")
    threshold: float = Field(0.5, gt=0, lt=1, description="binarisation of the decoded mask in [0, 1] (code: 0.5)")
    initializer: str = Field("mask", min_length=1, description="word whose mean embedding starts e_m's rows")
    augment: bool = Field(True, description="augment the real masks each step (flips, turns, rotation, translation)")
    max_angle: float = Field(15.0, ge=0, le=180, description="small rotation in [-max_angle, max_angle] degrees")
    scale_range: tuple[float, float] = Field((1.0, 1.0), description="mask rescaling range; 1 keeps real sizes")

    @model_validator(mode="after")
    def _check_scale(self) -> MaskGeneratorSettings:
        low, high = self.scale_range
        if not 0 < low <= high:
            msg = f"scale_range {self.scale_range}: need 0 < low <= high"
            raise ValueError(msg)
        return self

    @property
    def augment_options(self) -> AugmentOptions:
        """The ``augment_mask`` options these settings ask for."""
        return AugmentOptions(flip=True, rotate90=True, max_angle=self.max_angle, scale_range=self.scale_range)


def masks_to_images(masks: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Bool masks (H x W each) as 3-channel images in [-1, 1], (B, 3, H, W): white defect on black."""
    stacked = torch.from_numpy(np.stack([np.asarray(m, dtype=bool) for m in masks])).float()
    return (stacked * 2 - 1)[:, None].expand(-1, 3, -1, -1).contiguous()


def images_to_masks(images: torch.Tensor, threshold: float) -> np.ndarray:
    """Decoded images in [-1, 1], (B, 3, H, W), to bool masks (B, H, W): channel mean mapped to [0, 1] > threshold."""
    gray = (images.float().mean(dim=1) + 1) / 2
    return (gray > threshold).cpu().numpy()


def _ensure_group(tokens: PlaceholderTokens, group: str, settings: MaskGeneratorSettings) -> None:
    """Add the mask group with ``settings.tokens`` rows unless it exists; an existing one must have that many."""
    if group not in tokens.groups:
        tokens.add(group, count=settings.tokens, initializer=settings.initializer)
        return
    count = len(tokens.groups[group])
    if count != settings.tokens:
        msg = f"placeholder group {group!r} has {count} tokens, but settings.tokens is {settings.tokens}"
        raise ValueError(msg)


def _training_masks(masks: Sequence[np.ndarray], resolution: int) -> list[np.ndarray]:
    """The real masks as bool arrays at the model's resolution; empty or non-2-D masks are errors."""
    if len(masks) == 0:
        msg = "train_mask_embedding needs at least one real mask"
        raise ValueError(msg)
    out = []
    for index, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.ndim != 2:
            msg = f"mask {index} has shape {mask.shape}; expected H x W"
            raise ValueError(msg)
        if not mask.any():
            msg = f"mask {index} is empty; e_m learns from defect masks only"
            raise ValueError(msg)
        out.append(resize_mask(mask.astype(bool), resolution))
    return out


def train_mask_embedding(
    model: DiffusionModel,
    tokens: PlaceholderTokens,
    group: str,
    masks: Sequence[np.ndarray],
    settings: MaskGeneratorSettings,
    *,
    seed: int,
) -> list[float]:
    """Learn e_m of one defect type by textual inversion on its real masks (Eq. 9); returns the loss per step.

    Each step draws ``batch_size`` of the masks (with replacement), augments them, encodes them with
    the frozen VAE and takes one AdamW step on the ε loss with the prompt ``tokens.prompt(group)``.
    After each step every row of the embedding table but the group's is put back, so nothing else
    changes (the table's ``requires_grad`` is switched off again at the end). The group is added (with
    ``settings.tokens`` rows from ``settings.initializer``) when ``tokens`` lacks it. Randomness (mask
    choice, augmentation, latent samples, noise, timesteps) comes from ``seed`` alone.

    Args:
        model: the frozen diffusion model (in eval mode).
        tokens: the model's placeholder tokens; only ``group``'s rows train.
        group: the placeholder group of e_m, distinct from the type's other groups (e.g. ``<type>_mask``).
        masks: the type's real masks, H x W bool (resized to the model's resolution if needed), none empty.
        settings: steps, batch, learning rate, augmentation.
        seed: the run's seed.

    Returns:
        The loss of every step.

    Raises:
        ValueError: no masks, an empty or non-2-D mask, or an existing group of the wrong size.
    """
    # 1. data and the group
    real = _training_masks(masks, model.resolution)
    _ensure_group(tokens, group, settings)
    prompt = tokens.prompt(group)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    options = settings.augment_options

    # 2. only the group's rows train: the vocabulary's rows are restored by ``tokens``, other groups' (e_a,
    # other types' e_m, which AdamW's weight decay would shrink) from a snapshot, after each step
    table = tokens.trainable_rows()
    own = set(tokens.ids(group))
    others = torch.tensor([i for i in tokens.ids() if i not in own], dtype=torch.long, device=table.device)
    snapshot = table.detach()[others].clone()
    optimizer = torch.optim.AdamW([table], lr=settings.learning_rate, weight_decay=WEIGHT_DECAY)

    # 3. the loop
    curve: list[float] = []
    try:
        for _ in range(settings.steps):
            chosen = [real[i] for i in rng.integers(len(real), size=settings.batch_size)]
            if settings.augment:
                chosen = [augment_mask(mask, rng, options=options) for mask in chosen]
            with torch.no_grad():
                latents = model.encode_images(masks_to_images(chosen), generator)
            context = model.encode_prompt([prompt] * settings.batch_size)
            loss = denoising_loss(model, latents, context, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens.restore_frozen_rows()
            with torch.no_grad():
                table[others] = snapshot
            curve.append(float(loss.detach()))
    finally:
        table.requires_grad_(False)
        table.grad = None
    logger.info("mask embedding %s: loss %.4f -> %.4f over %d steps", group, curve[0], curve[-1], len(curve))
    return curve


@torch.no_grad()
def sample_masks(
    model: DiffusionModel,
    tokens: PlaceholderTokens,
    group: str,
    settings: MaskGeneratorSettings,
    *,
    seeds: Sequence[int],
) -> np.ndarray:
    """Draw one mask per seed from the learned e_m (Eq. 10): CFG against the empty prompt, DDIM, binarised.

    The starting noise of each mask comes from its seed alone and DDIM is deterministic (η = 0), so a
    seed gives the same mask whatever the other seeds or ``sampling_batch`` (up to float rounding at
    the threshold). A mask can come out empty (e_m under-trained, or a draw below the threshold
    everywhere); it is returned as is, and the caller decides (redraw, fall back to a real mask).

    Args:
        model: the diffusion model e_m was trained on.
        tokens: its placeholder tokens, holding ``group``.
        group: the trained mask group.
        settings: guidance scale, DDIM steps, threshold, batch.
        seeds: one per mask.

    Returns:
        Bool masks, (len(seeds), resolution, resolution).

    Raises:
        ValueError: ``tokens`` has no group ``group``.
    """
    if group not in tokens.groups:
        msg = f"no placeholder group {group!r}; train it with train_mask_embedding first (have {sorted(tokens.groups)})"
        raise ValueError(msg)
    side = model.resolution
    if len(seeds) == 0:
        return np.zeros((0, side, side), dtype=bool)
    cond = model.encode_prompt([tokens.prompt(group)])
    uncond = model.encode_prompt([""])
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(settings.sampling_steps)
    out = []
    for start in range(0, len(seeds), settings.sampling_batch):
        generators = generators_from_seeds(seeds[start : start + settings.sampling_batch])
        latents = initial_noise(model.latent_shape, generators, device=model.device)
        latents = denoise(model, latents, cond, sampler=sampler, uncond=uncond, guidance_scale=settings.guidance_scale)
        out.append(images_to_masks(model.decode_latents(latents), settings.threshold))
    return np.concatenate(out)
