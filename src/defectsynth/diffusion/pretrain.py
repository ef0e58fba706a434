"""Training steps of the tiny base model: the VAE first (reconstruction + KL), then the U-Net (ε-loss).

The tiny base starts from random weights, so it must learn the run's products before any method
fine-tunes it: the VAE learns to reconstruct normal images, its latents' spread sets the scaling
factor (as Stable Diffusion's 0.18215 was set), and the U-Net learns to denoise those latents
conditioned on generic prompts ("a photo of <product>"), with 10% empty prompts so classifier-free
guidance works. The text encoder stays at its random initialisation (frozen): it still maps each
product name to a distinct context. ``jobs.pretrain`` runs these steps inside Ray Train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.sampling import NoisePredictor, unet_output
from defectsynth.diffusion.settings import TinyModelSettings

EMPTY_PROMPT_RATE = 0.1


def generic_prompt(product: str) -> str:
    """The pretraining prompt of a product: ``a photo of <product>``."""
    return f"a photo of {product.replace('_', ' ')}"


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips and a random crop of 80–100% resized back, per image."""
    out = []
    side = images.shape[-1]
    for image in images:
        flips = torch.rand(2, generator=generator)
        if flips[0] < 0.5:
            image = image.flip(-1)
        if flips[1] < 0.5:
            image = image.flip(-2)
        crop = int(side * (0.8 + 0.2 * torch.rand(1, generator=generator).item()))
        y, x = (torch.randint(0, side - crop + 1, (2,), generator=generator)).tolist()
        image = image[:, y : y + crop, x : x + crop]
        out.append(F.interpolate(image[None], size=(side, side), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def rotate_hue(images: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Each image's colours turned about the grey axis by its own angle in ±``share`` of a full turn (0: unchanged).

    Images in [-1, 1], where mid-grey is the origin; the result is clamped to that range. Meant to stop the VAE from
    painting every region in its product's palette; at 1 the tiny VAE learned to draw grey instead (README).
    """
    if share == 0:
        return images
    angles = (2 * torch.rand(len(images), generator=generator, dtype=torch.float64) - 1) * math.pi * share
    axis = torch.full((3,), 3**-0.5, dtype=torch.float64)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    outer, eye = torch.outer(axis, axis), torch.eye(3, dtype=torch.float64)
    cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
    rotations = (cos * eye + sin * cross + (1 - cos) * outer).to(images)  # Rodrigues, (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", rotations, images).clamp(-1, 1)


def random_square_crop(images: torch.Tensor, side: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random ``side``-pixel square per image (``None``: the images unchanged).

    The VAE is convolutional, so it learns local structure from crops at a fraction of a whole image's cost.
    """
    if side is None:
        return images
    height, width = images.shape[-2:]
    if side > min(height, width):
        msg = f"vae_crop {side} is larger than the {height}x{width} training images"
        raise ValueError(msg)
    corners = [
        (torch.randint(0, height - side + 1, (1,), generator=generator).item(),
         torch.randint(0, width - side + 1, (1,), generator=generator).item())
        for _ in range(len(images))
    ]  # fmt: skip
    return torch.stack([image[:, y : y + side, x : x + side] for image, (y, x) in zip(images, corners, strict=True)])


def vae_crop_at(settings: TinyModelSettings, step: int) -> int | None:
    """The side of the VAE's training crops at ``step``: ``vae_crop``, and whole images for the last steps."""
    return None if step >= settings.vae_steps - settings.vae_whole_image_steps else settings.vae_crop


def image_gradient_l1(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical pixel differences of two image batches.

    A 1-px line is a few pixels of an image but every one of them is a strong edge, so this term weighs
    thin structures that the per-pixel losses average away.
    """
    dx = (reconstruction.diff(dim=-1) - images.diff(dim=-1)).abs().mean()
    dy = (reconstruction.diff(dim=-2) - images.diff(dim=-2)).abs().mean()
    return dx + dy


def chroma_l1(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the colour parts of two image batches: each pixel less its mean over the channels.

    A tint moves a region's colour more than its brightness, and the per-pixel losses weigh it little.
    """
    return (
        ((reconstruction - reconstruction.mean(1, keepdim=True)) - (images - images.mean(1, keepdim=True))).abs().mean()
    )


def vae_loss(
    model: DiffusionModel,
    images: torch.Tensor,
    generator: torch.Generator,
    kl_weight: float,
    edge_weight: float = 0.0,
    chroma_weight: float = 0.0,
) -> torch.Tensor:
    """L1 + MSE of a posterior sample's reconstruction, plus the weighted edge, colour and KL terms.

    ``edge_weight`` × the image-gradient L1, ``chroma_weight`` × the colour parts' L1, ``kl_weight`` × KL per pixel
    value: Stable Diffusion's VAE sums both its reconstruction loss and its KL over each image, so ``kl_weight``
    (1e-6 there) weighs KL against per-pixel losses only once KL is divided by the image's values too.
    """
    posterior = model.vae.encode(images).latent_dist
    reconstruction = model.vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / images[0].numel()
    loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + kl_weight * kl
    if edge_weight:
        loss = loss + edge_weight * image_gradient_l1(reconstruction, images)
    return loss + chroma_weight * chroma_l1(reconstruction, images) if chroma_weight else loss


@torch.no_grad()
def latent_scaling_factor(model: DiffusionModel, images: torch.Tensor) -> float:
    """1 / std of the unscaled posterior means: makes the U-Net's latents unit-variance."""
    latents = model.vae.encode(images.to(model.vae.device, model.vae.dtype)).latent_dist.mean
    return float(1.0 / latents.std().clamp_min(1e-6))


def training_prompts(captions: Sequence[str], generator: torch.Generator) -> list[str]:
    """The batch's captions with ``EMPTY_PROMPT_RATE`` of them emptied (for classifier-free guidance)."""
    drop = torch.rand(len(captions), generator=generator) < EMPTY_PROMPT_RATE
    return ["" if d else caption for caption, d in zip(captions, drop.tolist(), strict=True)]


def mark_loss_weights(marks: torch.Tensor, latent_size: Sequence[int], weight: float) -> torch.Tensor | None:
    """The U-Net loss's weights at latent resolution: ``weight`` in every latent cell a prior mark touches, 1 elsewhere.

    A mark covers a few percent of its image, so under a plain loss its caption's words barely move the U-Net;
    None (the plain loss) when ``weight`` is 1.
    """
    if weight == 1:
        return None
    touched = F.adaptive_max_pool2d(marks.float(), tuple(latent_size))
    return 1 + (weight - 1) * touched


def denoising_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    *,
    loss_mask: torch.Tensor | None = None,
    predictor: NoisePredictor = unet_output,
) -> torch.Tensor:
    """The LDM loss ||target − ε_θ(z_t, t, c)||² at uniform random t; the target follows the prediction type.

    With ``loss_mask`` (B, 1, h, w) at latent resolution the error is multiplied by it before the mean:
    AnomalyDiffusion's masked loss ||m ⊙ (ε − ε_θ)||² (its mean over every element, masked-out ones as zeros).
    ``predictor`` is the network call (default: the plain U-Net; CADiff's: a ControlNet with SAIM).
    """
    latents = latents.float()  # the forward process in float32: in bf16, ᾱ_t near 1 rounds to 1
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = torch.randint(0, model.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = model.scheduler.add_noise(latents, noise, steps)
    prediction = predictor(model, noisy, steps.to(latents.device), context)
    kind = model.scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = model.scheduler.get_velocity(latents, noise, steps.to(latents.device))
    else:
        msg = f"prediction_type {kind!r} is not supported for training (epsilon or v_prediction)"
        raise ValueError(msg)
    error = prediction.float() - target.float()
    if loss_mask is not None:
        error = error * loss_mask.to(error)
    return error.square().mean()
