"""``controlled``: a test generator whose model carries an extra part, a ControlNet, registered for tests only.

It stands in for a method such as CADiff that adds a ControlNet to the diffusion base: ``fit`` loads the
base, adds a ControlNet copied from its U-Net (``new_controlnet``) with seeded noise on its weights (for
training, so it acts) and saves what it trained, the ControlNet alone, in diffusers' layout (``controlnet/``)
beside a reference to the base, never a copy of it. ``load`` resolves the base from the reference and puts
the ControlNet back as its part; ``generate`` inpaints each conditioning mask with blended DDIM, through
``denoise(predictor=ControlNetPredictor(...))`` fed the mask as a 3-channel image. Nothing in the jobs
knows about the part or the predictor.

Register it in the driver with ``registered()`` (a context manager) and in Ray workers with
``register`` as the ``worker_process_setup_hook`` (tests/ on the workers' PYTHONPATH).
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field

from defectsynth.diffusion.controlnet import PART, ControlNetPredictor, mask_image, new_controlnet
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.model import PART_CLASSES, DiffusionModel
from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import BlendTarget, denoise, generators_from_seeds
from defectsynth.generators.base import (
    FitContext,
    FitUnitKind,
    GeneratorSettings,
    MaskSource,
    Request,
    check_request,
    read_artifact_manifest,
    write_artifact_manifest,
)
from defectsynth.generators.intensity import IntensityControl
from defectsynth.generators.masks import conditioning_mask, load_source, request_rngs
from defectsynth.generators.refine import refined_sample, settings_digest
from defectsynth.generators.registry import REGISTRY
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit
from helpers.registration import registered_as

NAME = "controlled"
TARGET = "helpers.controlnet_generator:ControlledGenerator"


def register() -> None:
    """Add ``controlled`` to the registry of this process (a Ray ``worker_process_setup_hook``)."""
    REGISTRY[NAME] = TARGET


def registered() -> AbstractContextManager[None]:
    """``controlled`` in this process's registry for the duration of the block."""
    return registered_as(NAME, TARGET)


class ControlledSettings(GeneratorSettings):
    """Sampling at test sizes, and the seeded stand-in for training the ControlNet."""

    prompt: str = Field(default="a photo of {product} with a defect", description="{product} is filled in")
    steps: int = Field(default=2, ge=1, description="DDIM steps")
    guidance_scale: float = Field(default=2.0, ge=1.0, description="classifier-free guidance (doubles the batch)")
    conditioning_scale: float = Field(default=1.0, description="the ControlNet's residual scale")
    controlnet_seed: int = Field(default=0, description="seed of the noise added to the ControlNet's weights")
    controlnet_noise: float = Field(default=0.05, ge=0.0, description="std of that noise (0: a no-op ControlNet)")
    refine_threshold: float = Field(default=0.02, description="change threshold of the refined mask")


def trained_stand_in(controlnet: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """``controlnet`` with seeded noise on every weight: stands in for training, so its zero convolutions act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=gen) * std)
    return controlnet


class ControlledGenerator:
    """Inpaints each conditioning mask with a ControlNet-steered DDIM on a diffusion base."""

    name: ClassVar[str] = NAME
    Settings: ClassVar[type[GeneratorSettings]] = ControlledSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("perlin", "real")
    uses_diffusion_base: ClassVar[bool] = True
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = None
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: ControlledSettings) -> None:
        self.settings = settings
        self.model: DiffusionModel | None = None
        self.base_model: str | None = None

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """A ControlNet for the base, saved alone in diffusers' layout, and the manifest naming the base."""
        if context.base_model is None:
            msg = f"{NAME} needs a diffusion base model (FitContext.base_model)"
            raise ValueError(msg)
        out = Path(context.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        base = load_base_model(context.base_model)
        settings = self.settings
        controlnet = trained_stand_in(new_controlnet(base), settings.controlnet_seed, settings.controlnet_noise)
        controlnet.save_pretrained(out / PART)
        write_artifact_manifest(out, self.name, data.name, settings, base_model=context.base_model)
        self.load(out)
        return out

    def load(self, artifacts: Path) -> None:
        """The base from its reference (registry or path), with the fitted ControlNet as its part."""
        manifest, self.settings = read_artifact_manifest(Path(artifacts), self)
        base = load_base_model(manifest["base_model"])
        controlnet = PART_CLASSES[PART].from_pretrained(Path(artifacts) / PART)
        self.model = dataclasses.replace(base, parts={PART: controlnet}).eval()
        self.base_model = manifest["base_model"]

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; each depends only on its own request and seed."""
        # 1. check inputs
        if self.model is None:
            msg = f"{NAME}: call fit() or load() before generate()"
            raise RuntimeError(msg)
        for request in batch:
            check_request(self, request)
            if request.resolution != self.model.resolution:
                msg = f"{NAME}: request resolution {request.resolution} != model's {self.model.resolution}"
                raise ValueError(msg)

        # 2. sources and conditioning masks
        sources = [load_source(request) for request in batch]
        conds = [conditioning_mask(request, request_rngs(request)[0]) for request in batch]

        # 3. paint, then keep the source's pixels outside each mask
        painted = self.inpaint(batch, sources, conds)
        images = [np.where(c[..., None], p, s) for c, p, s in zip(conds, painted, sources, strict=True)]
        digest = settings_digest(self.settings)
        return [
            refined_sample(
                request,
                method=self.name,
                source=source,
                image=image,
                cond_mask=cond,
                threshold=self.settings.refine_threshold,
                intensity=None,
                config_digest=digest,
                sampler=DDIMSampler.name,
                steps=self.settings.steps,
                base_model=self.base_model,
            )
            for request, source, image, cond in zip(batch, sources, images, conds, strict=True)
        ]

    def inpaint(self, batch: list[Request], sources: list[np.ndarray], conds: list[np.ndarray]) -> list[np.ndarray]:
        """Blended DDIM inside each mask, the ControlNet fed the mask; uint8 H x W x 3 images."""
        model, settings = self.model, self.settings
        assert model is not None
        generators = generators_from_seeds([request.seed for request in batch])
        masks = torch.from_numpy(np.stack(conds)[:, None].astype(np.float32))
        pixels = torch.from_numpy(np.stack(sources).transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1.0
        with torch.no_grad():
            normal = model.encode_images(pixels)
            cond = model.encode_prompt([settings.prompt.format(product=request.product) for request in batch])
            sampler = DDIMSampler.from_model(model)
            sampler.set_timesteps(settings.steps)
            blend = BlendTarget.draw(normal, F.adaptive_max_pool2d(masks, normal.shape[-1]), generators)
            final = denoise(
                model,
                blend.background(sampler, int(sampler.timesteps[0])),
                cond,
                sampler=sampler,
                uncond=model.encode_prompt([""]),
                guidance_scale=settings.guidance_scale,
                blend=blend,
                generators=generators,
                predictor=ControlNetPredictor(image=mask_image(masks), scale=settings.conditioning_scale),
            )
            return to_uint8(model.decode_latents(final))
