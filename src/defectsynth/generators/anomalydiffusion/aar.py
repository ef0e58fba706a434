"""AnomalyDiffusion's Adaptive Attention Re-weighting, AAR (paper 000, Sec. 3.3, Eq. 7-8).

At every denoising step a weight map ``w_m`` is computed from how far the current x0 prediction still is
from the normal image inside the mask, and the cross-attention probabilities are multiplied by it (Eq. 8,
``SpatialReweight`` in ``diffusion.attention_rules``), so in-mask pixels that still look normal get more
attention. Two forms of Eq. 7:

- ``paper_weight_map`` (form "paper"), Eq. 7 as printed: ``w_m = ||m||₁ · Softmax(f(||m⊙y − m⊙x̂0||²))``
  with x̂0 = D(pred_x0) the decoded prediction, f(x) = 1/x for x ≠ 0 and −∞ for x = 0 (the OCR of f is
  garbled; reconstructed from the prose and the code's ``1/dis_map``). It needs one VAE decode per step.
- ``latent_weight_map`` (form "latent"), the authors' code (``ldm/models/diffusion/ddim.py``): the
  distance on latents (mean over channels) at latent resolution, normalised as ``||m||₁ · (1/d) / Σ(1/d)``
  instead of a softmax (the code's comment: "replace the softmax"). No decode.

Both forms are normalised the same way by default: weights average exactly 1 over the mask and are 0
outside it. The code's own variant (weights clamped to [1, 1.5], 1 outside the mask, a step-dependent
mask dilation) is ``latent_weight_map(code_clamp=True)`` with ``dilation=code_dilation_schedule(steps)``.

Where the code differs from the paper in ways this module does not copy by default (report, not bug):

- the code measures the current noisy latent x_t against the clean normal latent y_0, not x̂0 against y
  (``latent_source="latents"`` reproduces the choice of input);
- the code multiplies the pre-softmax scores of BOS and the placeholder tokens (e_a, e_s) by the map, and
  only on its unguided path; Eq. 8 multiplies the probabilities, which is what ``SpatialReweight`` does.

Usage, the generator's two lines (the control installed on the U-Net with ``installed``)::

    aar = install_aar(control, model=model, normal=normal_latents, mask=mask, form="paper")
    latents = denoise(model, latents, cond, sampler=sampler, control=control, blend=blend, on_step=aar)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812

from defectsynth.diffusion.attention import AttentionControl, Select, SpatialReweight

if TYPE_CHECKING:
    from defectsynth.diffusion.model import DiffusionModel

AARForm = Literal["paper", "latent", "code"]
LatentSource = Literal["pred_x0", "latents"]
DilationSchedule = Callable[[int], int]
"""Mask dilation radius (latent cells) as a function of the timestep of the step that produced x̂0."""

FORMS = ("paper", "latent", "code")
LATENT_SOURCES = ("pred_x0", "latents")
CODE_CLAMP = (1.0, 1.5)  # the code's bounds on the weights (ddim.py)


def binary_mask(mask: torch.Tensor, size: Sequence[int], *, threshold: float = 0.5) -> torch.Tensor:
    """A (B, 1, H, W) mask as a {0, 1} float mask of spatial ``size``.

    Shrinking area-averages, and a cell is inside when at least ``threshold`` of it is covered; a sample
    left empty by that (a defect smaller than a cell) falls back to every cell it touches, so a non-empty
    mask never vanishes at latent resolution. Growing is nearest-neighbour (exact for integer factors,
    e.g. a latent mask to image resolution). At the same size the mask is binarised at ``threshold``.

    Args:
        mask: (B, 1, H, W), 1 = inside (binary or soft).
        size: the output (height, width).
        threshold: coverage that makes a cell inside.

    Returns:
        (B, 1, *size) float32 of zeros and ones.

    Raises:
        ValueError: if ``mask`` is not (B, 1, H, W).
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        msg = f"masks must be (B, 1, H, W), got {tuple(mask.shape)}"
        raise ValueError(msg)
    size = (int(size[0]), int(size[1]))
    mask = mask.float()
    if mask.shape[-2:] == size:
        return (mask >= threshold).float()
    if size[0] > mask.shape[-2] or size[1] > mask.shape[-1]:
        return (F.interpolate(mask, size=size, mode="nearest") >= threshold).float()
    coverage = F.interpolate(mask, size=size, mode="area")
    inside = coverage >= threshold
    touched = coverage > 0
    empty = ~inside.flatten(1).any(dim=1)
    return torch.where(empty[:, None, None, None], touched, inside).float()


def _inside(mask: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The bool inside mask (B, 1, H, W) at ``size`` and its area ||m||₁ per sample (B, 1, 1, 1); empty is an error."""
    inside = binary_mask(mask, size).bool()
    area = inside.flatten(1).sum(dim=1).view(-1, 1, 1, 1)
    if (area == 0).any():
        empty = (area.flatten() == 0).nonzero().flatten().tolist()
        msg = f"AAR needs a non-empty mask; samples {empty} have none"
        raise ValueError(msg)
    return inside, area


def paper_weight_map(pred_x0_image: torch.Tensor, normal_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7 as printed: ``w_m = ||m||₁ · Softmax(f(||m⊙y − m⊙x̂0||²))``, f(x) = 1/x, f(0) = −∞.

    The distance is the per-pixel squared distance summed over channels, on images in [-1, 1] (the VAE's
    range, what ``DiffusionModel.decode_latents`` returns). The scale matters: 1/x acts as a softmax
    temperature, so [0, 1] images would give a 4x sharper map. The softmax runs over the pixels inside the
    mask only (f = −∞ outside, where m⊙y − m⊙x̂0 = 0), and scaling by the mask area ||m||₁ makes the
    weights average exactly 1 over the mask; outside they are 0.

    Rules at the edges:

    - a pixel inside the mask with distance exactly 0 gets f = −∞, i.e. weight 0, as the paper's f says
      (a discontinuity: distance 1e-6 gives the largest weight, 0 gives none);
    - if every in-mask pixel has distance 0 (the softmax is undefined), the weights are uniform: 1 inside.

    Numerics: the softmax is taken in float64 with the maximum subtracted, i.e. the exact form
    ``exp(1/d − 1/d_min) / Σ exp(1/d − 1/d_min)``; no temperature is added. Because 1/d has no
    temperature the map is very peaked once distances are small (two pixels at d = 0.01 and 0.02 differ
    by e^50): in practice it concentrates the mask's weight on the few most normal-looking pixels. That
    is the printed equation; the authors' code replaced the softmax (``latent_weight_map``).

    Args:
        pred_x0_image: x̂0 = D(pred_x0), (B, C, H, W) in [-1, 1].
        normal_image: y, (B or 1, C, H, W) in [-1, 1].
        mask: m, (B or 1, 1, H', W'), 1 = inside; binarised at 0.5 at the image's (H, W) (``binary_mask``).

    Returns:
        w_m, (B, 1, H, W) float32: mean 1 over the mask, 0 outside.

    Raises:
        ValueError: on mismatched shapes or an empty mask.
    """
    # 1. check inputs
    if pred_x0_image.ndim != 4 or normal_image.ndim != 4 or pred_x0_image.shape[1:] != normal_image.shape[1:]:
        msg = f"images must be (B, C, H, W) alike, got {tuple(pred_x0_image.shape)} and {tuple(normal_image.shape)}"
        raise ValueError(msg)
    inside, area = _inside(mask.to(pred_x0_image.device), pred_x0_image.shape[-2:])

    # 2. x = ||m⊙y − m⊙x̂0||² per pixel (summed over channels), in float64
    distance = (normal_image.double() - pred_x0_image.double()).pow(2).sum(dim=1, keepdim=True)
    distance, inside = torch.broadcast_tensors(distance, inside)
    area = area.expand(distance.shape[0], -1, -1, -1)

    # 3. f(x) = 1/x for x ≠ 0, −∞ for x = 0 and outside the mask (finite-capped so 1/denormal is not inf)
    scored = inside & (distance > 0)
    logits = torch.where(scored, distance.reciprocal(), -torch.inf).clamp(max=torch.finfo(torch.float64).max)

    # 4. softmax over the in-mask pixels, max subtracted; uniform where every in-mask distance is 0
    flat = logits.flatten(1)
    has_scores = scored.flatten(1).any(dim=1, keepdim=True)
    peak = torch.where(has_scores, flat.max(dim=1, keepdim=True).values, 0.0)
    exp = (flat - peak).exp()  # exp(−∞) = 0 outside the mask and at x = 0
    softmax = exp / exp.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    uniform = inside.flatten(1).double() / area.flatten(1)
    softmax = torch.where(has_scores, softmax, uniform)

    # 5. w_m = ||m||₁ · Softmax(...): mean 1 over the mask, 0 outside
    return (softmax.view_as(distance) * area).float()


def code_dilation_schedule(num_steps: int) -> DilationSchedule:
    """The code's mask dilation radius in latent cells: ``(t + 100)·16 // 1000`` for 50 steps, else ``·8``.

    The code dilates with a (2r+1)² max filter, so at t ≈ 981 (50 steps) the radius 17 covers most of a
    32×32 latent and at the last steps it is 1.
    """
    factor = 16 if num_steps == 50 else 8

    def radius(timestep: int) -> int:
        return max(int(timestep) + 100, 0) * factor // 1000

    return radius


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A binary (B, 1, h, w) mask dilated by a (2·radius+1)² square, as the code's ``Dilation2d``."""
    if radius < 0:
        msg = f"dilation radius must be >= 0, got {radius}"
        raise ValueError(msg)
    if radius == 0:
        return mask
    return F.max_pool2d(mask.float(), kernel_size=2 * radius + 1, stride=1, padding=radius)


def latent_weight_map(
    pred_x0_latent: torch.Tensor,
    normal_latent: torch.Tensor,
    mask: torch.Tensor,
    *,
    code_clamp: bool = False,
    dilation_radius: int = 0,
) -> torch.Tensor:
    """The authors' latent form of Eq. 7: ``||m||₁ · (1/d) / Σ_m (1/d)``, d the latent distance.

    d is the squared latent difference averaged over channels, at latent resolution, as in the code's
    ``((mask * (img - x0)) ** 2).mean(dim=1)``. The mask is given at latent or image resolution; it is
    brought to latent resolution with ``binary_mask`` (area coverage >= 0.5, falling back to touched
    cells for a defect smaller than a cell), then dilated by ``dilation_radius`` cells (0: none).

    Two normalisations:

    - default: weights average exactly 1 over the mask and are 0 outside, as the paper's form.
      Distance 0 inside the mask gets weight 0 (the same rule as the paper form's f(0) = −∞), and if
      every in-mask distance is 0 the weights are uniform, 1 inside. Computed in float64 as
      ``||m||₁ · (d_min/d) / Σ (d_min/d)``, which cannot overflow.
    - ``code_clamp=True``: the code exactly. A zero distance inside the mask becomes −1 before the
      reciprocal (``torch.where(dis_map == 0, -1, dis_map)``) and stays in the sum; the normalised weights
      are then clamped to [1, 1.5] (so the map only boosts the more-normal pixels, never damps), 1
      outside the mask, and all ones when the in-mask sum of 1/d is 0.

    Args:
        pred_x0_latent: the latents compared, (B, C, h, w) (x̂0's latents; the code uses x_t).
        normal_latent: y_0's latents, (B or 1, C, h, w).
        mask: (B or 1, 1, H, W) at latent or image resolution, 1 = inside.
        code_clamp: the code's clamp-to-[1, 1.5], ones-outside variant.
        dilation_radius: dilate the latent mask by this many cells first (``code_dilation_schedule``).

    Returns:
        (B, 1, h, w) float32 weights.

    Raises:
        ValueError: on mismatched shapes, a negative radius or an empty mask.
    """
    # 1. check inputs; the mask at latent resolution, dilated
    if pred_x0_latent.ndim != 4 or normal_latent.ndim != 4 or pred_x0_latent.shape[1:] != normal_latent.shape[1:]:
        msg = f"latents must be (B, C, h, w) alike, got {tuple(pred_x0_latent.shape)} and {tuple(normal_latent.shape)}"
        raise ValueError(msg)
    inside, _ = _inside(mask.to(pred_x0_latent.device), pred_x0_latent.shape[-2:])
    inside = dilate(inside, dilation_radius).bool()

    # 2. d = mean over channels of (z − y_0)², float64
    distance = (pred_x0_latent.double() - normal_latent.double()).pow(2).mean(dim=1, keepdim=True)
    distance, inside = torch.broadcast_tensors(distance, inside)
    area = inside.flatten(1).sum(dim=1, keepdim=True).double()
    if code_clamp:
        return _code_weights(distance.flatten(1), inside.flatten(1), area).view_as(distance).float()

    # 3. (1/d) relative to the smallest in-mask distance: d_min/d in (0, 1], 0 at d = 0 and outside
    scored = inside & (distance > 0)
    flat, flat_scored = distance.flatten(1), scored.flatten(1)
    d_min = torch.where(flat_scored, flat, torch.inf).min(dim=1, keepdim=True).values
    ratio = torch.where(flat_scored, d_min / flat, 0.0)

    # 4. ||m||₁ · ratio / Σ ratio; uniform 1 inside where every in-mask distance is 0
    total = ratio.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, area * ratio / total.clamp_min(1.0), inside.flatten(1).double())
    return weights.view_as(distance).float()


def _code_weights(distance: torch.Tensor, inside: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """The code's normalisation on flat (B, N) float64 inputs; see ``latent_weight_map(code_clamp=True)``."""
    masked = torch.where(inside, distance, 0.0)  # the code: (new_mask * (img - x0)) ** 2
    reciprocal = torch.where(masked == 0, -1.0, masked).reciprocal()
    reciprocal = torch.where(inside, reciprocal, 0.0)  # dis_map = new_mask * dis_map
    total = reciprocal.sum(dim=1, keepdim=True)
    weights = area * reciprocal / total
    weights = torch.where(weights == 0, 1.0, weights).clamp(*CODE_CLAMP)  # 0 (outside) -> 1, then [1, 1.5]
    return torch.where(total == 0, 1.0, weights)


class AARUpdater:
    """The per-step AAR update, usable as ``denoise(on_step=...)``: a new weight map from each step's x̂0.

    After step ``index`` the sampler hands over ``pred_x0`` (latents); the updater computes Eq. 7 in the
    chosen form and sets it on the control's spatial re-weighting, which then applies from the next U-Net
    call on (the code computes the map at the start of a step from the same state, so the two agree). The
    first step uses ``initial_map()``. Maps carry the batch of the normal / mask (B or 1); a guidance batch
    tiles them onto both halves (use ``Select(batch="cond")`` for the conditional half only).

    Attributes:
        control: the attention control whose spatial re-weighting is updated.
        model: the diffusion model (decodes x̂0 in the paper form; encodes a normal image for the latent form).
        form: "paper" (decoded x̂0, softmax of 1/x, image resolution), "latent" (the code's, latent resolution)
            or "code" (the latent form with ``code_clamp``, as the authors ship it); stored as "paper" or "latent".
        mask: the conditioning mask (B or 1, 1, H, W) at image or latent resolution, 1 = inside.
        normal_latent: y_0's latents (B or 1, C, h, w).
        normal_image: y in [-1, 1] (B or 1, 3, H, W) for the paper form.
        code_clamp: the code's clamp-to-[1, 1.5], ones-outside variant (latent form only).
        dilation: mask dilation radius per timestep (latent form only), e.g. ``code_dilation_schedule(50)``.
        latent_source: what the latent form compares with y_0: "pred_x0" (x̂0, as Eq. 7) or "latents" (the
            new latents after the step, the code's choice).
        target: the re-weighting to update; None updates every spatial re-weighting of the control.
    """

    def __init__(
        self,
        control: AttentionControl,
        *,
        model: DiffusionModel,
        mask: torch.Tensor,
        form: AARForm = "paper",
        normal_latent: torch.Tensor | None = None,
        normal_image: torch.Tensor | None = None,
        code_clamp: bool = False,
        dilation: DilationSchedule | None = None,
        latent_source: LatentSource = "pred_x0",
        target: SpatialReweight | None = None,
    ) -> None:
        """Check the options and prepare the fixed references (y or y_0, the masks at their resolutions).

        For the paper form, y is ``normal_image`` when given (Eq. 7's y literally), else ``D(normal_latent)``
        decoded once: that removes the VAE's reconstruction error from the distance, so only what the
        generation changed counts. For the latent form, y_0 is ``normal_latent``, else E(normal_image).

        Raises:
            ValueError: on an unknown form or source, a missing normal, options of the other form, or an empty mask.
        """
        if form not in FORMS:
            msg = f"AAR form must be one of {FORMS}, got {form!r}"
            raise ValueError(msg)
        if latent_source not in LATENT_SOURCES:
            msg = f"latent_source must be one of {LATENT_SOURCES}, got {latent_source!r}"
            raise ValueError(msg)
        if normal_latent is None and normal_image is None:
            msg = "AAR needs the normal image's latents (normal_latent) or the normal image (normal_image)"
            raise ValueError(msg)
        if form == "code":
            form, code_clamp = "latent", True
        if form == "paper" and (code_clamp or dilation is not None or latent_source != "pred_x0"):
            msg = "code_clamp, dilation and latent_source belong to the latent form; the paper form has none"
            raise ValueError(msg)
        self.control, self.model, self.form, self.mask = control, model, form, mask
        self.code_clamp, self.dilation, self.latent_source, self.target = code_clamp, dilation, latent_source, target
        with torch.no_grad():
            if form == "paper":
                reference = normal_image if normal_image is not None else model.decode_latents(normal_latent)
                self.reference = reference.float()
            else:
                reference = normal_latent if normal_latent is not None else model.encode_images(normal_image)
                self.reference = reference.float()
        self._inside, _ = _inside(mask, self.reference.shape[-2:])

    def initial_map(self) -> torch.Tensor:
        """The map before the first x̂0: the normalised mask (1 inside, 0 outside), or all ones with ``code_clamp``."""
        if self.code_clamp:
            return torch.ones_like(self._inside, dtype=torch.float32)
        return self._inside.float()

    def weight_map(self, timestep: int, latents: torch.Tensor, pred_x0: torch.Tensor) -> torch.Tensor:
        """Eq. 7 in this updater's form for one step's output, (B, 1, H, W) or (B, 1, h, w)."""
        with torch.no_grad():
            if self.form == "paper":
                decoded = self.model.decode_latents(pred_x0)  # x̂0 = D(p_θ(z_0 | z_t, e)), in [-1, 1]
                return paper_weight_map(decoded, self.reference.to(decoded.device), self.mask)
            compared = pred_x0 if self.latent_source == "pred_x0" else latents
            radius = 0 if self.dilation is None else int(self.dilation(timestep))
            return latent_weight_map(
                compared,
                self.reference.to(compared.device),
                self.mask,
                code_clamp=self.code_clamp,
                dilation_radius=radius,
            )

    def __call__(self, index: int, timestep: int, latents: torch.Tensor, pred_x0: torch.Tensor) -> None:
        """The ``on_step`` callback: compute the new map from ``pred_x0`` and set it for the next step."""
        weight_map = self.weight_map(timestep, latents, pred_x0)
        if self.target is not None:
            self.target.set_weight_map(weight_map)
        else:
            self.control.set_weight_map(weight_map)


def install_aar(
    control: AttentionControl,
    *,
    model: DiffusionModel,
    normal: torch.Tensor,
    mask: torch.Tensor,
    form: AARForm = "paper",
    normal_image: torch.Tensor | None = None,
    tokens: Sequence[int] | None = None,
    where: Select | None = None,
    code_clamp: bool = False,
    dilation: DilationSchedule | None = None,
    latent_source: LatentSource = "pred_x0",
) -> AARUpdater:
    """Add AAR's spatial re-weighting (Eq. 8) to ``control`` and return the updater to pass as ``on_step``.

    Which tokens: the paper re-weights "the cross-attention map" and does not say which tokens; by default
    every token is re-weighted (``tokens=None``), which scales each pixel's whole cross-attention output by
    w. The code re-weights BOS and the placeholder tokens (e_a and e_s) only: pass their ids as ``tokens``
    to follow it. Which layers: every cross-attention layer at every step (``Select()``), the map
    area-averaged to each layer's side; ``where`` narrows it.

    Args:
        control: the attention control (install it on the U-Net with ``installed``).
        model: the diffusion model.
        normal: y_0, the normal image's latents (B or 1, C, h, w), as the ``BlendTarget`` holds them.
        mask: the conditioning mask (B or 1, 1, H, W), image or latent resolution, 1 = inside.
        form: "paper", "latent" or "code" (see ``AARUpdater``).
        normal_image: y in [-1, 1] for the paper form (default: D(normal), decoded once).
        tokens: token indices to re-weight; None for all.
        where: the layers, steps and batch rows covered; default every cross-attention layer.
        code_clamp: the code's clamp-to-[1, 1.5] variant (latent form).
        dilation: the latent form's mask dilation per timestep, e.g. ``code_dilation_schedule(steps)``.
        latent_source: "pred_x0" or "latents" (latent form).

    Returns:
        The ``AARUpdater``; ``denoise(..., control=control, on_step=updater)``.
    """
    updater = AARUpdater(
        control,
        model=model,
        mask=mask,
        form=form,
        normal_latent=normal,
        normal_image=normal_image,
        code_clamp=code_clamp,
        dilation=dilation,
        latent_source=latent_source,
    )
    updater.target = control.reweight(updater.initial_map(), tokens=tokens, where=where)
    return updater


__all__ = [
    "AARUpdater",
    "binary_mask",
    "code_dilation_schedule",
    "dilate",
    "install_aar",
    "latent_weight_map",
    "paper_weight_map",
]
