"""Feature taps: outputs of U-Net up-blocks and VAE-decoder up-blocks, recorded at chosen steps.

SeaS's refined mask prediction (paper 002) reads the U-Net's up-2/up-3 outputs and the VAE
decoder's up-block outputs; diagnostics read the same. Taps are forward hooks on the named blocks
(the networks are not modified). Like the attention control, they are a step observer: the sampler
calls ``begin_step(index, timestep)`` and U-Net features are kept only at the chosen steps; VAE
features are kept on every decode while attached.

Example:
    >>> taps = FeatureTaps(unet_blocks=(1, 2), vae_blocks=(1,), steps={23, 24})  # doctest: +SKIP
    >>> with taps.attached(model):  # doctest: +SKIP
    ...     latents = denoise(model, ..., control=taps)
    ...     images = model.decode_latents(latents)
    >>> taps.unet_features(2)  # list of (B, C, H, W), one per kept step  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch.utils.hooks import RemovableHandle

from defectsynth.diffusion.model import DiffusionModel


class FeatureTaps:
    """Records up-block outputs of the U-Net (at chosen steps) and of the VAE decoder."""

    def __init__(
        self,
        *,
        unet_blocks: Collection[int] = (),
        vae_blocks: Collection[int] = (),
        steps: Collection[int] | None = None,
        keep_grad: bool = False,
    ) -> None:
        self.unet_blocks, self.vae_blocks = tuple(unet_blocks), tuple(vae_blocks)
        self.steps = None if steps is None else frozenset(steps)
        self.keep_grad = keep_grad
        self.step: int | None = None
        self.unet: dict[int, list[torch.Tensor]] = {}
        self.vae: dict[int, list[torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    def begin_step(self, index: int, timestep: int) -> None:
        """Mark the start of sampling step ``index`` (called by the sampler before each U-Net call)."""
        self.step = index

    def reset(self) -> None:
        """Forget everything recorded."""
        self.unet.clear()
        self.vae.clear()
        self.step = None

    def unet_features(self, block: int) -> list[torch.Tensor]:
        """U-Net ``up_blocks[block]`` outputs, one per kept step in order."""
        return self.unet.get(block, [])

    def vae_features(self, block: int) -> list[torch.Tensor]:
        """VAE decoder ``up_blocks[block]`` outputs, one per decode call."""
        return self.vae.get(block, [])

    def attach(self, model: DiffusionModel) -> FeatureTaps:
        """Hook the chosen blocks of ``model``; returns self."""
        self.detach()
        for block in self.unet_blocks:
            module = _block(model.unet.up_blocks, block, "unet.up_blocks")
            self._handles.append(module.register_forward_hook(self._hook(self.unet, block, unet=True)))
        for block in self.vae_blocks:
            module = _block(model.vae.decoder.up_blocks, block, "vae.decoder.up_blocks")
            self._handles.append(module.register_forward_hook(self._hook(self.vae, block, unet=False)))
        return self

    def detach(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def attached(self, model: DiffusionModel) -> Iterator[FeatureTaps]:
        """Hooks on for the duration of the block."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def _hook(self, store: dict[int, list[torch.Tensor]], block: int, *, unet: bool):  # noqa: ANN202
        def record(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
            if unet and self.steps is not None and self.step not in self.steps:
                return
            store.setdefault(block, []).append(output if self.keep_grad else output.detach())

        return record


def _block(blocks: torch.nn.ModuleList, index: int, where: str) -> torch.nn.Module:
    if not 0 <= index < len(blocks):
        msg = f"{where}[{index}] does not exist: the model has {len(blocks)} up-blocks"
        raise ValueError(msg)
    return blocks[index]
