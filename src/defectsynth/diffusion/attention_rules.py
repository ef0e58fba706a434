"""What an attention control does at one layer call: where it acts, and the probability edits.

``attention`` runs the U-Net's attention layers; this module holds the rules it applies there:

- ``Select``: which layers (cross/self, place, resolution, path pattern), which steps and which batch
  rows an operation covers;
- ``Restrict``: BADG's inside/outside attention (paper 001, Eq. 10-11);
- ``SpatialReweight``: AnomalyDiffusion's re-weighting by a spatial weight map (paper 000, Eq. 8);
- ``MaskedReweight`` with a ``FocusGate`` such as ``DelayedFocusGate``: CADiff's IAR, Masked Focus
  Attention gated by the Delayed Focus Scheduler (paper 004, Eq. 11).

Every edit maps the attention probabilities P (B, heads, N, L) of one layer call (N query pixels,
L text tokens) to new probabilities; the layer output is then P·V. Edits never renormalise.

Example:
    >>> import torch
    >>> gate = DelayedFocusGate(threshold=0.75)
    >>> token_map = torch.zeros(1, 4, 4)
    >>> token_map[:, :2, :2] = 1.0
    >>> mask = torch.zeros(1, 4, 4)
    >>> mask[:, :2, :] = 1.0
    >>> gate.alpha(token_map, mask)  # 4 of the 8 mask pixels are above the map's mean
    tensor([0.5000])
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F  # noqa: N812

StepRule = Collection[int] | Callable[[int, int | None], bool] | None
"""Steps an operation covers: None (all), a set of step indices, or a predicate on (index, timestep)."""


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of the U-Net, as its processor knows it."""

    path: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    place: str  # "down", "mid" or "up"
    is_cross: bool  # attn2 (text keys) vs attn1 (pixel keys)


@dataclass(frozen=True)
class LayerCall:
    """One call of one layer: the layer, its attention side (sqrt of query pixels) and the current step."""

    layer: LayerInfo
    side: int
    step: int
    timestep: int | None


@dataclass(frozen=True)
class Select:
    """Where an operation acts. Every field left at None matches everything.

    Attributes:
        cross: True for cross-attention layers only (the default), False for self-attention only,
            None for both.
        places: U-Net parts, a subset of {"down", "mid", "up"}.
        resolutions: attention sides, e.g. {16, 8} (a 16×16 layer has 256 query pixels).
        paths: ``fnmatch`` patterns on the processor path, e.g. ``"down_blocks.2.*attn2*"``.
        steps: step indices, or a predicate on (step index, timestep).
        batch: rows of the layer's batch: "all", "cond" (the second half, the conditional rows of a
            classifier-free-guidance batch laid out [uncond; cond] as diffusers does), or a slice.
    """

    cross: bool | None = True
    places: Collection[str] | None = None
    resolutions: Collection[int] | None = None
    paths: Collection[str] | None = None
    steps: StepRule = None
    batch: Literal["all", "cond"] | slice = "all"

    def matches(self, call: LayerCall) -> bool:
        """Whether this layer call is covered."""
        layer = call.layer
        return (
            (self.cross is None or layer.is_cross == self.cross)
            and (self.places is None or layer.place in self.places)
            and (self.resolutions is None or call.side in self.resolutions)
            and (self.paths is None or any(fnmatch.fnmatchcase(layer.path, p) for p in self.paths))
            and self._step_matches(call.step, call.timestep)
        )

    def _step_matches(self, index: int, timestep: int | None) -> bool:
        if self.steps is None:
            return True
        if callable(self.steps):
            return bool(self.steps(index, timestep))
        return index in self.steps

    def rows(self, batch: int) -> slice:
        """The covered rows of a batch of ``batch`` samples."""
        if isinstance(self.batch, slice):
            return self.batch
        if self.batch == "all":
            return slice(None)
        if batch % 2:
            msg = f"batch='cond' needs an even (guidance-doubled) batch, got {batch} rows"
            raise ValueError(msg)
        return slice(batch // 2, None)


def resize_map(maps: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (B, C, H, W) to side×side: area average when shrinking, bilinear when growing.

    The area average makes a resized binary mask the fraction of each attention cell it covers.
    """
    if maps.shape[-2:] == (side, side):
        return maps.float()
    mode = "area" if side <= min(maps.shape[-2:]) else "bilinear"
    return F.interpolate(maps.float(), size=(side, side), mode=mode)


def match_batch(maps: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a (b, ...) tensor to ``batch`` rows: b = 1 broadcasts, and b dividing ``batch`` tiles.

    Tiling gives the same masks to the unconditional and conditional halves of a guidance batch.
    """
    if maps.shape[0] == batch:
        return maps
    if batch % maps.shape[0]:
        msg = f"a map of batch {maps.shape[0]} does not fit a layer batch of {batch}"
        raise ValueError(msg)
    return maps.repeat(batch // maps.shape[0], *([1] * (maps.ndim - 1)))


def pixel_map(maps: torch.Tensor, side: int, batch: int, device: torch.device) -> torch.Tensor:
    """A (B|1, 1, H, W) map resized to the layer side and flattened to (batch, 1, N, 1), N = side²."""
    if maps.ndim != 4 or maps.shape[1] != 1:
        msg = f"spatial maps must be (B, 1, H, W), got {tuple(maps.shape)}"
        raise ValueError(msg)
    flat = match_batch(resize_map(maps.to(device), side), batch).flatten(1)
    return flat[:, None, :, None]


def token_columns(tokens: Sequence[int], length: int, device: torch.device) -> torch.Tensor:
    """A bool (L,) selector of token indices; indices outside the context length are an error."""
    if any(not -length <= t < length for t in tokens):
        msg = f"token indices {list(tokens)} out of range for a context of {length} tokens"
        raise ValueError(msg)
    columns = torch.zeros(length, dtype=torch.bool, device=device)
    columns[list(tokens)] = True
    return columns


class AttentionEdit(Protocol):
    """A probability edit: given scores and probabilities (B, heads, N, L) of the covered rows, new probabilities."""

    where: Select

    def edit(self, scores: torch.Tensor, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """The edited probabilities, same shape as ``probs``."""
        ...


@dataclass
class Restrict:
    """BADG inside/outside attention (paper 001, Eq. 10-11) on cross-attention layers.

    ``m'⊙softmax(QK_inᵀ/τ)V_in + (1−m')⊙softmax(QK_outᵀ/τ)V_out``, written as one probability matrix
    ``m'·P_in + (1−m')·P_out`` (columns of the other group are 0), so recorders see the attention the
    layer actually used; for the inside tokens this is exactly Eq. 13's ``m'⊙softmax(QK_defᵀ/τ)``.

    Choices where the paper is silent: each group's softmax runs over that group's tokens only;
    ``shared`` tokens (default: index 0, the BOS token) join both groups so each softmax keeps its
    attention sink; tokens in no group (padding, EOS) get no attention. m' is the mask area-averaged
    to the layer side, so at a mask edge a cell mixes the two groups by its coverage.
    """

    mask: torch.Tensor  # (B|1, 1, H, W), 1 = inside
    inside: Sequence[int]
    outside: Sequence[int]
    shared: Sequence[int] = (0,)
    where: Select = field(default_factory=Select)

    def __post_init__(self) -> None:
        if self.where.cross is not True:
            msg = "Restrict acts on cross-attention only: its token groups index text tokens"
            raise ValueError(msg)
        if not self.inside or not self.outside:
            msg = "Restrict needs non-empty inside and outside token groups"
            raise ValueError(msg)

    def edit(self, scores: torch.Tensor, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """``m'·softmax_in + (1−m')·softmax_out`` (Eq. 10-11)."""
        length, device = scores.shape[-1], scores.device
        inside = token_columns([*self.inside, *self.shared], length, device)
        outside = token_columns([*self.outside, *self.shared], length, device)
        m = pixel_map(self.mask, call.side, scores.shape[0], device)
        return m * group_softmax(scores, inside) + (1 - m) * group_softmax(scores, outside)


def group_softmax(scores: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Softmax over the selected token columns only; the other columns get probability 0."""
    return scores.masked_fill(~columns, -math.inf).softmax(dim=-1)


@dataclass
class SpatialReweight:
    """AnomalyDiffusion's re-weighted attention (paper 000, Eq. 8): ``m'_c = softmax(QKᵀ/√d) ⊙ w_m``.

    The weight map multiplies every pixel's probabilities (of ``tokens``, or all tokens) and is not
    renormalised. It is area-averaged to each layer side. Replace it between steps with
    ``set_weight_map`` (AnomalyDiffusion recomputes it from each step's x0 prediction, Eq. 7).
    """

    weight_map: torch.Tensor  # (B|1, 1, H, W)
    tokens: Sequence[int] | None = None
    where: Select = field(default_factory=Select)

    def set_weight_map(self, weight_map: torch.Tensor) -> None:
        """Use ``weight_map`` from the next layer call on."""
        self.weight_map = weight_map

    def edit(self, scores: torch.Tensor, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """``P ⊙ w`` on the pixel axis (Eq. 8)."""
        w = pixel_map(self.weight_map, call.side, probs.shape[0], probs.device).to(probs.dtype)
        if self.tokens is None:
            return probs * w
        columns = token_columns(self.tokens, probs.shape[-1], probs.device)
        return torch.where(columns, probs * w, probs)


class FocusGate(Protocol):
    """Decides, per sample, whether a masked re-weighting fires at this layer call."""

    def __call__(self, token_map: torch.Tensor, mask: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """A bool (B,) from the head-averaged token map (B, side, side) and the resized mask (B, side, side)."""
        ...


@dataclass(frozen=True)
class DelayedFocusGate:
    """CADiff's Delayed Focus Scheduler (paper 004, Eq. 11): fire once the token attends to the mask.

    ``α_t = n_t / n_start``, n_t = in-mask pixels of the token map above the map's mean (over all
    pixels), n_start = mask pixels; it fires when ``α_t > threshold``. Mask cells count as inside when
    at least half covered. The decision is per sample, from the map of the call (before re-weighting);
    ``MaskedReweight`` keeps a sample's re-weighting on from the first call where it fires.
    """

    threshold: float = 0.75

    def alpha(self, token_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """α_t (B,) for token maps and masks shaped (B, side, side)."""
        inside = mask >= 0.5
        above = token_map > token_map.mean(dim=(-2, -1), keepdim=True)
        n_t = (above & inside).sum(dim=(-2, -1))
        n_start = inside.sum(dim=(-2, -1))
        return n_t / n_start.clamp_min(1)

    def __call__(self, token_map: torch.Tensor, mask: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Whether α_t exceeds the threshold, per sample."""
        return self.alpha(token_map, mask) > self.threshold


@dataclass
class MaskedReweight:
    """CADiff's Intensity-controllable Attention Re-weighting (paper 004, Eq. 11).

    ``A' = w·||M||₁·A`` for each target token, inside the mask only (Masked Focus Attention), from the
    first call where ``gate`` fires for the sample and token on (None: always): the Delayed Focus Scheduler
    starts the re-weighting once the map has focused, and our reading keeps it on after. Our reading of A:
    the token's softmax probability at each pixel and head (summing to 1 over tokens, not over pixels);
    ||M||₁ is the mask's area in cells at the layer side (for CADiff's 16×16 layers,
    ``Select(resolutions={16})``); the formula is applied literally with no renormalisation, so the factor
    w·||M||₁ can be large: choose w with the mask area in mind. A soft mask cell m' blends:
    ``A·(1 + m'(w·||M||₁ − 1))``. ``inside_only=False`` is the paper's "w/o MFA" ablation: the same factor
    at every pixel.
    """

    mask: torch.Tensor  # (B|1, 1, H, W), 1 = inside
    tokens: Sequence[int]
    weight: float | torch.Tensor  # w: a scalar or one per sample (B,)
    gate: FocusGate | None = field(default_factory=DelayedFocusGate)
    where: Select = field(default_factory=Select)
    inside_only: bool = True  # Masked Focus Attention; False scales every pixel
    # per token, the samples (B,) whose re-weighting has begun: state of one sampling run, not a setting
    started: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def edit(self, scores: torch.Tensor, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Scale the target tokens' probabilities inside the mask where the gate fires."""
        batch = probs.shape[0]
        m = pixel_map(self.mask, call.side, batch, probs.device)[:, 0, :, 0]  # (B, N)
        weight = match_batch(torch.as_tensor(self.weight, dtype=m.dtype, device=m.device).reshape(-1), batch)
        factor = weight * m.sum(dim=1)  # w·||M||₁, (B,)
        token_columns(self.tokens, probs.shape[-1], probs.device)  # validates the indices
        edited = probs.clone()
        where = m if self.inside_only else torch.ones_like(m)
        for token in self.tokens:
            fires = self._fires(token, probs[..., token], m, call)
            scale = 1 + where * ((factor - 1) * fires)[:, None]  # (B, N)
            edited[..., token] = probs[..., token] * scale[:, None, :].to(probs.dtype)
        return edited

    def _fires(self, token: int, token_probs: torch.Tensor, m: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """1 per sample whose re-weighting of ``token`` has started by this call, else 0 (B,)."""
        if self.gate is None:
            return torch.ones(m.shape[0], dtype=m.dtype, device=m.device)
        square = (token_probs.shape[0], call.side, call.side)
        fires = self.gate(token_probs.mean(dim=1).reshape(square), m.reshape(square), call)
        if token in self.started:
            fires = fires | self.started[token]
        self.started[token] = fires
        return fires.to(m.dtype)
