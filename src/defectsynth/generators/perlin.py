"""DRAEM-style Perlin anomalies: a texture blended into a normal image inside a Perlin (or real) mask.

Per DRAEM and DiffusionAD (Eq. 12), with M the conditioning mask, N the normal and A the texture::

    out = (1 - beta) * A * M + beta * N * M + N * (1 - M),  beta ~ U(beta_range)  (DRAEM: [0, 0.8])

The recorded ``intensity`` is the opacity ``1 - beta`` (or the request's own intensity when it sets
one). A is either the normal itself, shifted and turned, or an image from a texture folder (DTD in the
papers), each passed through three random colour operations as in DRAEM. Nothing is trained: ``fit``
stores the settings, the product's foreground flag and a copy of the texture folder, so generation
loads through the registry like every other method.

Example:
    >>> from defectsynth.generators.base import build_generator
    >>> generator = build_generator("perlin", {"beta_range": [0.2, 0.6]})
    >>> generator.settings.beta_range
    (0.2, 0.6)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from defectsynth.core.resize import resize_image
from defectsynth.core.texture_augment import augment_texture
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
from defectsynth.generators.masks import AugmentOptions, MaskOptions, conditioning_mask, load_source, request_rngs
from defectsynth.generators.refine import refined_sample, settings_digest
from defectsynth.storage.imageio import is_image_file, read_image
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

TEXTURE_DIR = "textures"
TEXTURE_CACHE = 64  # decoded, resized textures kept per actor (a DTD-sized folder would not fit)


class PerlinSettings(GeneratorSettings):
    """Settings of the Perlin generator (defaults follow DRAEM)."""

    texture_source: Literal["self", "folder"] = Field(
        "self", description="'self': the normal image, shifted and recoloured; 'folder': images in texture_dir"
    )
    texture_dir: str | None = Field(None, description="directory of texture images (DTD-like); folder source only")
    beta_range: tuple[float, float] = Field((0.0, 0.8), description="beta ~ U(range); opacity is 1 - beta")
    threshold: float = Field(0.5, description="Perlin noise above this is the mask")
    scale_exponents: tuple[int, int] = Field((0, 6), description="Perlin cells per axis 2^k, k in [low, high)")
    min_area: int = Field(16, ge=1, description="smallest Perlin mask in pixels, after the foreground")
    refine_threshold: float = Field(0.03, ge=0.0, lt=1.0, description="per-pixel change (0..1) kept as defect")
    augment: AugmentOptions = Field(default_factory=AugmentOptions, description="moves of real masks")

    @model_validator(mode="after")
    def _check(self) -> PerlinSettings:
        low, high = self.beta_range
        if not 0.0 <= low <= high < 1.0:
            msg = f"beta_range must satisfy 0 <= low <= high < 1, got {self.beta_range}"
            raise ValueError(msg)
        if (self.texture_source == "folder") != (self.texture_dir is not None):
            msg = "texture_dir is required for texture_source 'folder' and only allowed there"
            raise ValueError(msg)
        low_k, high_k = self.scale_exponents
        if not 0 <= low_k < high_k:
            msg = f"scale_exponents must satisfy 0 <= low < high, got {self.scale_exponents}"
            raise ValueError(msg)
        return self

    def mask_options(self) -> MaskOptions:
        """The conditioning-mask options these settings describe."""
        return MaskOptions(
            threshold=self.threshold,
            scale_exponents=self.scale_exponents,
            min_area=self.min_area,
            augment=self.augment,
        )


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
    """DRAEM's blend: ``opacity * texture + (1 - opacity) * image`` inside ``mask``, ``image`` outside it."""
    weight = mask.astype(np.float32)[..., None] * opacity
    mixed = image.astype(np.float32) * (1.0 - weight) + texture.astype(np.float32) * weight
    return np.where(mask[..., None], np.clip(np.rint(mixed), 0, 255).astype(np.uint8), image)


class PerlinGenerator:
    """DRAEM-style baseline: texture blended at a random opacity into a Perlin or real mask."""

    name: ClassVar[str] = "perlin"
    Settings: ClassVar[type[GeneratorSettings]] = PerlinSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("perlin", "real")
    uses_diffusion_base: ClassVar[bool] = False
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    # Opacity 1 - beta; its default draw is beta ~ U(beta_range), [0.2, 1.0] with DRAEM's default beta_range.
    intensity: ClassVar[IntensityControl | None] = IntensityControl(
        meaning="opacity", low=0.0, high=1.0, default=(0.2, 1.0), low_open=True
    )
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: PerlinSettings) -> None:
        self.settings = settings
        self.textures: list[Path] = []
        self.has_foreground = False
        self._loaded = False
        self._warned_foreground = False
        self._texture_cache: dict[tuple[Path, int], np.ndarray] = {}

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Store settings, the foreground flag and the texture folder; nothing is learned from the images."""
        out = Path(context.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        textures = self._copy_textures(out) if self.settings.texture_source == "folder" else []
        write_artifact_manifest(
            out, self.name, data.name, self.settings, has_foreground=data.has_foreground, textures=textures
        )
        logger.info("perlin artifacts for %s in %s (%d textures)", data.name, out, len(textures))
        self.load(out)
        return out

    def _copy_textures(self, out: Path) -> list[str]:
        """Copy the texture folder's images under ``out/textures``; return their relative paths."""
        source = Path(str(self.settings.texture_dir))
        files = sorted(p for p in source.rglob("*") if is_image_file(p)) if source.is_dir() else []
        if not files:
            msg = f"texture_dir {source} has no images (png, jpg, bmp, tif)"
            raise ValueError(msg)
        target = out / TEXTURE_DIR
        if target.exists():
            shutil.rmtree(target)
        copied = []
        for path in files:
            relative = Path(TEXTURE_DIR) / path.relative_to(source)
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / relative)
            copied.append(relative.as_posix())
        size = sum((out / name).stat().st_size for name in copied)
        logger.info("copied %d textures (%.1f MB) from %s", len(copied), size / 1e6, source)
        return copied

    def load(self, artifacts: Path) -> None:
        """Read ``generator.json``; the fitted settings replace the ones this instance was built with."""
        artifacts = Path(artifacts)
        manifest, fitted = read_artifact_manifest(artifacts, self)
        self.settings = fitted
        self.textures = [artifacts / name for name in manifest["textures"]]
        missing = [str(path) for path in self.textures if not path.is_file()]
        if missing:
            msg = f"{artifacts}: texture files missing: {', '.join(missing[:3])}"
            raise ValueError(msg)
        self.has_foreground = bool(manifest["has_foreground"])
        self._texture_cache.clear()
        self._loaded = True

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; each depends only on its own request and seed."""
        if not self._loaded:
            msg = "perlin generator: call fit() or load() before generate()"
            raise RuntimeError(msg)
        digest = settings_digest(self.settings)
        return [self._generate_one(request, digest) for request in batch]

    def _generate_one(self, request: Request, digest: str) -> Sample:
        # 1. check the request (mask source, label, opacity in (0, 1])
        check_request(self, request)
        if self.has_foreground and request.foreground_path is None and not self._warned_foreground:
            self._warned_foreground = True
            logger.warning(
                "perlin: %s has foreground masks but request %s names none; its mask may leave the object",
                request.product,
                request.source_image,
            )
        # 2. source normal, conditioning mask (its own stream), texture and opacity
        mask_rng, rng = request_rngs(request)
        source = load_source(request)
        cond = conditioning_mask(request, mask_rng, self.settings.mask_options())
        texture = self._texture(source, request.resolution, rng)
        beta = float(rng.uniform(*self.settings.beta_range))
        opacity = request.intensity if request.intensity is not None else 1.0 - beta
        # 3. blend, refine, record
        image = blend(source, texture, cond, opacity)
        return refined_sample(
            request,
            method=self.name,
            source=source,
            image=image,
            cond_mask=cond,
            threshold=self.settings.refine_threshold,
            intensity=opacity,
            config_digest=digest,
        )

    def _texture(self, source: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
        """The anomaly source A: the normal itself or a folder texture, colour-augmented and moved."""
        if self.settings.texture_source == "self":
            return augment_texture(source, rng, shift=True)
        path = self.textures[int(rng.integers(len(self.textures)))]
        key = (path, resolution)
        if key not in self._texture_cache:
            if len(self._texture_cache) >= TEXTURE_CACHE:
                self._texture_cache.pop(next(iter(self._texture_cache)))
            self._texture_cache[key] = resize_image(read_image(path), resolution)
        return augment_texture(self._texture_cache[key], rng, shift=False)
