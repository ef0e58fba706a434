"""Fit units: a method that fits once per defect type (``fit_unit = "defect_type"``, as BADG does).

``fit_units`` lists a product's fits, ``unit_view`` narrows the data one fit sees, ``assemble_units``
makes the units' artifacts one directory per product (``units/<type>/`` and a ``generator.json``
listing them), and ``UnitGenerator`` loads that directory and sends each request to its type's unit,
so a method that fits per type writes no dispatch of its own. ``product_generator`` returns whichever
of the two a product's model is.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from defectsynth.generators.base import (
    FitContext,
    Generator,
    GeneratorSettings,
    Request,
    build_generator,
    generator_class,
    read_artifact_manifest,
    write_artifact_manifest,
)
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

UNITS_DIR = "units"


@dataclass(frozen=True)
class FitUnit:
    """One fit of a method on a product: the whole product (``defect_type`` None) or one defect type."""

    defect_type: str | None = None

    @property
    def subdir(self) -> str:
        """The unit's place under a product's artifacts or a fit's outputs: ``""``, or ``units/<type>``."""
        return "" if self.defect_type is None else f"{UNITS_DIR}/{self.defect_type}"

    def metric(self, name: str) -> str:
        """A curve's MLflow name for this unit: ``name``, or ``<name>.<type>`` (as per-type scores are named)."""
        return name if self.defect_type is None else f"{name}.{self.defect_type}"


def fit_units(method: str, split: ProductSplit) -> list[FitUnit]:
    """The fits ``method`` asks for on a product: the product, or each defect type with training defects, sorted."""
    if generator_class(method).fit_unit == "product":
        return [FitUnit()]
    units = [FitUnit(kind) for kind, ids in sorted(split.generator_train.items()) if ids]
    if not units:
        msg = f"{method} fits once per defect type, but the split has no generator-training defects"
        raise ValueError(msg)
    return units


def unit_view(data: ProductData, split: ProductSplit, unit: FitUnit) -> tuple[ProductData, ProductSplit]:
    """What one unit's fit sees: the whole product, or its normals and only the unit's type's defects."""
    kind = unit.defect_type
    if kind is None:
        return data, split
    defects = tuple(record for record in data.defects if record.defect_type == kind)
    narrowed = split.model_copy(
        update={
            "generator_train": {kind: list(split.generator_train.get(kind, []))},
            "test_defects": {kind: list(split.test_defects.get(kind, []))},
        }
    )
    return replace(data, defects=defects), narrowed


def write_units_manifest(
    out: Path, method: str, product: str, settings: GeneratorSettings, units: Sequence[FitUnit]
) -> dict[str, Any]:
    """The ``generator.json`` of a per-type model: the method's fields plus ``units`` (defect type -> subdir)."""
    listed = {unit.defect_type: unit.subdir for unit in units if unit.defect_type is not None}
    return write_artifact_manifest(out, method, product, settings, fit_unit="defect_type", units=listed)


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a file (free on one filesystem), else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def assemble_units(
    out: Path, method: str, product: str, settings: Mapping[str, Any] | None, units: Mapping[FitUnit, Path]
) -> Path:
    """One product's artifacts from its units' artifact directories; returns the directory to register.

    A product-wide fit's own directory is returned as it is. Per-type units are placed under
    ``out/units/<type>/`` (hard links where the filesystem allows), beside a ``generator.json`` listing them.
    """
    if set(units) == {FitUnit()}:
        return Path(units[FitUnit()])
    if FitUnit() in units:
        msg = f"{method}: a product-wide fit and per-type units cannot make one model"
        raise ValueError(msg)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ordered = sorted(units, key=lambda unit: str(unit.defect_type))
    for unit in ordered:
        shutil.copytree(units[unit], out / unit.subdir, copy_function=_link_or_copy)
    write_units_manifest(out, method, product, build_generator(method, settings).settings, ordered)
    return out


class UnitGenerator:
    """A method that fits once per defect type, as one generator of a product: one loaded unit per type.

    ``generate`` sends each request to its defect type's unit and returns the samples in request order;
    normal requests (label 0) go to the first unit (types sorted). ``fit`` fits every unit in turn in this
    process (tests, notebooks); ``jobs.finetune`` fits them itself, one checkpointed fit each, and assembles
    them with ``assemble_units``. The declarations (``mask_sources``, ``intensity``, ...) are the method's.
    """

    def __init__(self, method: str, settings: Mapping[str, Any] | None = None) -> None:
        cls = generator_class(method)
        self.method_class = cls
        self.name, self.Settings, self.mask_sources = cls.name, cls.Settings, cls.mask_sources
        self.uses_diffusion_base, self.makes_normals = cls.uses_diffusion_base, cls.makes_normals
        self.intensity, self.fit_unit = cls.intensity, cls.fit_unit
        self.keeps_background = cls.keeps_background
        self.settings = cls.Settings.model_validate(dict(settings or {}))
        self.units: dict[str, Generator] = {}

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Fit each unit into ``<output_dir>/units/<type>`` on its own view; write the manifest; load them."""
        out = Path(context.output_dir)
        units = fit_units(self.name, split)
        for unit in units:
            unit_context = replace(context, output_dir=out / unit.subdir, resume_from=None)
            self.method_class(self.settings).fit(*unit_view(data, split, unit), unit_context)
        write_units_manifest(out, self.name, data.name, self.settings, units)
        self.load(out)
        return out

    def load(self, artifacts: Path) -> None:
        """Load every unit listed in the artifacts' ``generator.json``."""
        manifest, self.settings = read_artifact_manifest(artifacts, self)
        listed: dict[str, str] = manifest.get("units") or {}
        if not listed:
            msg = f"{artifacts}: {self.name} fits per defect type, but its artifacts list no units"
            raise ValueError(msg)
        units: dict[str, Generator] = {}
        for kind, subdir in sorted(listed.items()):
            unit = self.method_class(self.settings)
            unit.load(Path(artifacts) / subdir)
            units[kind] = unit
        self.units = units

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order, each from its defect type's unit (normals from the first unit)."""
        if not self.units:
            msg = f"{self.name}: call fit() or load() before generate()"
            raise RuntimeError(msg)
        first = next(iter(self.units))
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(batch):
            kind = first if request.label == 0 else request.defect_type
            if kind not in self.units:
                msg = f"{self.name}: no fit for defect type {request.defect_type!r}; fitted: {sorted(self.units)}"
                raise ValueError(msg)
            groups.setdefault(kind, []).append(index)
        samples: dict[int, Sample] = {}
        for kind, indices in groups.items():
            generated = self.units[kind].generate([batch[i] for i in indices])
            samples.update(zip(indices, generated, strict=True))
        return [samples[i] for i in range(len(batch))]


def product_generator(method: str, settings: Mapping[str, Any] | None = None) -> Generator:
    """The generator of one product's model: the method's own, or a ``UnitGenerator`` when it fits per type."""
    if generator_class(method).fit_unit == "product":
        return build_generator(method, settings)
    return UnitGenerator(method, settings)
