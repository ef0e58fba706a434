"""CADiff's prompt regularisers (paper 004, Eqs. 5-7): L = L_CALDM + γ·L_loc + β·L_contrastive, γ = 1e-3, β = 5e-4.

Readings we chose where the paper is silent or loose: Eq. 5's squared norm is a mean over pixels and samples, with
the average over tokens inside the norm as printed (``balanced=False`` moves it outside); Eq. 6's denominator is
SimCLR's (all other points, not only the same concept); τ = 0.5 (SimCLR's); a token's per-example vector is its
cross-attention map pooling the image features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812


def downsample_mask(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Masks (B, 1, H, W) at side×side, (B, side, side) float; a cell is 1 when any pixel is (thin defects survive)."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        msg = f"masks must be (B, 1, H, W), got {tuple(masks.shape)}"
        raise ValueError(msg)
    return F.adaptive_max_pool2d(masks.float(), side)[:, 0]


def token_targets(masks: torch.Tensor, is_context: Sequence[bool], side: int) -> torch.Tensor:
    """Each learnable token's target M^i at side×side, (B, n_tokens, side, side).

    An anomaly token gets its sample's defect mask (a sample shows one defect type); the contextual token gets M*,
    "a reverse mask of the sum of the other masks", i.e. 1 − the union of the defect masks.
    """
    if not is_context:
        msg = "is_context is empty: the prompt has no learnable tokens"
        raise ValueError(msg)
    defect = downsample_mask(masks, side)
    context = 1.0 - defect
    return torch.stack([context if ctx else defect for ctx in is_context], dim=1)


def localization_loss(
    maps: Mapping[int, torch.Tensor],
    masks: torch.Tensor,
    is_context: Sequence[bool],
    *,
    balanced: bool = True,
) -> torch.Tensor:
    """Eq. 5, Σ_l ||(1/n) Σ_i (A^{i,l} − M^{i,l})||², over maps[side] (B, n_tokens, side, side) averaged by the caller.

    The paper's norm is unnormalised; we take the mean over pixels and samples so γ = 0.001 means the same at every
    resolution. ``balanced=True`` averages over tokens inside the norm as printed; ``balanced=False`` outside,
    (1/n) Σ_i ||A^i − M^i||². Inside, per-token errors can cancel: with one contextual and one anomaly token the
    targets sum to 1 everywhere, so the balanced term only asks the two maps to sum to 1, whatever the mask.
    """
    if not maps:
        msg = "maps is empty: no resolution to compare"
        raise ValueError(msg)
    terms = []
    for side, attention in maps.items():
        if attention.ndim != 4 or attention.shape[1:] != (len(is_context), side, side):
            msg = f"maps[{side}] must be (B, {len(is_context)}, {side}, {side}), got {tuple(attention.shape)}"
            raise ValueError(msg)
        error = attention - token_targets(masks, is_context, side).to(attention)
        term = error.mean(dim=1).square().mean() if balanced else error.square().mean()
        terms.append(term)
    return torch.stack(terms).sum()


def nt_xent(vectors: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Eqs. 6-7, NT-Xent over vectors (B, C, D): B augmented examples, C per-concept vectors each.

    For anchor (i, c) the positives are (j, c), j ≠ i; the denominator sums exp(cos/τ) over every (j, c') ≠ (i, c),
    SimCLR's form the paper cites. Eq. 6 as printed sums only the same concept, which cannot push concepts apart.
    The mean runs over all B·C·(B−1) positive pairs (Eq. 7's 1/(BC) times the mean over each anchor's positives).
    τ is unstated in the paper; 0.5 is SimCLR's.
    """
    if vectors.ndim != 3 or vectors.shape[0] < 2 or vectors.shape[1] < 2:
        msg = f"vectors must be (B, C, D) with B >= 2 and C >= 2, got {tuple(vectors.shape)}"
        raise ValueError(msg)
    batch, concepts, _ = vectors.shape
    points = F.normalize(vectors, dim=-1).reshape(batch * concepts, -1)
    logits = points @ points.T / temperature
    self_pair = torch.eye(batch * concepts, dtype=torch.bool, device=vectors.device)
    log_prob = logits - logits.masked_fill(self_pair, float("-inf")).logsumexp(dim=1, keepdim=True)
    concept = torch.arange(concepts, device=vectors.device).repeat(batch)
    positive = (concept[:, None] == concept[None, :]) & ~self_pair
    return -log_prob[positive].mean()


def attention_pooled(features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Per-example token vectors (B, C, D): each token's map (B, C, s, s) pools the features (B, D, s, s).

    Our reading (the paper does not say how an example yields a token vector; the learned embeddings are shared):
    v_b^c = Σ_p A_b^c(p) f_b(p) / Σ_p A_b^c(p).
    """
    agree = features.ndim == maps.ndim == 4 and features.shape[0] == maps.shape[0]
    if not agree or features.shape[2:] != maps.shape[2:]:
        msg = f"features (B, D, s, s) and maps (B, C, s, s) disagree: {tuple(features.shape)}, {tuple(maps.shape)}"
        raise ValueError(msg)
    weights = maps.flatten(2)
    pooled = torch.einsum("bcp,bdp->bcd", weights, features.flatten(2))
    return pooled / weights.sum(dim=-1, keepdim=True).clamp_min(1e-8)
