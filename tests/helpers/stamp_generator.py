"""``stamp``: a test generator that uses every protocol extension, registered for tests only.

It makes normals (``makes_normals``), returns its own mask (the inner part of the square it paints, so
``mask.png`` differs from both the conditioning square and a change-refined mask), and declares an
intensity domain like CADiff's w ([-2, 2], default draw U[0.5, 1.5]): the square is brightened by
``SHIFT * w``. Settings script failures of the quality gates by request index and attempt, so a test
knows how many re-tries each request needs.

Register it in the driver with ``registered()`` (a context manager) and in Ray workers with
``register`` as the ``worker_process_setup_hook`` (tests/ on the workers' PYTHONPATH).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

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
from defectsynth.generators.masks import load_source, request_rngs
from defectsynth.generators.refine import measured_sample, normal_sample, settings_digest
from defectsynth.generators.registry import REGISTRY
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit
from helpers.registration import registered_as

NAME = "stamp"
TARGET = "helpers.stamp_generator:StampGenerator"
SHIFT = 40.0  # brightness added per unit of w
LEAK = 80  # brightness added to the whole background by a leaking attempt
BORDER = 2  # pixels between the painted square's edge and the generator's own mask


def register() -> None:
    """Add ``stamp`` to the registry of this process (a Ray ``worker_process_setup_hook``)."""
    REGISTRY[NAME] = TARGET


def registered() -> AbstractContextManager[None]:
    """``stamp`` in this process's registry for the duration of the block."""
    return registered_as(NAME, TARGET)


class StampSettings(GeneratorSettings):
    """Scripted gate failures: request index -> how many of its first attempts fail."""

    missing: dict[int, int] = Field(default_factory=dict, description="attempts that paint nothing")
    leaking: dict[int, int] = Field(default_factory=dict, description="attempts that also brighten the background")
    delay: float = Field(0.0, ge=0, description="seconds each sample takes, so fault tests can kill mid-job")


def square(resolution: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded square of a third of the side, inside the frame."""
    side = resolution // 3
    top, left = (int(v) for v in rng.integers(0, resolution - side, size=2))
    mask = np.zeros((resolution, resolution), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def inner(mask: np.ndarray) -> np.ndarray:
    """``mask`` shrunk by ``BORDER`` pixels on every side (a square stays a square)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.zeros_like(mask)
    out[rows[0] + BORDER : rows[-1] + 1 - BORDER, cols[0] + BORDER : cols[-1] + 1 - BORDER] = True
    return out


def brighten(image: np.ndarray, where: np.ndarray, amount: float) -> np.ndarray:
    """``image`` with ``amount`` added inside ``where``, clipped to uint8."""
    out = image.astype(np.float32)
    out[where] += amount
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class StampGenerator:
    """Paints a brightened square; its own mask is the square's inner part; makes normals too."""

    name: ClassVar[str] = NAME
    Settings: ClassVar[type[GeneratorSettings]] = StampSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("perlin", "real")
    uses_diffusion_base: ClassVar[bool] = False
    makes_normals: ClassVar[bool] = True
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = IntensityControl(
        meaning="weight w", low=-2.0, high=2.0, default=(0.5, 1.5)
    )
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: StampSettings) -> None:
        self.settings = settings
        self._loaded = False

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Nothing to learn: write the settings."""
        out = Path(context.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_artifact_manifest(out, self.name, data.name, self.settings)
        self.load(out)
        return out

    def load(self, artifacts: Path) -> None:
        """Read the fitted settings."""
        _, self.settings = read_artifact_manifest(Path(artifacts), self)
        self._loaded = True

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request; normals for label-0 requests."""
        if not self._loaded:
            msg = "stamp: call fit() or load() before generate()"
            raise RuntimeError(msg)
        time.sleep(self.settings.delay * len(batch))
        return [self._one(request, settings_digest(self.settings)) for request in batch]

    def _one(self, request: Request, digest: str) -> Sample:
        check_request(self, request)
        mask_rng, rng = request_rngs(request)
        source = load_source(request)
        assert self.intensity is not None
        w = request.intensity if request.intensity is not None else round(self.intensity.draw_default(rng), 4)
        if request.label == 0:
            return normal_sample(request, method=self.name, image=source.copy(), intensity=w, config_digest=digest)
        cond = square(request.resolution, mask_rng)
        painted = request.attempt >= self.settings.missing.get(request.sample_index, 0)
        image = brighten(source, cond, SHIFT * w) if painted else source.copy()
        if request.attempt < self.settings.leaking.get(request.sample_index, 0):
            image = brighten(image, ~cond, LEAK)
        return measured_sample(
            request,
            method=self.name,
            source=source,
            image=image,
            mask=inner(cond),
            cond_mask=cond,
            intensity=w,
            config_digest=digest,
        )
