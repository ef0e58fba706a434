"""DiffusionAD (paper 003): a pixel DDPM and a segmentation U-Net trained jointly, norm-guided one-step inference.

Pipeline (paper Sec. 4). The *reconstruction sub-network* is an ε-predicting DDPM trained from scratch on
normal images ("noise-to-norm"). An input x_0 is noised at a small level t_s and a big level t_b (Eq. 1); one
U-Net pass per level predicts ε; the big level's one-step x_0 (Eq. 6) is the "norm" n that guides the small
level's prediction (Eq. 7), whose one-step x_0 is the reconstruction x̂_{0_g} (Eq. 8). The *segmentation
sub-network* (DRAEM's discriminative U-Net, :class:`~defectsynth.evaluation.segmenter.DiscriminativeUNet`
with 6 input channels) maps concat(x_0, x̂_{0_g}) to the anomaly map M̂; the image score is the mean of its
top-50 pixels. The one-step path itself is
:func:`~defectsynth.diffusion.one_step.norm_guided_x0`; this module wires it to a model, its losses
(Eq. 9-11) and the synthetic anomalies it trains on (Eq. 12).

Value ranges. Images enter every public function as float RGB in [0, 1]. The DDPM works in [-1, 1]
(``x_0 = 2 * image - 1``, the usual DDPM convention); the reconstruction is clamped to [-1, 1] (the released
code's ``.clamp(-1, 1)``) and mapped back to [0, 1] before the segmenter sees it next to the input image, so
both of its inputs share the [0, 1] range of :mod:`~defectsynth.evaluation.segmenter`. (The released code
feeds its DDPM unnormalised [0, 1] images and still clamps to [-1, 1], a loose bound there.)

Training. :meth:`DiffusionAD.forward` takes the batch *and* its noise (``noise_s, noise_b, t_s, t_b``, from
:func:`sample_training_noise`), so a DDP or DeepSpeed wrapper sees the whole loss computation in its forward
and a run is reproducible from its generators. It returns :class:`DiffusionADOutput` with
``loss = L_noise + L_mask`` (Eq. 11):

- ``L_noise`` (Eq. 9) = (1 - y) (||ε_s - ε_θ(x_{t_s})||² + ||ε_b - ε_θ(x_{t_b})||²) / 2, the squared norms as
  per-pixel means, averaged over the *normal* samples of the batch (0 when there are none), as the released
  code averages; the paper's "/ 2" is kept (the code omits it).
- ``L_mask`` (Eq. 10) = SmoothL1(M, M̂) + γ Focal(M, M̂) with γ = 5, on the softmax anomaly map.
- Gradients of ``L_mask`` flow into the denoiser through x̂_{0_g} (both U-Net passes): the paper trains the
  two sub-networks "jointly" with L_total (Eq. 11), and the released code neither detaches the reconstruction
  nor splits the backward pass. ``detach_reconstruction=True`` stops that flow (the denoiser then learns from
  L_noise only).

Ambiguities and the choices made (each is a config field unless noted):

- β schedule: the paper writes "linear from 10^-4 to 10^-2"; the released code (``get_beta_schedule``) uses
  DDPM's 10^-4 to 0.02, and its inference levels t_s = 200, t_b = 400 were tuned on that schedule, so
  ``beta_end = 0.02`` is the default (``beta_end = 1e-2`` gives the paper as written).
- Training levels: t_s ~ U{0..τ-1}, t_b ~ U{τ..T-1} with τ = 300, as the released code draws them (the paper
  writes S = {0..τ}, B = {τ+1..T}). ``args1.json`` also holds ``noisier_t_range = 600``, which the released
  training code never reads; ``t_b_max = 600`` applies it.
- Focal loss: the paper says "focal loss [27]"; the code uses a binary focal loss with exponent 4 and a
  uniform factor α = 0.5 on a sigmoid map. Here :func:`~defectsynth.evaluation.segmenter.focal_loss` on the
  two-class softmax (equivalent to a sigmoid of the logit difference) with ``focal_gamma = 4``,
  ``focal_alpha = 0.5`` (which weights both classes 0.5, the code's uniform factor).
- Learning rates: the paper's single Adam lr 1e-4; the code's segmenter lr 1e-5 is ``seg_lr = 1e-5``. The
  code's cosine schedule on the segmenter (T_max = 10 iterations) is not reproduced; no EMA (as the paper).
  The paper's 1e-4 is sized for 3000 epochs: in a CPU budget of a few hundred steps both sub-networks stay
  near chance at it, so ``configs/benchmark.yaml`` sets ``lr = 1e-3`` (the rate its segmenter gets);
  ``evaluate.learning_rate`` is the segmenter detector's only and never reaches this model.
- U-Net: diffusers' ``UNet2DModel`` (sinusoidal time embedding, ResNet blocks with time injection, attention
  at chosen levels and in the middle block, the ADM layout). ``attention_levels`` index the levels of
  ``block_out_channels`` (level i works at H / 2^i, negatives count from the lowest); the paper's "attention
  at 32, 16, 8" at 256 px with ADM's (1, 1, 2, 2, 4, 4) x 128 widths is levels (3, 4, 5). diffusers sets a
  head *width*, not a head count: :meth:`DiffusionADConfig.paper` uses 64, i.e. the paper's 4 heads on the
  256-wide levels and 8 on the 512-wide ones. Down/up-sampling is by convolution, not ADM's BigGAN ResBlocks.
- Synthetic anomalies (Eq. 12): M = Perlin mask x foreground (the whole image when there is no foreground;
  the paper uses "a random part of the image" for textures, which the Perlin draw already is); A = the
  normal image self-augmented (three random colour operations, flip, quarter turn and roll, the platform's
  :func:`~defectsynth.core.texture_augment.augment_texture`; the code's grid shuffle is not reproduced). DTD
  textures are not used here. β ~ U(0.2, 0.8), the released code's range (the paper leaves it unstated).
  Eq. 12 is evaluated in float (:func:`blend_anomaly`), not with :func:`~defectsynth.generators.perlin.blend`,
  which works on uint8 and would requantise the [0, 1] input; so pixels outside M are returned bit-exact.

Example:
    >>> import torch
    >>> cfg = DiffusionADConfig(block_out_channels=(8, 16), attention_head_dim=8, seg_base_width=4, seg_depth=2)
    >>> model = build_diffusionad(cfg)
    >>> out = predict(model, torch.rand(2, 3, 16, 16), seed=0)
    >>> tuple(out.anomaly_map.shape), tuple(out.pred_score.shape), tuple(out.reconstruction.shape)
    ((2, 1, 16, 16), (2,), (2, 3, 16, 16))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from defectsynth.core.perlin_noise import perlin_mask
from defectsynth.core.resize import resize_image
from defectsynth.core.texture_augment import augment_texture
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.one_step import NormGuidedOutput, norm_guided_x0
from defectsynth.evaluation.data import to_uint8
from defectsynth.evaluation.segmenter import DiscriminativeUNet, focal_loss, top_k_mean_score
from defectsynth.evaluation.settings import DiffusionADConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionADOutput:
    """What :meth:`DiffusionAD.forward` returns (training).

    Attributes:
        loss: L_total = L_noise + L_mask (Eq. 11), scalar, attached to the graph.
        noise_loss: L_noise (Eq. 9), averaged over the normal samples; 0 when the batch has none.
        mask_loss: L_mask (Eq. 10) = SmoothL1 + γ Focal.
        anomaly_map: ``B x 1 x H x W`` M̂, the softmax probability of the anomalous class.
        reconstruction: ``B x 3 x H x W`` x̂_{0_g} in [0, 1] (clamped when ``clip_reconstruction``), as the
            segmenter saw it.
    """

    loss: Tensor
    noise_loss: Tensor
    mask_loss: Tensor
    anomaly_map: Tensor
    reconstruction: Tensor


@dataclass(frozen=True)
class DiffusionADPrediction:
    """What :func:`predict` returns, detached.

    Attributes:
        anomaly_map: ``B x 1 x H x W`` pixel scores in [0, 1].
        pred_score: ``B`` image scores, the mean of the ``top_k`` highest pixels.
        reconstruction: ``B x 3 x H x W`` the norm-guided reconstruction x̂_{0_g} in [0, 1].
    """

    anomaly_map: Tensor
    pred_score: Tensor
    reconstruction: Tensor


class TrainingNoise(NamedTuple):
    """The random inputs of one training forward: ``model(images, masks, anomalous, *noise)``."""

    noise_s: Tensor  # B x C x H x W, ε for x_{t_s}
    noise_b: Tensor  # B x C x H x W, ε for x_{t_b}
    t_s: Tensor  # B long, in [0, τ)
    t_b: Tensor  # B long, in [τ, t_b_max)


@dataclass(frozen=True)
class _Pass:
    """One norm-guided reconstruction and segmentation (internal)."""

    guided: NormGuidedOutput
    eps_s: Tensor
    eps_b: Tensor
    reconstruction: Tensor  # [0, 1]
    anomaly_map: Tensor
    logits: Tensor


def linear_alphas_cumprod(cfg: DiffusionADConfig) -> Tensor:
    """ᾱ_t for t = 0..T-1 of the linear β schedule (float64), ``cumprod(1 - linspace(β_1, β_T, T))``."""
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _build_denoiser(cfg: DiffusionADConfig) -> nn.Module:
    """The ε-predicting ``UNet2DModel`` of ``cfg``; diffusers loads here, so a segmenter's worker never imports it."""
    from diffusers import UNet2DModel

    attended = set(cfg.resolved_attention_levels)
    levels = range(len(cfg.block_out_channels))
    return UNet2DModel(
        in_channels=3,
        out_channels=3,
        time_embedding_type="positional",  # sinusoidal, as ADM / the paper
        down_block_types=tuple("AttnDownBlock2D" if i in attended else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in attended else "UpBlock2D" for i in reversed(levels)),
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        add_attention=cfg.mid_attention,
        norm_num_groups=cfg.resolved_norm_groups,
        dropout=cfg.dropout,
    )


class DiffusionAD(nn.Module):
    """DiffusionAD's two sub-networks; ``forward`` computes the training losses, :func:`predict` infers.

    Attributes:
        cfg: the config the model was built from (rebuilds it: ``DiffusionAD(cfg)``).
        denoiser: the ε-predicting U-Net (diffusers ``UNet2DModel``), in [-1, 1] pixel space.
        segmenter: DRAEM's discriminative U-Net on concat(image, reconstruction), 6 channels.
        sampler: holds the linear-β schedule (ᾱ) for :func:`norm_guided_x0`; not a module, not in the state.

    Args:
        cfg: the hyper-parameters; the defaults when omitted.

    Example:
        >>> cfg = DiffusionADConfig(block_out_channels=(8, 16), attention_head_dim=8, seg_base_width=4, seg_depth=2)
        >>> model = DiffusionAD(cfg)
        >>> images = torch.rand(2, 3, 16, 16)
        >>> noise = sample_training_noise(images.shape, torch.Generator().manual_seed(0), cfg)
        >>> out = model(images, torch.zeros(2, 1, 16, 16), torch.zeros(2), *noise)
        >>> out.loss.ndim, tuple(out.anomaly_map.shape)
        (0, (2, 1, 16, 16))
    """

    def __init__(self, cfg: DiffusionADConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DiffusionADConfig()
        self.denoiser = _build_denoiser(self.cfg)
        self.segmenter = DiscriminativeUNet(in_channels=6, base_width=self.cfg.seg_base_width, depth=self.cfg.seg_depth)
        self.sampler = DDIMSampler(alphas_cumprod=linear_alphas_cumprod(self.cfg))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (both U-Nets halve the sides per level)."""
        return max(2 ** (len(self.cfg.block_out_channels) - 1), self.segmenter.size_multiple)

    def forward(
        self,
        images: Tensor,
        masks: Tensor,
        anomalous: Tensor,
        noise_s: Tensor,
        noise_b: Tensor,
        t_s: Tensor,
        t_b: Tensor,
    ) -> DiffusionADOutput:
        """The training losses of one batch (Eq. 9-11); the caller does ``backward`` and the optimiser step.

        Args:
            images: ``B x 3 x H x W`` float in [0, 1]: normal and synthetic-anomalous samples.
            masks: ``B x 1 x H x W`` ground-truth masks M in {0, 1} (empty for normal samples).
            anomalous: ``B`` labels y (1 anomalous, 0 normal); L_noise is weighted by 1 - y.
            noise_s: ``B x 3 x H x W`` ε_{t_s}, the noise of x_{t_s} and the target of its prediction.
            noise_b: ``B x 3 x H x W`` ε_{t_b}.
            t_s: ``B`` small levels (training: U{0..τ-1}).
            t_b: ``B`` big levels (training: U{τ..t_b_max-1}).

        Returns:
            The losses, the anomaly map and the reconstruction.
        """
        self._check_batch(images, masks, anomalous, noise_s, noise_b, t_s, t_b)
        run = self._reconstruct_and_segment(images, t_s, t_b, noise_s=noise_s, noise_b=noise_b)
        # 1. Eq. 9: L_noise = (1 - y)(||ε_s - ε_θ(x_{t_s})||² + ||ε_b - ε_θ(x_{t_b})||²) / 2, over normal samples
        per_sample = (_mse(run.eps_s, noise_s) + _mse(run.eps_b, noise_b)) / 2
        normal = 1.0 - anomalous.to(per_sample.dtype)
        noise_loss = (normal * per_sample).sum() / normal.sum().clamp(min=1.0)
        # 2. Eq. 10: L_mask = SmoothL1(M, M̂) + γ Focal(M, M̂)
        target = masks.to(run.anomaly_map.dtype)
        smooth_l1 = F.smooth_l1_loss(run.anomaly_map, target, beta=self.cfg.smooth_l1_beta)
        focal = focal_loss(run.logits, target, gamma=self.cfg.focal_gamma, alpha=self.cfg.focal_alpha)
        mask_loss = smooth_l1 + self.cfg.focal_weight * focal
        # 3. Eq. 11: L_total = L_noise + L_mask
        return DiffusionADOutput(
            loss=noise_loss + mask_loss,
            noise_loss=noise_loss,
            mask_loss=mask_loss,
            anomaly_map=run.anomaly_map,
            reconstruction=run.reconstruction,
        )

    def _reconstruct_and_segment(
        self,
        images: Tensor,
        t_s: int | Tensor,
        t_b: int | Tensor,
        *,
        noise_s: Tensor | None = None,
        noise_b: Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> _Pass:
        """Norm-guided one-step reconstruction (Eq. 6-8) and segmentation of concat(x_0, x̂_{0_g})."""
        self._check_images(images)
        # 1. the DDPM's range: x_0 = 2 * image - 1
        x0 = images * 2.0 - 1.0
        predicted: list[tuple[Tensor, Tensor]] = []

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            eps = self.denoiser(x_t, t, return_dict=False)[0]
            predicted.append((t, eps))
            return eps

        # 2. Eq. 6-8: two U-Net passes (t_s then t_b), n = x̂_{0_b}, guided ε̂, x̂_{0_g}
        guided = norm_guided_x0(
            eps_fn,
            x0,
            t_s=t_s,
            t_b=t_b,
            sampler=self.sampler,
            w=self.cfg.w,
            generators=generators,
            noise_s=noise_s,
            noise_b=noise_b,
        )
        (seen_s, eps_s), (_, eps_b) = predicted  # norm_guided_x0 predicts ε at t_s first, then at t_b
        if not torch.equal(seen_s, torch.as_tensor(t_s, device=seen_s.device).long().expand_as(seen_s)):
            msg = "norm_guided_x0 did not predict ε at t_s first"
            raise RuntimeError(msg)
        # 3. back to [0, 1] (clamped to [-1, 1] first, as the released code does)
        x0_g = guided.x0_guided.clamp(-1.0, 1.0) if self.cfg.clip_reconstruction else guided.x0_guided
        reconstruction = (x0_g + 1.0) / 2.0
        seen = reconstruction.detach() if self.cfg.detach_reconstruction else reconstruction
        # 4. segmentation of concat(x_0, x̂_{0_g}), both in [0, 1]
        seg = self.segmenter(torch.cat((images, seen.to(images.dtype)), dim=1))
        return _Pass(
            guided=guided,
            eps_s=eps_s,
            eps_b=eps_b,
            reconstruction=reconstruction,
            anomaly_map=seg.anomaly_map,
            logits=seg.logits,
        )

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"expected images of shape B x 3 x H x W, got {tuple(images.shape)}"
            raise ValueError(msg)
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            msg = f"image sides must be multiples of {self.size_multiple}, got {height}x{width}"
            raise ValueError(msg)

    def _check_batch(
        self,
        images: Tensor,
        masks: Tensor,
        anomalous: Tensor,
        noise_s: Tensor,
        noise_b: Tensor,
        t_s: Tensor,
        t_b: Tensor,
    ) -> None:
        self._check_images(images)
        batch, _, height, width = images.shape
        if tuple(masks.shape) != (batch, 1, height, width):
            msg = f"masks must be {(batch, 1, height, width)}, got {tuple(masks.shape)}"
            raise ValueError(msg)
        if noise_s.shape != images.shape or noise_b.shape != images.shape:
            msg = f"noise_s and noise_b must match the images {tuple(images.shape)}"
            raise ValueError(msg)
        for name, value in (("anomalous", anomalous), ("t_s", t_s), ("t_b", t_b)):
            if tuple(value.shape) != (batch,):
                msg = f"{name} must have shape ({batch},), got {tuple(value.shape)}"
                raise ValueError(msg)
        steps = self.cfg.num_train_timesteps
        if bool((t_s < 0).any() | (t_b >= steps).any() | (t_s >= steps).any() | (t_b < 0).any()):
            msg = f"t_s and t_b must lie in [0, {steps})"
            raise ValueError(msg)


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error, ``B``."""
    return (prediction.float() - target.float()).square().flatten(1).mean(dim=1)


def _unwrap(model: nn.Module) -> DiffusionAD:
    """The :class:`DiffusionAD` inside a DDP / DeepSpeed wrapper (``.module``), or the model itself."""
    core = model
    while not isinstance(core, DiffusionAD) and isinstance(getattr(core, "module", None), nn.Module):
        core = core.module
    if not isinstance(core, DiffusionAD):
        msg = f"expected a DiffusionAD (or a wrapper of one), got {type(model).__name__}"
        raise TypeError(msg)
    return core


def build_diffusionad(cfg: DiffusionADConfig | None = None) -> DiffusionAD:
    """Build the two sub-networks a config describes (seed torch beforehand for reproducible weights).

    Args:
        cfg: the hyper-parameters; the defaults when omitted.

    Returns:
        A freshly initialised model in training mode.
    """
    return DiffusionAD(cfg)


def configure_optimizer(model: nn.Module, cfg: DiffusionADConfig) -> torch.optim.Adam:
    """Adam over both sub-networks (paper: lr 1e-4); the segmenter at ``cfg.seg_lr`` when it is set (code: 1e-5).

    Args:
        model: the :class:`DiffusionAD`, possibly wrapped (``.module``).
        cfg: the optimiser fields (``lr``, ``seg_lr``, ``weight_decay``).

    Returns:
        The optimiser: one parameter group, or two (denoiser first, segmenter second) when ``seg_lr`` is set.
    """
    core = _unwrap(model)
    if cfg.seg_lr is None:
        return torch.optim.Adam(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [
        {"params": list(core.denoiser.parameters()), "lr": cfg.lr},
        {"params": list(core.segmenter.parameters()), "lr": cfg.seg_lr},
    ]
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def sample_training_noise(
    shape: Sequence[int],
    generator: torch.Generator | None,
    cfg: DiffusionADConfig,
    *,
    device: torch.device | str | None = None,
) -> TrainingNoise:
    """Draw the random inputs of one training forward: ε_s, ε_b, t_s ~ U{0..τ-1}, t_b ~ U{τ..t_b_max-1}.

    Draw order (the contract for reproducibility): one ``randn`` of ``(2, *shape)`` (ε_s = [0], ε_b = [1]),
    then t_s, then t_b, all from ``generator`` on the CPU, then moved to ``device``.

    Args:
        shape: the image batch shape ``(B, C, H, W)``.
        generator: a CPU generator; None uses torch's global one.
        cfg: gives τ, ``t_b_max`` and T.
        device: where the tensors go (default CPU).

    Returns:
        ``(noise_s, noise_b, t_s, t_b)``, a :class:`TrainingNoise`.
    """
    shape = tuple(int(side) for side in shape)
    if len(shape) != 4:
        msg = f"expected an image batch shape (B, C, H, W), got {shape}"
        raise ValueError(msg)
    noise = torch.randn((2, *shape), generator=generator)
    t_s = torch.randint(0, cfg.tau, (shape[0],), generator=generator)
    t_b = torch.randint(cfg.tau, cfg.t_b_stop, (shape[0],), generator=generator)
    return TrainingNoise(noise[0].to(device), noise[1].to(device), t_s.to(device), t_b.to(device))


def blend_anomaly(normal: Tensor, source: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """Eq. 12: ``S = β (M ⊙ N) + (1 - β)(M ⊙ A) + M̄ ⊙ N``, literally (so pixels where M = 0 are N exactly).

    Args:
        normal: N, ``B x C x H x W`` (or ``C x H x W``).
        source: A, the anomaly appearance, shaped like ``normal``.
        mask: M in [0, 1], broadcastable to ``normal`` (``B x 1 x H x W``).
        beta: β, the weight of N inside the mask: a float or a ``B`` tensor.

    Returns:
        The synthetic anomalous image S.
    """
    beta_t = torch.as_tensor(beta, dtype=normal.dtype, device=normal.device)
    if beta_t.ndim == 1:
        beta_t = beta_t.reshape(-1, *([1] * (normal.ndim - 1)))
    mask = mask.to(normal.dtype)
    return beta_t * (mask * normal) + (1.0 - beta_t) * (mask * source) + (1.0 - mask) * normal


def _anomaly_mask(
    shape: tuple[int, int], foreground: np.ndarray | None, rng: np.random.Generator, cfg: DiffusionADConfig
) -> np.ndarray:
    """A Perlin mask on the foreground, or an empty one when none can be drawn (see synthesize_anomalies)."""
    needed = max(cfg.perlin_min_area, 1)
    if foreground is not None and int(foreground.sum()) < needed:
        logger.debug("foreground of %d px is below perlin_min_area; the sample stays normal", int(foreground.sum()))
        return np.zeros(shape, dtype=bool)
    try:
        return perlin_mask(
            shape,
            rng,
            threshold=cfg.perlin_threshold,
            foreground=foreground,
            min_area=cfg.perlin_min_area,
            scale_exponents=cfg.perlin_scale_exponents,
            max_attempts=cfg.perlin_max_attempts,
        )
    except ValueError as error:  # only the "no mask after max_attempts" case: shapes are checked beforehand
        logger.warning("no Perlin mask for a sample (%s); it stays normal", error)
        return np.zeros(shape, dtype=bool)


def synthesize_anomalies(
    normals: Tensor, foregrounds: Tensor | None, rng: np.random.Generator, cfg: DiffusionADConfig
) -> tuple[Tensor, Tensor]:
    """DiffusionAD's synthetic anomalies (Sec. 4.4, Eq. 12) on a batch of normal images.

    Per sample i, in this draw order: M = a Perlin mask (``perlin_mask``: threshold, random scale and
    rotation) restricted to the foreground (the whole image when ``foregrounds`` is None); A =
    ``augment_texture`` of the sample's own uint8 image (``shift=True``; DTD textures are not used here); β ~
    U(``beta_range``); then S = Eq. 12 (:func:`blend_anomaly`). Pixels outside M are the input's exactly.

    Empty masks. ``perlin_mask`` retries fresh fields until the mask holds ``perlin_min_area`` pixels on the
    foreground and raises after ``perlin_max_attempts``; a foreground smaller than ``perlin_min_area`` can never
    hold one. In both cases the sample is returned unchanged with an empty mask (and no texture or β is
    drawn for it): it is a normal sample, so derive the labels as ``masks.flatten(1).amax(1) > 0`` (as the
    released code sets ``has_anomaly`` from the mask).

    Args:
        normals: ``B x 3 x H x W`` float in [0, 1].
        foregrounds: ``B x 1 x H x W`` (values above 0.5 are foreground), or None for textures.
        rng: the only source of randomness.
        cfg: the Perlin and β fields.

    Returns:
        ``(images, masks)``: ``B x 3 x H x W`` in [0, 1] and ``B x 1 x H x W`` in {0, 1}, ``normals``' dtype and
        device.
    """
    if normals.ndim != 4 or normals.shape[1] != 3:
        msg = f"expected normals of shape B x 3 x H x W, got {tuple(normals.shape)}"
        raise ValueError(msg)
    batch, _, height, width = normals.shape
    if foregrounds is not None and tuple(foregrounds.shape) != (batch, 1, height, width):
        msg = f"foregrounds must be {(batch, 1, height, width)} or None, got {tuple(foregrounds.shape)}"
        raise ValueError(msg)
    pixels = to_uint8(normals)
    fg = None if foregrounds is None else (foregrounds[:, 0] > 0.5).cpu().numpy()
    masks = np.zeros((batch, height, width), dtype=bool)
    sources = pixels.copy()  # A; equal to N where no anomaly is drawn (unused there: M = 0)
    betas = np.ones(batch)
    for i in range(batch):
        # 1. M = Perlin mask x foreground
        masks[i] = _anomaly_mask((height, width), None if fg is None else fg[i], rng, cfg)
        if not masks[i].any():
            continue
        # 2. A = the self-augmented normal; 3. the opacity β
        texture = augment_texture(pixels[i], rng, shift=True)
        sources[i] = texture if texture.shape[:2] == (height, width) else resize_image(texture, (height, width))
        betas[i] = rng.uniform(*cfg.beta_range)
    # 4. Eq. 12
    mask_t = torch.from_numpy(masks)[:, None].to(device=normals.device, dtype=normals.dtype)
    source_t = torch.from_numpy(sources).permute(0, 3, 1, 2).to(device=normals.device, dtype=normals.dtype) / 255.0
    beta_t = torch.from_numpy(betas).to(device=normals.device, dtype=normals.dtype)
    return blend_anomaly(normals, source_t, mask_t, beta_t), mask_t


def predict(model: nn.Module, images: Tensor, *, seed: int = 0) -> DiffusionADPrediction:
    """Norm-guided one-step inference at the config's fixed t_s, t_b and w; eval mode, no autograd.

    Every image gets the same two noise fields, drawn from ``torch.Generator().manual_seed(seed)`` (one
    generator per image, all seeded alike), so an image's result depends only on the image and the seed,
    never on its batch or position. The model's mode is restored.

    Args:
        model: the :class:`DiffusionAD`, possibly wrapped (``.module``).
        images: ``B x 3 x H x W`` float in [0, 1]; moved to the model's device.
        seed: the noise seed.

    Returns:
        The anomaly maps, the image scores (mean of the top-k pixels) and the reconstructions, detached.
    """
    core = _unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(core.parameters())
            images = images.to(param.device, dtype=torch.float32)
            generators = [torch.Generator().manual_seed(int(seed)) for _ in range(images.shape[0])]
            run = core._reconstruct_and_segment(images, core.cfg.t_s, core.cfg.t_b, generators=generators)
            return DiffusionADPrediction(
                anomaly_map=run.anomaly_map,
                pred_score=top_k_mean_score(run.anomaly_map, core.cfg.top_k),
                reconstruction=run.reconstruction,
            )
    finally:
        model.train(was_training)
