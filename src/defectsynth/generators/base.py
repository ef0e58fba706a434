"""The Generator protocol, generation requests, and the registry that maps method names to classes.

Jobs never branch on a method name: they ask the registry for the class, validate the method's
settings with its own pydantic model, and call ``fit`` (inside a Ray Train worker), ``load`` (in
each generation actor, from the artifacts registered in MLflow) and ``generate``.
Adding a method is one module plus one line in ``REGISTRY``.

A method fits once per product or once per defect type (``fit_unit``); ``generators.fit_units`` fans
the second kind out and back in.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from defectsynth.core.strategy import StrategyConfig
from defectsynth.generators.intensity import IntensityControl
from defectsynth.generators.registry import REGISTRY
from defectsynth.storage.keys import derive_key
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

MaskSource = Literal["real", "learned", "perlin"]
FitUnitKind = Literal["product", "defect_type"]  # what one fit of a method covers

logger = logging.getLogger(__name__)

_KEY_FIELDS = ("sample_index", "seed", "source_image", "mask_source", "mask_image", "intensity", "resolution")


_ROW_DEFAULTS = {"label": 1, "attempt": 0}
PROGRESS_FILE = "progress.json"  # beside a checkpoint's weights: the step and curves to resume from


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of re-try ``attempt`` (1, 2, ...) of a request whose previous attempt had ``seed``."""
    digest = hashlib.sha256(f"{seed}/retry/{attempt}".encode()).hexdigest()
    return int(digest[:12], 16)


@dataclass(frozen=True)
class Request:
    """One sample to generate: what, on which normal image, with which mask, how strong, which seed.

    Paths point into the dataset on shared storage; the key depends only on the ids, so moving the
    dataset does not change keys. ``label`` 0 asks for a normal sample (defect type ``good``, no mask),
    from methods that declare ``makes_normals``. ``attempt`` counts re-tries after a quality-gate
    rejection: attempt k has its own seed (``retried``), hence its own key.
    """

    product: str
    defect_type: str
    sample_index: int
    seed: int
    resolution: int
    source_image: str  # image id of the normal the defect is drawn on
    source_path: str
    mask_source: MaskSource
    mask_image: str | None = None  # id of the training defect whose mask is used (mask_source "real")
    mask_paths: tuple[str, ...] = ()
    foreground_path: str | None = None
    intensity: float | None = None
    label: Literal[0, 1] = 1
    attempt: int = 0

    def key(self, method: str) -> str:
        """The sample key: a digest of the request's ids and values, and the method."""
        fields = {name: getattr(self, name) for name in _KEY_FIELDS}
        return derive_key(self.product, method, self.defect_type, fields)

    def retried(self) -> Request:
        """The next attempt at this request: attempt + 1, with a seed derived from this attempt's."""
        attempt = self.attempt + 1
        return replace(self, seed=retry_seed(self.seed, attempt), attempt=attempt)

    def to_row(self) -> dict[str, Any]:
        """A flat dict for a Ray Data row (tuples become lists)."""
        row = asdict(self)
        row["mask_paths"] = list(self.mask_paths)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Request:
        """Inverse of ``to_row``; tolerates numpy scalars and arrays from Ray Data batches.

        ``label`` and ``attempt`` may be absent (rows written before they existed): 1 and 0.
        """
        values = {name: row[name] for name in cls.__dataclass_fields__ if name not in _ROW_DEFAULTS}
        values |= {name: row.get(name, default) for name, default in _ROW_DEFAULTS.items()}
        for name in ("mask_image", "foreground_path", "intensity"):  # Ray Data turns a None into NaN
            if isinstance(values[name], float | np.floating) and math.isnan(values[name]):
                values[name] = None
        values["mask_paths"] = tuple(str(p) for p in (values["mask_paths"] if values["mask_paths"] is not None else ()))
        for name in ("sample_index", "seed", "resolution", "label", "attempt"):
            values[name] = int(values[name])
        if values["intensity"] is not None:
            values["intensity"] = float(values["intensity"])
        return cls(**values)


@dataclass
class FitContext:
    """What a generator's ``fit`` gets from the training job besides the data.

    Trainable generators wrap their model with ``TrainEngine(model, optimizer, context.strategy, ...)``,
    call ``report`` with per-step metrics (logged as curves), call ``save_checkpoint(dir, metrics)`` on
    every rank each ``checkpoint_every`` steps, and start from ``resume_from`` when it is set (a Ray
    Train restart after a failure). Generators without gradient training ignore all of these.
    """

    output_dir: Path  # write the artifacts here; it becomes the registered model
    max_steps: int
    base_model: str | None = None  # diffusion base (``models:/`` URI or local path) for generators that use one
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    threads: int = 1
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint_every: int = 50
    resume_from: Path | None = None
    companions: list[tuple[ProductData, ProductSplit]] = field(default_factory=list)  # joint fit: trained with data
    report: Callable[[dict[str, float]], None] = field(default=lambda metrics: None)
    save_checkpoint: Callable[[Path, dict[str, float]], None] = field(default=lambda directory, metrics: None)

    def checkpoint(self, step: int, last: int, write_weights: Callable[[Path], None], progress: dict[str, Any]) -> None:
        """Every ``checkpoint_every`` steps before ``last``: the weights and ``progress`` to ``save_checkpoint``.

        ``write_weights`` fills a temporary directory, ``progress`` (with ``step``) goes beside them as
        ``progress.json``, and ``save_checkpoint`` takes the directory; ``progress()`` reads it back on resume.
        """
        if step % self.checkpoint_every or step >= last:
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_weights(Path(tmp))
            (Path(tmp) / PROGRESS_FILE).write_text(json.dumps({**progress, "step": step}))
            self.save_checkpoint(Path(tmp), {"step": float(step)})

    def progress(self) -> dict[str, Any] | None:
        """The ``progress`` of the checkpoint to resume from (its weights beside it), or None to start afresh."""
        if self.resume_from is None or not (self.resume_from / PROGRESS_FILE).is_file():
            return None
        return json.loads((self.resume_from / PROGRESS_FILE).read_text())


class GeneratorSettings(BaseModel):
    """Base of every method's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Generator(Protocol):
    """A defect generator: fitted per product, loaded from its artifacts, batched generation."""

    name: ClassVar[str]
    Settings: ClassVar[type[GeneratorSettings]]
    mask_sources: ClassVar[tuple[MaskSource, ...]]  # the mask sources its requests may use
    uses_diffusion_base: ClassVar[bool]  # True: finetune makes sure the run's diffusion base exists first
    makes_normals: ClassVar[bool]  # True: it takes label-0 requests and returns normal samples
    # True: it paints inside a conditioning mask and keeps the source's pixels elsewhere; False: it remakes the
    # whole image from the source normal (SeaS), its samples have no conditioning mask and their mask is its own
    keeps_background: ClassVar[bool]
    intensity: ClassVar[IntensityControl | None]  # its control value's domain and default draw; None: it has none
    fit_unit: ClassVar[FitUnitKind]  # "defect_type": one fit per defect type, each seeing only that type's defects

    def __init__(self, settings: GeneratorSettings) -> None: ...

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Learn from the split's training side; write artifacts to ``context.output_dir`` and return it."""
        ...

    def load(self, artifacts: Path) -> None:
        """Load fitted artifacts (in each generation actor)."""
        ...

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; deterministic per request seed, whatever the batch."""
        ...


ARTIFACT_FILE = "generator.json"
ARTIFACT_FORMAT = 1


def write_artifact_manifest(
    out: Path, method: str, product: str, settings: GeneratorSettings, **fields: Any
) -> dict[str, Any]:
    """Write ``generator.json``: method, format version, product, the fitted settings, method fields."""
    manifest = {
        "method": method,
        "format_version": ARTIFACT_FORMAT,
        "product": product,
        "settings": settings.model_dump(mode="json"),
        **fields,
    }
    (Path(out) / ARTIFACT_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_artifact_manifest(artifacts: Path, generator: Generator) -> tuple[dict[str, Any], GeneratorSettings]:
    """Read and check ``generator.json`` for ``generator``; returns it with the fitted settings.

    The fitted settings win over the ones the instance was built with (a warning says when they differ),
    so a registered model always generates as it was fitted.
    """
    try:
        manifest = json.loads((Path(artifacts) / ARTIFACT_FILE).read_text())
    except (OSError, ValueError) as err:
        msg = f"{artifacts}: not {generator.name} artifacts ({err})"
        raise ValueError(msg) from err
    if manifest.get("method") != generator.name:
        msg = f"{artifacts}: artifacts of {manifest.get('method')!r}, not {generator.name!r}"
        raise ValueError(msg)
    fitted = generator.Settings.model_validate(manifest["settings"])
    if fitted != getattr(generator, "settings", fitted):
        logger.warning("%s: using the fitted settings from %s, not the ones given", generator.name, artifacts)
    return manifest, fitted


def check_request(generator: Generator, request: Request) -> None:
    """Raise ValueError when ``generator`` cannot serve ``request`` as its class declares.

    Checked: the mask source (``mask_sources``), a normal request (``makes_normals``) and the intensity
    (inside the ``intensity`` domain; none asked of a method without one is ignored).
    """
    name = generator.name
    if request.mask_source not in generator.mask_sources:
        msg = f"{name}: mask source {request.mask_source!r} not supported; use one of {generator.mask_sources}"
        raise ValueError(msg)
    if request.label == 0 and not generator.makes_normals:
        msg = f"{name}: does not make normal samples (label 0); request {request.product}#{request.sample_index}"
        raise ValueError(msg)
    if request.intensity is not None and generator.intensity is not None:
        generator.intensity.check_value(request.intensity, method=name)


def generator_class(method: str) -> type[Generator]:
    """The class registered for ``method``; an unknown name lists the known ones."""
    try:
        target = REGISTRY[method]
    except KeyError:
        msg = f"unknown generator {method!r}; registered: {', '.join(sorted(REGISTRY))}"
        raise ValueError(msg) from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def uses_diffusion_base(method: str) -> bool:
    """Whether ``method`` fine-tunes the run's diffusion base model (read from its class)."""
    return generator_class(method).uses_diffusion_base


def auto_mask_source(method: str, *, tiny_base: bool) -> MaskSource:
    """The mask source ``generate.mask_source: auto`` gives ``method``: its first, or its tiny-base choice.

    A method may set ``tiny_base_mask_source`` (a class attribute) when its own mask model cannot learn the
    real shapes on the tiny base trained here (anomalydiffusion's e_m); on a real Stable Diffusion base the
    first of ``mask_sources`` (its preferred source) is used.
    """
    cls = generator_class(method)
    on_tiny: MaskSource | None = getattr(cls, "tiny_base_mask_source", None)
    return on_tiny if tiny_base and on_tiny is not None else cls.mask_sources[0]


def fits_jointly(method: str, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether ``method``'s settings ask for one fit over every product of the run (a ``joint_products`` field).

    Such a fit gets the first product as ``data`` and the others as ``FitContext.companions``; its one set
    of artifacts is registered for every product. A method that fits per defect type cannot fit jointly.
    """
    joint = bool(getattr(build_generator(method, settings).settings, "joint_products", False))
    if joint and generator_class(method).fit_unit != "product":
        msg = f"{method} fits once per defect type; joint_products does not apply to it"
        raise ValueError(msg)
    return joint


def build_generator(method: str, settings: Mapping[str, Any] | None = None) -> Generator:
    """Instantiate a registered generator with validated settings."""
    cls = generator_class(method)
    return cls(cls.Settings.model_validate(dict(settings or {})))
