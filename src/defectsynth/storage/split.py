"""The papers' few-shot split, computed once per product and kept as a manifest every job reads.

Protocols, per defect type with images sorted by id number:
- ``third`` (papers 000, 002, 004): the lowest-id ceil(n/3) images (at least one) train the generators;
- ``kshot``: the lowest-id k images train them (H = 1, 2 in paper 002);
- ``twofold`` (paper 001): fold 1 is the first ceil(n/2) images, fold 2 the rest; ``fold`` names the
  training fold, the other one is tested.
The other defect images plus the layout's ``test/good`` are the held-out test set (when a layout has no
test normals, ``test_normal_fraction`` of the normal pool is held out instead). Detector checkpoints are
chosen on a validation split from the training side only: ``val_fraction`` of the training normals plus
the generator-training defects, which detectors never train on in the default protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from defectsynth.storage.records import ImageRecord, ProductData

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class SplitSettings(BaseModel):
    """How to split: the protocol and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["third", "kshot", "twofold"] = "third"
    k: int | None = Field(None, ge=1, description="shots per defect type (kshot only)")
    fold: Literal[1, 2] | None = Field(None, description="the training fold (twofold only)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of training normals kept for validation")
    test_normal_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of normals held out when the layout has no test normals"
    )
    seed: int = Field(0, description="seeds which normals are carved out; defect splits are by id, not random")

    @model_validator(mode="after")
    def _parameters_match_protocol(self) -> SplitSettings:
        if (self.protocol == "kshot") != (self.k is not None):
            msg = "split.k is required for protocol kshot and only allowed there"
            raise ValueError(msg)
        if (self.protocol == "twofold") != (self.fold is not None):
            msg = "split.fold (1 or 2) is required for protocol twofold and only allowed there"
            raise ValueError(msg)
        return self


class ProductSplit(BaseModel):
    """Image ids of one product in each part of the split."""

    model_config = ConfigDict(extra="forbid")

    generator_train: dict[str, list[str]]  # defect type -> the real defects generators learn from
    test_defects: dict[str, list[str]]  # defect type -> held-out real defects
    train_normals: list[str]
    val_normals: list[str]
    test_normals: list[str]

    @property
    def validation(self) -> list[str]:
        """Checkpoint-selection images: carved normals plus the training-side defects."""
        return self.val_normals + [i for ids in self.generator_train.values() for i in ids]

    @property
    def test(self) -> list[str]:
        """Held-out test images: test normals plus held-out defects."""
        return self.test_normals + [i for ids in self.test_defects.values() for i in ids]


class SplitManifest(BaseModel):
    """The split of every product of a run, as written to ``split.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    settings: SplitSettings
    dataset_root: str
    layout: str
    products: dict[str, ProductSplit]

    def digest(self) -> str:
        """sha256 of the canonical JSON, to log beside every run that used this split."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def generator_train_count(n: int, settings: SplitSettings, where: str) -> int:
    """How many of a type's n images (sorted by id) train the generators."""
    if settings.protocol == "third":
        return max(1, math.ceil(n / 3))
    if settings.protocol == "kshot":
        assert settings.k is not None
        if settings.k >= n:
            msg = f"{where}: {n} image(s), too few for {settings.k}-shot with at least one left to test"
            raise ValueError(msg)
        return settings.k
    if n < 2:
        msg = f"{where}: {n} image, the two-fold split needs at least 2"
        raise ValueError(msg)
    return math.ceil(n / 2)


def split_defect_type(records: list[ImageRecord], settings: SplitSettings, where: str) -> tuple[list[str], list[str]]:
    """(generator-train ids, test ids) for the images of one defect type."""
    ordered = [r.image_id for r in sorted(records, key=lambda r: r.sort_key)]
    first = generator_train_count(len(ordered), settings, where)
    head, tail = ordered[:first], ordered[first:]
    if settings.protocol == "twofold" and settings.fold == 2:
        return tail, head
    if not tail:
        logger.warning("%s: a single image, used for training; nothing of this type is left to test", where)
    return head, tail


def carve(ids: list[str], fraction: float, *, seed: int, salt: str) -> tuple[list[str], list[str]]:
    """Split ids into (kept, carved) with ``round(fraction * n)`` carved, at least one when fraction > 0.

    Chosen by a seeded hash of each id, so the choice is stable when the list order changes.
    """
    if fraction <= 0 or not ids:
        return list(ids), []
    count = max(1, round(fraction * len(ids)))
    if count >= len(ids):
        msg = f"{salt}: {len(ids)} image(s), too few to carve {fraction:.0%} and keep one"
        raise ValueError(msg)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{salt}:{i}".encode()).hexdigest())
    carved = set(ranked[:count])
    return [i for i in ids if i not in carved], [i for i in ids if i in carved]


def split_product(product: ProductData, settings: SplitSettings) -> ProductSplit:
    """Split one product by the protocol in ``settings``."""
    generator_train: dict[str, list[str]] = {}
    test_defects: dict[str, list[str]] = {}
    for defect_type in product.defect_types:
        where = f"{product.name}/{defect_type}"
        generator_train[defect_type], test_defects[defect_type] = split_defect_type(
            product.defects_of(defect_type), settings, where
        )
    normals = [r.image_id for r in sorted(product.normals, key=lambda r: (r.origin, r.sort_key))]
    test_normals = [r.image_id for r in sorted(product.test_normals, key=lambda r: r.sort_key)]
    if not test_normals:
        normals, test_normals = carve(
            normals, settings.test_normal_fraction, seed=settings.seed, salt=f"{product.name}/test-normals"
        )
    train_normals, val_normals = carve(normals, settings.val_fraction, seed=settings.seed, salt=f"{product.name}/val")
    return ProductSplit(
        generator_train=generator_train,
        test_defects=test_defects,
        train_normals=train_normals,
        val_normals=val_normals,
        test_normals=test_normals,
    )


def make_split(products: list[ProductData], settings: SplitSettings) -> SplitManifest:
    """Split every product; they must share one dataset root and layout."""
    if not products:
        msg = "no products to split"
        raise ValueError(msg)
    return SplitManifest(
        settings=settings,
        dataset_root=str(products[0].root.parent),
        layout=products[0].layout,
        products={p.name: split_product(p, settings) for p in products},
    )


def load_split(path: Path) -> SplitManifest:
    """Read a split manifest; a malformed file is an error naming it."""
    try:
        return SplitManifest.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        msg = f"{path}: not a readable split manifest ({err})"
        raise ValueError(msg) from err


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_split(path: Path, products: list[ProductData], settings: SplitSettings) -> SplitManifest:
    """Return the split stored at ``path``, adding products it lacks; write it if it does not exist.

    A stored product whose split no longer matches (other settings, or images added or removed since)
    is an error: a split is written once and never silently changed.
    """
    path = Path(path)
    if not path.exists():
        fresh = make_split(products, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, fresh.model_dump_json(indent=2))
        logger.info("wrote split manifest %s (%s)", path, fresh.digest()[:12])
        return fresh
    stored = load_split(path)
    layout = products[0].layout if products else stored.layout
    if stored.settings != settings or stored.layout != layout:
        msg = (
            f"{path}: written with split settings {stored.settings.model_dump()} on layout {stored.layout!r}, "
            f"asked for {settings.model_dump()} on {layout!r}; delete it or use another workdir"
        )
        raise ValueError(msg)
    fresh = make_split(products, settings)
    for name, split in fresh.products.items():
        if name in stored.products and stored.products[name] != split:
            msg = f"{path}: the images of product {name!r} changed since this split was written; use a new workdir"
            raise ValueError(msg)
    added = sorted(set(fresh.products) - set(stored.products))
    if added:
        stored.products.update({name: fresh.products[name] for name in added})
        _write_atomically(path, stored.model_dump_json(indent=2))
        logger.info("added product(s) %s to split manifest %s", added, path)
    return stored
