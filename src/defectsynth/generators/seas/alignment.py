"""SeaS's Decoupled Anomaly Alignment loss (paper 002, Eq. 3) on head-averaged cross-attention maps.

``L_DA = Σ_l ||(1/N) Σ_n A_df^{n,l} − M^l||² + ||A_ob^l ⊙ M^l||²``: the mean of the N anomaly tokens' maps is
pulled onto the defect mask, and the normal token's map is pushed out of it. Two readings follow the
authors' code where the paper is silent, and are ours to state:

- each map is min-max normalised per sample before the loss. A token's softmax share of a pixel is at most
  1 and the N anomaly tokens split it, so the raw mean cannot reach a mask value of 1;
- both terms are means (squared errors averaged), the second over the mask's cells only, so a small defect
  weighs as much as a large one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812


def normalize_per_sample(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each sample's map (B, r, r) to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scale = (high - low).clamp_min(1e-8)
    return (maps - low[:, None, None]) / scale[:, None, None]


def mask_at(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Image-resolution masks (B, 1, H, W) at side×side, a cell set when any of its pixels is (thin defects)."""
    return F.adaptive_max_pool2d(masks.float(), side)[:, 0]


def token_mean(maps: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per sample, the mean of the maps (B, L, r, r) at that sample's token positions: (B, r, r)."""
    return torch.stack([maps[b, list(where)].mean(dim=0) for b, where in enumerate(positions)])


def decoupled_anomaly_alignment(
    anomaly_map: torch.Tensor,
    normal_map: torch.Tensor,
    masks: torch.Tensor,
    *,
    second_term: bool = True,
) -> torch.Tensor:
    """Eq. 3 at one resolution: the anomaly tokens' mean map and <ob>'s map (B, r, r), masks (B, 1, H, W).

    ``second_term=False`` is the ablation "w/o ST" (paper Table 5, row d).
    """
    target = mask_at(masks, anomaly_map.shape[-1]).to(anomaly_map)
    loss = (normalize_per_sample(anomaly_map) - target).square().mean()
    if second_term and bool(target.any()):
        loss = loss + normalize_per_sample(normal_map)[target > 0].square().mean()
    return loss
