"""A generated sample and its shard encoding (schema version 1 of ../shared/DESIGN.md).

A ``Sample`` is what a generator returns: the image, the refined mask, the conditioning mask
where there was one, and metadata. ``encode_sample`` turns it into tar members (PNG only, masks
single-channel 0/255, never JPEG) and fills the fields derived from the pixels: ``mask_area``,
``bbox`` and the sha256 ``digests`` of every member, which ``verify`` checks. ``decode_members``
is its inverse for readers (``verify`` and ``stream``), each checking the result its own way.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from defectsynth.storage.keys import check_key

SCHEMA_VERSION = 1
IMAGE, MASK, COND, META = "png", "mask.png", "cond.png", "json"
PNG_LEVEL = 1  # zlib level: 6 costs ~3x the time for ~10% smaller files; shards favour throughput


class GeneratorInfo(BaseModel):
    """Which model made a sample."""

    model_config = ConfigDict(extra="forbid")

    method: str
    model_uri: str | None = None
    model_version: str | None = None
    base_model: str | None = None
    config_digest: str | None = None


class QualityCheck(BaseModel):
    """Scores of the quality checks run on a sample and whether it passed them."""

    model_config = ConfigDict(extra="forbid")

    scores: dict[str, float] = Field(default_factory=dict)
    passed: bool = True


class SampleMetadata(BaseModel):
    """The ``<key>.json`` member. Method-specific fields are allowed and become manifest columns."""

    model_config = ConfigDict(extra="allow")

    schema_version: Literal[1] = SCHEMA_VERSION
    key: str
    product: str
    defect_type: str
    label: Literal[0, 1] = 1
    intensity: float | None = None  # the control value the generator used (CADiff's w, Perlin's opacity)
    strength: float | None = None  # the measured in-mask change
    mask_area: int | None = None  # filled by encode_sample
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (exclusive); filled by encode_sample
    generator: GeneratorInfo
    seed: int | None = None
    sampler: str | None = None
    steps: int | None = None
    source_image: str | None = None
    qc: QualityCheck = Field(default_factory=QualityCheck)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    digests: dict[str, str] = Field(default_factory=dict)  # member extension -> sha256; filled by encode_sample


@dataclass(frozen=True)
class Sample:
    """One generated image with its masks and metadata."""

    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW bool, the refined anomaly mask
    metadata: SampleMetadata
    cond_mask: np.ndarray | None = None  # HxW bool, the mask given to the generator

    @property
    def key(self) -> str:
        """The sample key, from the metadata."""
        return self.metadata.key


@dataclass(frozen=True)
class EncodedSample:
    """A sample as tar members (extension -> bytes), with its completed metadata."""

    key: str
    members: dict[str, bytes]
    metadata: SampleMetadata

    @cached_property
    def nbytes(self) -> int:
        """Bytes the sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
        return sum(512 + -(-len(data) // 512) * 512 for data in self.members.values())


def member_digest(data: bytes) -> str:
    """The sha256 of a member's bytes, as ``digests`` records it: written by ``encode_sample``, checked by readers."""
    return hashlib.sha256(data).hexdigest()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image, or of a bool mask as single-channel 0/255."""
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)
    elif array.dtype != np.uint8:
        msg = f"images must be uint8 and masks bool, got {array.dtype}"
        raise ValueError(msg)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to an array (HxWx3 uint8 for images, HxW uint8 for masks)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            msg = f"expected PNG data, got {image.format}"
            raise ValueError(msg)
        return np.asarray(image)


@dataclass(frozen=True)
class DecodedMembers:
    """A sample's members decoded; each is None when absent or undecodable (``errors`` says why, by extension)."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    cond_mask: np.ndarray | None = None
    metadata: Any = None
    errors: dict[str, Exception] = field(default_factory=dict)


def decode_members(members: Mapping[str, bytes]) -> DecodedMembers:
    """Decode a sample's PNG members with ``decode_png`` and its JSON member, collecting failures, never raising."""
    arrays: dict[str, np.ndarray] = {}
    errors: dict[str, Exception] = {}
    for extension in (IMAGE, MASK, COND):
        if extension in members:
            try:
                arrays[extension] = decode_png(members[extension])
            except Exception as err:  # noqa: BLE001 - any decoder failure on untrusted bytes is a finding, not a crash
                errors[extension] = err
    metadata = None
    if META in members:
        try:
            metadata = json.loads(members[META])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            errors[META] = err
    return DecodedMembers(arrays.get(IMAGE), arrays.get(MASK), arrays.get(COND), metadata, errors)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the mask's non-zero pixels, exclusive ends; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_shapes(sample: Sample) -> None:
    height, width = sample.image.shape[:2]
    if sample.image.ndim != 3 or sample.image.shape[2] != 3:
        msg = f"sample {sample.key}: image must be HxWx3 RGB, got shape {sample.image.shape}"
        raise ValueError(msg)
    for name, mask in (("mask", sample.mask), ("cond_mask", sample.cond_mask)):
        if mask is not None and (mask.shape != (height, width) or mask.dtype != bool):
            msg = f"sample {sample.key}: {name} must be a {height}x{width} bool array, got {mask.shape} {mask.dtype}"
            raise ValueError(msg)


def encode_sample(sample: Sample) -> EncodedSample:
    """PNG-encode a sample and complete its metadata (mask_area, bbox, member digests)."""
    key = check_key(sample.key)
    _check_shapes(sample)
    members = {IMAGE: encode_png(sample.image), MASK: encode_png(sample.mask)}
    if sample.cond_mask is not None:
        members[COND] = encode_png(sample.cond_mask)
    metadata = sample.metadata.model_copy(
        update={
            "mask_area": int(sample.mask.sum()),
            "bbox": mask_bbox(sample.mask),
            "digests": {ext: member_digest(data) for ext, data in members.items()},
        }
    )
    members[META] = metadata.model_dump_json().encode()
    return EncodedSample(key=key, members=members, metadata=metadata)
