"""One attention-control API for the U-Net: record, restrict and re-weight attention, per layer and step.

``install(unet, control)`` puts a thin ``ControlledAttnProcessor`` on every attention layer with
``unet.set_attn_processor`` (house style 1). A processor knows only its layer (path, place,
cross/self); the shared ``AttentionControl`` owns the state: the current step, the operations and
the recorded maps, as Prompt-to-Prompt's ``AttentionStore`` does. The sampler marks steps with
``control.begin_step(index, timestep)``; layer calls are never counted (house style 2).

Operations, each covering the layers, steps and batch rows of a ``Select``:

- ``control.record``: head-averaged cross-attention maps (B, tokens, side, side), optionally keeping
  the autograd graph for losses (SeaS's DA loss, CADiff's L_loc);
- ``control.restrict``: BADG's inside/outside attention (paper 001, Eq. 10-11);
- ``control.reweight``: AnomalyDiffusion's spatial re-weighting (paper 000, Eq. 8);
- ``control.focus``: CADiff's gated, masked re-weighting (paper 004, Eq. 11).

A layer call with nothing to do runs diffusers' ``AttnProcessor2_0`` unchanged (the fast path);
otherwise that call computes explicit probabilities, in float32, and hands them to the operations
in a fixed order: restrict, record (``after_reweight=False``), re-weight in the order added, record
(``after_reweight=True``).

Example:
    >>> import torch
    >>> from diffusers import UNet2DConditionModel
    >>> unet = UNet2DConditionModel(
    ...     sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
    ... )
    >>> control = AttentionControl()
    >>> recorder = control.record(Select(resolutions={8}), tokens=[1, 2])
    >>> with installed(unet, control), torch.no_grad():
    ...     for index, t in enumerate([900, 500]):
    ...         control.begin_step(index, t)
    ...         _ = unet(torch.randn(1, 4, 8, 8), t, encoder_hidden_states=torch.randn(1, 5, 16))
    >>> recorder.steps, recorder.mean(side=8).shape
    ([0, 1], torch.Size([1, 2, 8, 8]))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from defectsynth.diffusion.attention_rules import (
    AttentionEdit,
    DelayedFocusGate,
    FocusGate,
    LayerCall,
    LayerInfo,
    MaskedReweight,
    Restrict,
    Select,
    SpatialReweight,
)

logger = logging.getLogger(__name__)

DELAYED_FOCUS = DelayedFocusGate(threshold=0.75)  # CADiff's α_thr
Probabilities = Callable[[torch.Tensor], torch.Tensor]  # scores (B, heads, N, L) -> probabilities


class AttentionRecorder:
    """Head-averaged attention maps of the covered layer calls, kept per step and layer.

    A layer called several times in one step (e.g. separate unconditional and conditional passes)
    contributes its batches concatenated in call order. Maps keep the autograd graph when
    ``keep_grad`` is set; call ``reset`` after each loss so graphs are not held across iterations.
    """

    def __init__(self, where: Select, tokens: Sequence[int] | None, *, keep_grad: bool, after_reweight: bool) -> None:
        self.where = where
        self.tokens = None if tokens is None else list(tokens)
        self.keep_grad = keep_grad
        self.after_reweight = after_reweight
        self._maps: dict[int, dict[str, list[torch.Tensor]]] = {}

    def add(self, probs: torch.Tensor, call: LayerCall) -> None:
        """Store (rows, tokens, side, side) from probabilities (B, heads, N, L)."""
        probs = probs[self.where.rows(probs.shape[0])]
        if self.tokens is not None:
            probs = probs[..., self.tokens]
        maps = probs.mean(dim=1).transpose(1, 2).reshape(probs.shape[0], -1, call.side, call.side)
        maps = maps if self.keep_grad else maps.detach()
        self._maps.setdefault(call.step, {}).setdefault(call.layer.path, []).append(maps)

    @property
    def steps(self) -> list[int]:
        """Step indices with at least one recorded map, ascending."""
        return sorted(self._maps)

    def maps(self, step: int) -> dict[str, torch.Tensor]:
        """Maps of one step, keyed by layer path, each (B, tokens, side, side)."""
        if step not in self._maps:
            msg = f"nothing recorded at step {step}; recorded steps: {self.steps}"
            raise KeyError(msg)
        return {path: torch.cat(calls) for path, calls in self._maps[step].items()}

    def mean(self, side: int, steps: Collection[int] | None = None) -> torch.Tensor:
        """Mean over the recorded steps (all, or ``steps``) and layers, each bilinearly resized to side×side."""
        chosen = [s for s in self.steps if steps is None or s in steps]
        maps = [_resize(m, side) for s in chosen for m in self.maps(s).values()]
        if not maps:
            msg = f"no maps recorded at steps {sorted(steps) if steps is not None else 'any'}"
            raise ValueError(msg)
        return torch.stack(maps).mean(dim=0)

    def reset(self) -> None:
        """Forget every recorded map."""
        self._maps.clear()


def _resize(maps: torch.Tensor, side: int) -> torch.Tensor:
    if maps.shape[-1] == side:
        return maps
    return F.interpolate(maps, size=(side, side), mode="bilinear", antialias=side < maps.shape[-1])


class AttentionControl:
    """Shared state of the installed processors: the current step, the operations and the recordings."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.timestep: int | None = None
        self.recorders: list[AttentionRecorder] = []
        self.restrictions: list[Restrict] = []
        self.reweights: list[SpatialReweight | MaskedReweight] = []

    def begin_step(self, index: int, timestep: int | None = None) -> None:
        """Mark the start of sampler step ``index`` (timestep None where samples differ, e.g. in training)."""
        self.step, self.timestep = index, timestep

    # -- configuration ------------------------------------------------------------------------------

    def record(
        self,
        where: Select | None = None,
        *,
        tokens: Sequence[int] | None = None,
        keep_grad: bool = False,
        after_reweight: bool = False,
    ) -> AttentionRecorder:
        """Record head-averaged maps of ``tokens`` (None: all) at the calls ``where`` covers.

        Use ``Select(batch="cond")`` to keep only the conditional half of a guidance batch.
        """
        recorder = AttentionRecorder(where or Select(), tokens, keep_grad=keep_grad, after_reweight=after_reweight)
        self.recorders.append(recorder)
        return recorder

    def restrict(
        self,
        mask: torch.Tensor,
        *,
        inside: Sequence[int],
        outside: Sequence[int],
        shared: Sequence[int] = (0,),
        where: Select | None = None,
    ) -> Restrict:
        """BADG inside/outside attention; see ``Restrict`` for the softmax grouping and shared tokens."""
        restriction = Restrict(mask, inside, outside, shared, where or Select())
        self.restrictions.append(restriction)
        return restriction

    def reweight(
        self, weight_map: torch.Tensor, *, tokens: Sequence[int] | None = None, where: Select | None = None
    ) -> SpatialReweight:
        """AnomalyDiffusion's spatial re-weighting by ``weight_map`` (B|1, 1, H, W)."""
        reweight = SpatialReweight(weight_map, tokens, where or Select())
        self.reweights.append(reweight)
        return reweight

    def focus(
        self,
        mask: torch.Tensor,
        *,
        tokens: Sequence[int],
        weight: float | torch.Tensor,
        gate: FocusGate | None = DELAYED_FOCUS,
        where: Select | None = None,
        inside_only: bool = True,
    ) -> MaskedReweight:
        """CADiff's IAR: ``w·||M||₁·A`` inside ``mask`` for ``tokens`` where ``gate`` fires (None: always).

        CADiff re-weights at the 16×16 layers: ``where=Select(resolutions={16})``. ``inside_only=False``
        scales every pixel (the "w/o MFA" ablation).
        """
        reweight = MaskedReweight(mask, tokens, weight, gate, where or Select(), inside_only)
        self.reweights.append(reweight)
        return reweight

    def set_weight_map(self, weight_map: torch.Tensor) -> None:
        """Replace the weight map of every spatial re-weighting (e.g. once per step, from the new x0)."""
        spatial = [r for r in self.reweights if isinstance(r, SpatialReweight)]
        if not spatial:
            msg = "no spatial re-weighting configured; add one with control.reweight(...)"
            raise ValueError(msg)
        for reweight in spatial:
            reweight.set_weight_map(weight_map)

    def clear(self) -> None:
        """Drop every operation (recorders included); the processors fall back to the fast path."""
        self.recorders.clear()
        self.restrictions.clear()
        self.reweights.clear()

    def reset(self) -> None:
        """Forget the recorded maps and the current step; the operations stay."""
        for recorder in self.recorders:
            recorder.reset()
        self.step = self.timestep = None

    # -- per layer call -----------------------------------------------------------------------------

    def plan(self, layer: LayerInfo, query_tokens: int) -> Probabilities | None:
        """What one layer call must do with its scores, or None when nothing covers it (fast path)."""
        if not (self.recorders or self.restrictions or self.reweights):
            return None
        if self.step is None:
            msg = "the attention control has operations but no step: call control.begin_step(index, timestep) first"
            raise RuntimeError(msg)
        side = math.isqrt(query_tokens)
        if side * side != query_tokens:
            msg = f"{layer.path}: {query_tokens} query pixels do not form a square grid"
            raise ValueError(msg)
        call = LayerCall(layer, side, self.step, self.timestep)
        restrictions = [r for r in self.restrictions if r.where.matches(call)]
        if len(restrictions) > 1:
            msg = f"{len(restrictions)} restrictions cover {layer.path} at step {self.step}; at most one may"
            raise ValueError(msg)
        reweights = [r for r in self.reweights if r.where.matches(call)]
        recorders = [r for r in self.recorders if r.where.matches(call)]
        if not (restrictions or reweights or recorders):
            return None
        return partial(_probabilities, call, restrictions, reweights, recorders)


def _probabilities(
    call: LayerCall,
    restrictions: list[Restrict],
    reweights: list[AttentionEdit],
    recorders: list[AttentionRecorder],
    scores: torch.Tensor,
) -> torch.Tensor:
    """Softmax (or the restriction's grouped softmax), record, re-weight in order, record."""
    probs = scores.softmax(dim=-1)
    for restriction in restrictions:
        probs = _edit_rows(restriction, scores, probs, call)
    for recorder in (r for r in recorders if not r.after_reweight):
        recorder.add(probs, call)
    for reweight in reweights:
        probs = _edit_rows(reweight, scores, probs, call)
    for recorder in (r for r in recorders if r.after_reweight):
        recorder.add(probs, call)
    return probs


def _edit_rows(edit: AttentionEdit, scores: torch.Tensor, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Apply an edit to the batch rows its ``Select`` covers; the other rows keep their probabilities."""
    rows = edit.where.rows(probs.shape[0])
    if rows == slice(None):
        return edit.edit(scores, probs, call)
    edited = probs.clone()
    edited[rows] = edit.edit(scores[rows], probs[rows], call)
    return edited


def explicit_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    probabilities: Probabilities,
) -> torch.Tensor:
    """``AttnProcessor2_0``'s computation with the probabilities (B, heads, N, L) explicit, in float32."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_shape = hidden_states.shape
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads·d) -> (B, heads, T, d)
        return x.view(batch, x.shape[1], attn.heads, -1).transpose(1, 2)

    query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = query.float() @ key.float().transpose(-1, -2) * attn.scale  # QKᵀ/√d
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
    out = probabilities(scores).to(value.dtype) @ value  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * value.shape[-1])
    out = attn.to_out[1](attn.to_out[0](out))
    if len(input_shape) == 4:
        out = out.transpose(-1, -2).reshape(input_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class ControlledAttnProcessor:
    """A thin per-layer processor: asks the shared control for a plan, else runs ``AttnProcessor2_0``."""

    def __init__(self, control: AttentionControl, layer: LayerInfo, default: AttnProcessor2_0) -> None:
        self.control = control
        self.layer = layer
        self.default = default

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's attention output, with the control's operations applied when any covers this call."""
        shape = hidden_states.shape
        query_tokens = shape[1] if hidden_states.ndim == 3 else shape[-2] * shape[-1]
        plan = self.control.plan(self.layer, query_tokens)
        if plan is None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, plan)


def layer_info(unet: torch.nn.Module, path: str) -> LayerInfo:
    """Describe the attention layer whose processor sits at ``path`` in ``unet.attn_processors``."""
    module = unet.get_submodule(path.removesuffix(".processor"))
    head = path.split(".", 1)[0]
    place = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, head)
    return LayerInfo(path=path, place=place, is_cross=bool(getattr(module, "is_cross_attention", False)))


def install(unet: UNet2DConditionModel | ControlNetModel, control: AttentionControl) -> Callable[[], None]:
    """Put a ``ControlledAttnProcessor`` on every attention layer; returns a callable restoring the previous ones.

    A ControlNet's layers carry the U-Net's paths (it copies the down and mid blocks), so one ``Select`` covers both.

    Any custom processor in place (e.g. an adapter's) is replaced until restore: the fast path is
    diffusers' default ``AttnProcessor2_0``.
    """
    previous = dict(unet.attn_processors)
    default = AttnProcessor2_0()
    # set_attn_processor pops from the dict it is given: always hand it a copy.
    unet.set_attn_processor(
        {path: ControlledAttnProcessor(control, layer_info(unet, path), default) for path in previous}
    )

    def restore() -> None:
        unet.set_attn_processor(dict(previous))

    return restore


@contextmanager
def installed(unet: UNet2DConditionModel | ControlNetModel, control: AttentionControl) -> Iterator[AttentionControl]:
    """``install`` for the duration of a ``with`` block, restoring the previous processors on exit."""
    restore = install(unet, control)
    try:
        yield control
    finally:
        restore()


__all__ = [
    "AttentionControl",
    "AttentionRecorder",
    "ControlledAttnProcessor",
    "DelayedFocusGate",
    "LayerInfo",
    "MaskedReweight",
    "Restrict",
    "Select",
    "SpatialReweight",
    "explicit_attention",
    "install",
    "installed",
    "layer_info",
]
