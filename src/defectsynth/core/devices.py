"""Where a process computes: the GPU Ray gave it, else the CPU."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """The current CUDA device when one is visible (Ray sets ``CUDA_VISIBLE_DEVICES`` per worker), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
