"""``typetune``: a test generator that fits once per defect type and keeps only what it trained, registered for tests.

Like BADG, it fine-tunes the diffusion base's U-Net once per defect type (``fit_unit = "defect_type"``), each
fit on that type's training defects alone (a fit that sees another type's defects is an error, so a test
knows the job narrowed the data). Its artifacts are the fine-tuned U-Net's weights and a reference to the
base (``FitContext.base_model``), never a copy of the base: ``load`` resolves the reference, from the MLflow
registry or a path, and puts the U-Net's weights back. It paints by one denoising step from the source's
latent noised to ``noise_level``, decoded and kept inside the conditioning mask.

Register it in the driver with ``registered()`` and in Ray workers with ``register`` as the
``worker_process_setup_hook`` (tests/ on the workers' PYTHONPATH).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field
from safetensors.torch import load_file, save_file

from defectsynth.core.resize import resize_image, resize_mask
from defectsynth.core.train_engine import TrainEngine
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss, generic_prompt
from defectsynth.diffusion.preview import to_uint8
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
from defectsynth.generators.masks import MaskOptions, conditioning_mask, load_source, request_rngs
from defectsynth.generators.refine import refined_sample, settings_digest
from defectsynth.generators.registry import REGISTRY
from defectsynth.storage.imageio import load_item
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit
from helpers.registration import registered_as

NAME = "typetune"
TARGET = "helpers.typetune_generator:TypeTuneGenerator"
UNET_FILE = "unet.safetensors"


def register() -> None:
    """Add ``typetune`` to the registry of this process (a Ray ``worker_process_setup_hook``)."""
    REGISTRY[NAME] = TARGET


def registered() -> AbstractContextManager[None]:
    """``typetune`` in this process's registry for the duration of the block."""
    return registered_as(NAME, TARGET)


class TypeTuneSettings(GeneratorSettings):
    """The U-Net's learning rate, the noise level it paints from, the change that marks a defect pixel."""

    learning_rate: float = Field(1e-3, gt=0)
    noise_level: int = Field(600, ge=1, description="training timestep the source's latent is noised to")
    refine_threshold: float = Field(0.05, gt=0, lt=1)


class MaskedUNetLoss(torch.nn.Module):
    """The masked denoising loss with the U-Net as the trained part, so the engine sees its parameters."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.unet, self.model = model.unet, model

    def forward(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Loss of images in [-1, 1] (B, 3, H, W) inside their masks (B, 1, H, W)."""
        with torch.no_grad():
            latents = self.model.encode_images(images, generator)
            context = self.model.encode_prompt([""] * len(images))
        weight = F.adaptive_max_pool2d(masks, latents.shape[-1])
        return denoising_loss(self.model, latents, context, generator, loss_mask=weight)


def to_model_range(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 images to a (B, 3, H, W) batch in [-1, 1]."""
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1.0


class TypeTuneGenerator:
    """Fine-tunes the base U-Net on one defect type; paints by one denoising step inside the mask."""

    name: ClassVar[str] = NAME
    Settings: ClassVar[type[GeneratorSettings]] = TypeTuneSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("real", "perlin")
    uses_diffusion_base: ClassVar[bool] = True
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = None
    fit_unit: ClassVar[FitUnitKind] = "defect_type"

    def __init__(self, settings: TypeTuneSettings) -> None:
        self.settings = settings
        self.model: DiffusionModel | None = None
        self.defect_type: str | None = None
        self.base_model: str | None = None

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Fine-tune the U-Net for ``max_steps`` on the one defect type it is given; write its weights."""
        types = sorted(t for t, ids in split.generator_train.items() if ids)
        seen = sorted({record.defect_type for record in data.defects})
        if len(types) != 1 or seen != types:
            msg = f"typetune fits one defect type at a time; got training types {types}, defects of {seen}"
            raise ValueError(msg)
        if context.base_model is None:
            msg = "typetune needs a diffusion base model (FitContext.base_model)"
            raise ValueError(msg)
        model = load_base_model(context.base_model)
        model.vae.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        model.unet.requires_grad_(True).train()
        items = [load_item(data.record(i)) for i in split.generator_train[types[0]]]
        images = to_model_range([resize_image(item.image, model.resolution) for item in items])
        masks = np.stack([resize_mask(item.gt_mask, model.resolution) for item in items])[:, None]
        optimizer = torch.optim.Adam(model.unet.parameters(), lr=self.settings.learning_rate)
        engine = TrainEngine(MaskedUNetLoss(model), optimizer, context.strategy, micro_batch_size=len(items))
        batch, mask_batch = engine.to_device(images), engine.to_device(torch.from_numpy(masks.astype(np.float32)))
        for step in range(context.max_steps):
            loss = engine(batch, mask_batch, torch.Generator().manual_seed(context.seed * 7919 + step))
            engine.step(loss)
            context.report({"loss": float(loss.detach())})
        out = Path(context.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}, str(out / UNET_FILE))
        write_artifact_manifest(
            out, self.name, data.name, self.settings, base_model=context.base_model, defect_type=types[0]
        )
        self.load(out)
        return out

    def load(self, artifacts: Path) -> None:
        """The base from its reference (registry or path), then the fine-tuned U-Net's weights."""
        manifest, self.settings = read_artifact_manifest(Path(artifacts), self)
        model = load_base_model(manifest["base_model"])
        model.unet.load_state_dict(load_file(str(Path(artifacts) / UNET_FILE)))
        self.model = model.eval()
        self.defect_type, self.base_model = manifest["defect_type"], manifest["base_model"]

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order, each from its own seed."""
        if self.model is None:
            msg = "typetune: call fit() or load() before generate()"
            raise RuntimeError(msg)
        return [self._one(request, settings_digest(self.settings)) for request in batch]

    def _one(self, request: Request, digest: str) -> Sample:
        check_request(self, request)
        if request.defect_type != self.defect_type:
            msg = f"typetune: fitted on {self.defect_type!r}, asked for {request.defect_type!r}"
            raise ValueError(msg)
        model = self.model
        assert model is not None
        mask_rng, _ = request_rngs(request)
        source = load_source(request)
        cond = conditioning_mask(request, mask_rng, MaskOptions())
        generator = torch.Generator().manual_seed(request.seed)
        with torch.no_grad():
            latents = model.encode_images(to_model_range([source]), generator)
            t = torch.tensor([self.settings.noise_level])
            noisy = model.scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), t)
            context = model.encode_prompt([generic_prompt(request.product)])
            eps = model.unet(noisy, t, encoder_hidden_states=context).sample
            alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
            painted = to_uint8(model.decode_latents((noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()))[0]
        image = np.where(cond[..., None], painted, source)
        return refined_sample(
            request,
            method=self.name,
            source=source,
            image=image,
            cond_mask=cond,
            threshold=self.settings.refine_threshold,
            intensity=None,
            config_digest=digest,
            base_model=self.base_model,
        )
