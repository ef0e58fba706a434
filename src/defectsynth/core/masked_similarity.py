"""PSNR and SSIM of two uint8 images over a region: how closely a method keeps the background it should not touch."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

PEAK = 255.0
SSIM_SIGMA = 1.5  # Wang et al. 2004: Gaussian window of σ 1.5
SSIM_C1, SSIM_C2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2


def gaussian_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` (H x W) smoothed by a Gaussian of ``sigma`` truncated at 3.5 σ, edges reflected."""
    radius = int(3.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = torch.from_numpy(taps / taps.sum())
    x = F.pad(torch.from_numpy(image)[None, None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[0, 0].numpy()


def _luminance(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an H x W x 3 uint8 image, float64 in [0, 255]."""
    return image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _checked(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> np.ndarray:
    if a.shape != b.shape or a.shape[:2] != region.shape:
        msg = f"images {a.shape} and {b.shape} and region {region.shape} must agree"
        raise ValueError(msg)
    region = region.astype(bool)
    if not region.any():
        msg = "the region is empty: no pixel to compare"
        raise ValueError(msg)
    return region


def psnr_in(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """PSNR (dB, peak 255) of ``a`` against ``b`` over the pixels of ``region``; ``inf`` when they are identical."""
    region = _checked(a, b, region)
    mse = float(np.mean(np.square(a[region].astype(np.float64) - b[region].astype(np.float64))))
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)


def ssim_in(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """The mean of the SSIM map (luma, Gaussian window σ = 1.5) over the pixels of ``region``; 1 when identical."""
    region = _checked(a, b, region)
    x, y = _luminance(a), _luminance(b)
    mu_x, mu_y = gaussian_filter(x, SSIM_SIGMA), gaussian_filter(y, SSIM_SIGMA)
    var_x = gaussian_filter(x * x, SSIM_SIGMA) - mu_x**2
    var_y = gaussian_filter(y * y, SSIM_SIGMA) - mu_y**2
    cov = gaussian_filter(x * y, SSIM_SIGMA) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return float(ssim[region].mean())
