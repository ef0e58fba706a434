"""Crop-and-paste baseline: real defects cut out of the training split, moved, and pasted onto normals.

``fit`` cuts every generator-training defect (``ProductSplit.generator_train`` only) out of its image
along its mask's bounding box and stores the bank as PNGs with an index, ``generator.json``: that
directory is the registered artifact. ``generate`` picks a cut-out of the request's defect type (the
request's ``mask_image`` when it names one, else a seeded choice), scales it by the factor its image is
resized by, flips, turns and scales it together with its mask, places it (mostly on the foreground when
the request has one) and pastes it with a feathered alpha that is 1 inside the mask, falls off towards
the mask's edge and is 0 outside it, so no pixel outside the pasted mask changes. The conditioning mask
is the pasted mask; there is no control value, so ``intensity`` is None (a request's intensity is ignored).

Example:
    >>> mask = np.zeros((7, 7), dtype=bool); mask[1:6, 1:6] = True
    >>> alpha = feather_alpha(mask, 2.0)
    >>> float(alpha[0, 0]), float(alpha[1, 1]), float(alpha[3, 3])
    (0.0, 0.5, 1.0)
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from pydantic import Field

from defectsynth.core.resize import resize_image, resize_mask
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
from defectsynth.generators.masks import AugmentOptions, augment_jointly, load_foreground, load_source, request_rngs
from defectsynth.generators.refine import refined_sample, settings_digest
from defectsynth.storage.imageio import load_item, read_image, read_mask
from defectsynth.storage.keys import slug
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

BANK_DIR = "bank"


class CropPasteSettings(GeneratorSettings):
    """Settings of the crop-and-paste generator."""

    augment: AugmentOptions = Field(default_factory=AugmentOptions, description="moves of the cut-outs")
    feather: float = Field(
        0.03, ge=0.0, le=0.5, description="edge blend width as a share of the resolution; 0 pastes hard edges"
    )
    refine_threshold: float = Field(0.03, ge=0.0, lt=1.0, description="per-pixel change (0..1) kept as defect")


@dataclass(frozen=True)
class CutOut:
    """One bank entry: a training defect's bounding-box crop and mask, and its image's full size."""

    image_id: str
    defect_type: str
    image: np.ndarray  # hxwx3 uint8
    mask: np.ndarray  # hxw bool
    source_size: tuple[int, int]  # (width, height) of the defect image it was cut from


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; the frame border counts as inside, so masks touching it are not feathered there."""
    padded = np.pad(mask, 1, mode="edge")
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def feather_alpha(mask: np.ndarray, width: float) -> np.ndarray:
    """Paste alpha: 0 outside ``mask``, rising over ``width`` pixels from its edge to 1 in the interior.

    A pixel's depth is the number of erosions it survives (1 on the edge); alpha is depth / width,
    capped at 1. For a mask thinner than ``2 * width`` the width shrinks to half its deepest depth, so
    the core of a thin scratch is still pasted at full strength.
    """
    mask = mask.astype(bool)
    if width <= 0 or not mask.any():
        return mask.astype(np.float32)
    depth = np.zeros(mask.shape, dtype=np.float32)
    level = mask
    for _ in range(2 * math.ceil(width)):
        depth += level
        level = _erode(level)
        if not level.any():
            break
    effective = min(float(width), max(1.0, math.ceil(float(depth.max()) / 2.0)))
    return np.clip(depth / effective, 0.0, 1.0)


def paste(source: np.ndarray, patch: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``alpha * patch + (1 - alpha) * source``, rounded; pixels with alpha 0 are the source's exactly."""
    weight = alpha[..., None].astype(np.float32)
    mixed = np.rint(source.astype(np.float32) * (1.0 - weight) + patch.astype(np.float32) * weight)
    return np.where(weight > 0, np.clip(mixed, 0, 255).astype(np.uint8), source)


def cut_out(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bounding-box crop of an image and its mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
    return image[crop], mask[crop]


class CropPasteGenerator:
    """Baseline: paste jointly augmented real defect cut-outs with feathered edges."""

    name: ClassVar[str] = "croppaste"
    Settings: ClassVar[type[GeneratorSettings]] = CropPasteSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("real",)
    uses_diffusion_base: ClassVar[bool] = False
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = None  # no control value: the cut-out is pasted as it is
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: CropPasteSettings) -> None:
        self.settings = settings
        self.bank: dict[str, list[CutOut]] = {}
        self._loaded = False

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Cut out every generator-training defect and write the bank with its index."""
        out = Path(context.output_dir)
        bank_dir = out / BANK_DIR
        if bank_dir.exists():
            shutil.rmtree(bank_dir)
        bank_dir.mkdir(parents=True)
        items = []
        for defect_type, image_ids in sorted(split.generator_train.items()):
            for image_id in image_ids:
                item = load_item(data.record(image_id))
                image, mask = cut_out(item.image, item.gt_mask)
                stem = f"{len(items):04d}-{slug(image_id)}"
                Image.fromarray(image).save(bank_dir / f"{stem}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(bank_dir / f"{stem}_mask.png")
                items.append(
                    {
                        "image_id": image_id,
                        "defect_type": defect_type,
                        "image": f"{BANK_DIR}/{stem}.png",
                        "mask": f"{BANK_DIR}/{stem}_mask.png",
                        "source_size": [int(item.image.shape[1]), int(item.image.shape[0])],
                    }
                )
        write_artifact_manifest(out, self.name, data.name, self.settings, items=items)
        logger.info("croppaste bank for %s: %d cut-outs in %s", data.name, len(items), out)
        self.load(out)
        return out

    def load(self, artifacts: Path) -> None:
        """Read the bank into memory; the fitted settings replace the ones this instance was built with."""
        artifacts = Path(artifacts)
        manifest, fitted = read_artifact_manifest(artifacts, self)
        self.settings = fitted
        self.bank = {}
        for entry in manifest["items"]:
            cut = CutOut(
                image_id=entry["image_id"],
                defect_type=entry["defect_type"],
                image=read_image(artifacts / entry["image"]),
                mask=read_mask(artifacts / entry["mask"]),
                source_size=(int(entry["source_size"][0]), int(entry["source_size"][1])),
            )
            self.bank.setdefault(cut.defect_type, []).append(cut)
        self._loaded = True

    @property
    def image_ids(self) -> list[str]:
        """Ids of the training defects in the bank."""
        return [cut.image_id for cuts in self.bank.values() for cut in cuts]

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; each depends only on its own request and seed."""
        if not self._loaded:
            msg = "croppaste generator: call fit() or load() before generate()"
            raise RuntimeError(msg)
        digest = settings_digest(self.settings)
        return [self._generate_one(request, digest) for request in batch]

    def _choose(self, request: Request, rng: np.random.Generator) -> CutOut:
        """The request's named training defect, else a seeded choice among the type's cut-outs."""
        cuts = self.bank.get(request.defect_type, [])
        if not cuts:
            msg = f"croppaste: no cut-outs of defect type {request.defect_type!r}; bank has {sorted(self.bank)}"
            raise ValueError(msg)
        if request.mask_image is None:
            return cuts[int(rng.integers(len(cuts)))]
        for cut in cuts:
            if cut.image_id == request.mask_image:
                return cut
        msg = (
            f"croppaste: mask_image {request.mask_image!r} is not a generator-training defect of type "
            f"{request.defect_type!r}; the bank has {[cut.image_id for cut in cuts]}"
        )
        raise ValueError(msg)

    def _generate_one(self, request: Request, digest: str) -> Sample:
        # 1. check the request (mask source, label)
        check_request(self, request)
        # 2. source normal and cut-out, scaled by the factor its own image is resized by
        mask_rng, _ = request_rngs(request)
        source = load_source(request)
        cut = self._choose(request, mask_rng)
        width, height = cut.source_size
        shape = (
            max(1, round(cut.mask.shape[0] * request.resolution / height)),
            max(1, round(cut.mask.shape[1] * request.resolution / width)),
        )
        patch, patch_mask = resize_image(cut.image, shape), resize_mask(cut.mask, shape)
        # 3. move it, paste it with feathered edges, refine, record
        placed, cond = augment_jointly(
            patch,
            patch_mask,
            mask_rng,
            shape=request.resolution,
            foreground=load_foreground(request),
            options=self.settings.augment,
        )
        alpha = feather_alpha(cond, self.settings.feather * request.resolution)
        image = paste(source, placed, alpha)
        return refined_sample(
            request,
            method=self.name,
            source=source,
            image=image,
            cond_mask=cond,
            threshold=self.settings.refine_threshold,
            intensity=None,
            config_digest=digest,
        )
