"""Grounding the tiny base's cross-attention on the generic prior's marks: a caption's words attend where they are.

Stable Diffusion's cross-attention puts a word's probability on the region the word names; the methods build on it
(SeaS's and CADiff's attention losses, BADG's attention-refined masks, CADiff's re-weighting). A tiny base trained
from scratch on captions that name no region leaves its cross-attention uniform: every text position takes about
1/L of every pixel's attention, so a learned token can neither steer a region nor mark one. This loss, on the
prior's marked images only, asks the summed attention of the mark's words (the caption after ``with a``) to equal
the mark's region at each cross-attention layer: the base learns to read a word for the place it names. Ours; the
marks and their words belong to no product and no defect type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import CLIPTokenizer

from defectsynth.diffusion.attention import AttentionControl, installed
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss

MARK_WORDS_AFTER = " with a "  # apply_generic_prior's captions: "a photo of <product> with a <words>"


def mark_word_positions(caption: str, tokenizer: CLIPTokenizer) -> list[int]:
    """Text positions of the mark's words in ``caption`` (empty without a mark), the start token at 0.

    CLIP's tokenizer splits words before its byte pairs, so the prefix's tokens are the caption's first tokens.
    """
    prefix, found, _ = caption.partition(MARK_WORDS_AFTER)
    if not found:
        return []
    first = len(tokenizer(prefix + MARK_WORDS_AFTER.rstrip()).input_ids) - 1  # without the prefix's end token
    return list(range(first, len(tokenizer(caption).input_ids) - 1))


def grounding_loss(
    maps: Mapping[str, torch.Tensor], positions: Sequence[Sequence[int]], marks: torch.Tensor
) -> torch.Tensor | None:
    """Mean over layers and marked images of the words' summed attention's squared error, balanced inside and out.

    Per image, the mean of (Σ_words A − 1)² over the mark's cells plus the mean of (Σ_words A)² over the rest: a mark
    covers a few percent of its image, and a plain per-pixel mean is least with the words read nowhere. None when
    no image has mark words.

    Args:
        maps: per layer, head-averaged cross-attention (B, L, s, s) over all text positions.
        positions: per image, its mark words' positions (empty: not grounded, e.g. unmarked or caption dropped).
        marks: (B, 1, H, W) the marks' regions; at each layer's side a cell is 1 when any pixel is (thin lines).
    """
    rows = [index for index, words in enumerate(positions) if words]
    if not rows or not maps:
        return None
    terms = []
    for attention in maps.values():
        side = attention.shape[-1]
        summed = torch.stack([attention[row, list(positions[row])].sum(dim=0) for row in rows]).flatten(1)
        inside = F.adaptive_max_pool2d(marks[rows].float(), side).flatten(1).to(summed)
        outside = 1 - inside
        inside_error = ((summed - 1).square() * inside).sum(1) / inside.sum(1).clamp_min(1)
        outside_error = (summed.square() * outside).sum(1) / outside.sum(1).clamp_min(1)
        terms.append((inside_error + outside_error).mean())
    return torch.stack(terms).mean()


class GroundingTargets(NamedTuple):
    """What the grounding term of one pretraining batch needs: the prompts as fed, the marks, the term's weight."""

    prompts: list[str]  # after classifier-free dropout: an emptied caption is not grounded
    marks: torch.Tensor  # (B, 1, H, W)
    weight: float


def grounded_denoising_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    targets: GroundingTargets,
    *,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``denoising_loss`` plus ``targets.weight`` times the grounding loss of the same forward's attention."""
    control = AttentionControl()
    recorder = control.record(keep_grad=True)
    control.begin_step(0, None)
    with installed(model.unet, control):
        loss = denoising_loss(model, latents, context, generator, loss_mask=loss_mask)
    positions = [mark_word_positions(prompt, model.tokenizer) for prompt in targets.prompts]
    grounding = grounding_loss(recorder.maps(0), positions, targets.marks)
    return loss if grounding is None else loss + targets.weight * grounding
