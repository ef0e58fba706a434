"""An exponential moving average of a module's parameters, swapped into the module to validate or save it.

A detector trained a hundred steps at Adam 1e-3 ends wherever its last few batches pushed it; averaging its
recent weights (Polyak averaging) is the standard way to steady that. On the quality tier's segmenter it did not
narrow the spread over seeds (bench/README.md, ``detector_spread.py``). Buffers (BatchNorm statistics) are not
averaged: they are re-estimated at whatever weights are in the module before they are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """Keeps ``average = d * average + (1 - d) * weights`` after each step, with ``d`` warmed up from 0.

    The decay of update n is ``min(decay, (1 + n) / (10 + n))``, so the first steps do not drag the initial
    weights along (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``).
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            msg = f"decay must lie in (0, 1), got {decay}"
            raise ValueError(msg)
        self.module, self.decay, self.updates = module, decay, 0
        self.average = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current weights into the average."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in self.module.named_parameters():
            self.average[name].lerp_(param.detach().to(self.average[name].dtype), 1 - decay)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the module holds the averaged weights; its own come back after, however it ends."""
        live = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        self._load(self.average)
        try:
            yield
        finally:
            self._load(live)

    @torch.no_grad()
    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        for name, param in self.module.named_parameters():
            param.copy_(weights[name])

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The average and its update count, for a checkpoint."""
        return {**{f"average.{k}": v.detach().cpu().clone() for k, v in self.average.items()}, "updates": self.updates}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Resume from ``state_dict()``."""
        self.updates = int(state["updates"])
        for name, value in self.average.items():
            value.copy_(state[f"average.{name}"])
