"""Verifying a dataset: re-read every shard in full and check it against ``manifest.parquet``.

``verify_dataset`` streams each complete shard (``shards/*.tar``) through the dataset's pyarrow
filesystem, so local paths and ``s3://`` URIs are checked the same way, and reports:

- **missing** samples: rows of the manifest found in no readable shard. The samples of a shard that
  cannot be read to the end count as missing (unless found intact in another shard);
- **extra** samples: in a shard, not in the manifest;
- **corrupt samples**: a member whose sha256 differs from the ``digests`` of its ``<key>.json``, a
  PNG that does not decode, an image that is not HxWx3 uint8, a mask (or conditioning mask) that is
  not single-channel 8-bit with only the values 0 and 255 or is not sized like the image, a
  ``mask_area`` that disagrees with the mask, JSON that does not parse or does not validate as
  ``SampleMetadata``, a missing required member (``png``, ``mask.png``, ``json``), a key found twice,
  and a manifest row whose ``shard`` (or product, defect type, label) differs from the sample's;
- **corrupt shards**: unreadable or truncated tars (a tar must end with its end-of-archive blocks,
  so a file cut at a member boundary is caught too), unsafe or non-file members;
- **dataset** problems: a missing or unreadable ``manifest.parquet`` or ``dataset.json``, duplicate
  manifest keys, and a card whose sample count or content digest disagrees with what was read.

Example:
    >>> report = verify_dataset("runs/demo/datasets/perlin")  # doctest: +SKIP
    >>> print(report.format())  # doctest: +SKIP
    >>> report.ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from pydantic import ValidationError
from tqdm import tqdm

from defectsynth.storage.errors import DatasetError, ShardError
from defectsynth.storage.fs import Location, resolve
from defectsynth.storage.manifest import CARD, MANIFEST, content_digest, read_card, read_manifest
from defectsynth.storage.sample import (
    COND,
    IMAGE,
    MASK,
    META,
    DecodedMembers,
    SampleMetadata,
    decode_members,
    member_digest,
)
from defectsynth.storage.shard_index import SHARDS_DIR, IndexedSample, complete_shards
from defectsynth.storage.shard_reader import ShardSample, read_shard
from defectsynth.storage.shard_writer import PARTIAL

logger = logging.getLogger(__name__)

REQUIRED = (IMAGE, MASK, META)
MISSING, EXTRA, DATASET = "missing", "extra", "dataset"
CORRUPT_SAMPLE, CORRUPT_SHARD = "corrupt sample", "corrupt shard"
_COMPARED = ("product", "defect_type", "label")  # manifest columns checked against the sample's json


@dataclass(frozen=True)
class Problem:
    """One finding: its kind, the shard and key it concerns (where there is one) and why."""

    kind: str
    reason: str
    shard: str | None = None
    key: str | None = None

    def cells(self) -> list[str]:
        """kind, shard, key and reason as table cells ('-' where there is none)."""
        return [self.kind, self.shard or "-", self.key or "-", self.reason]


@dataclass
class VerifyReport:
    """What ``verify_dataset`` found; ``ok`` when every list of problems is empty."""

    uri: str
    shards: int = 0  # complete shards found
    samples: int = 0  # samples read from shards that could be read to the end
    manifest_rows: int | None = None  # None when the manifest is missing or unreadable
    missing: list[Problem] = field(default_factory=list)
    extra: list[Problem] = field(default_factory=list)
    corrupt_samples: list[Problem] = field(default_factory=list)
    corrupt_shards: list[Problem] = field(default_factory=list)
    dataset: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless findings, e.g. partial shards of a crashed run

    @property
    def problems(self) -> list[Problem]:
        """Every problem: dataset, corrupt shards, corrupt samples, missing, extra."""
        return [*self.dataset, *self.corrupt_shards, *self.corrupt_samples, *self.missing, *self.extra]

    @property
    def ok(self) -> bool:
        """True when nothing is missing, extra or corrupt."""
        return not self.problems

    @property
    def counts(self) -> dict[str, int]:
        """Shards, samples and manifest rows seen, and the number of problems of each kind."""
        return {
            "shards": self.shards,
            "samples": self.samples,
            "manifest_rows": self.manifest_rows or 0,
            MISSING: len(self.missing),
            EXTRA: len(self.extra),
            CORRUPT_SAMPLE: len(self.corrupt_samples),
            CORRUPT_SHARD: len(self.corrupt_shards),
            DATASET: len(self.dataset),
        }

    def format(self, limit: int = 50) -> str:
        """The report for the terminal: a head line, the verdict, then up to ``limit`` problems per kind."""
        manifest = "unreadable" if self.manifest_rows is None else f"{self.manifest_rows} row(s)"
        head = f"dataset {self.uri}: {self.shards} complete shard(s), {self.samples} sample(s) read"
        head += f", manifest {manifest}"
        lines = [head]
        lines += [f"note: {note}" for note in self.notes]
        if self.ok:
            lines.append("OK: every manifest row is in a readable shard, intact, and the shards hold nothing else")
            return "\n".join(lines)
        counts = self.counts
        kinds = (DATASET, CORRUPT_SHARD, CORRUPT_SAMPLE, MISSING, EXTRA)
        lines.append("PROBLEMS: " + ", ".join(f"{counts[kind]} {kind}" for kind in kinds))
        rows: list[list[str]] = [["kind", "shard", "key", "reason"]]
        for group in (self.dataset, self.corrupt_shards, self.corrupt_samples, self.missing, self.extra):
            rows += [problem.cells() for problem in group[:limit]]
            if len(group) > limit:
                rows.append([group[0].kind, "...", "...", f"and {len(group) - limit} more"])
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines += ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[3]]) for row in rows]
        return "\n".join(lines)


def require_dataset(location: Location) -> None:
    """Raise ValueError unless ``location`` is a directory holding shards/, a manifest or a card."""
    info = location.fs.get_file_info(location.base)
    if info.type == pafs.FileType.NotFound:
        msg = f"{location.uri}: no such dataset directory"
        raise ValueError(msg)
    if info.type != pafs.FileType.Directory:
        msg = f"{location.uri}: not a directory (a dataset is a directory holding {SHARDS_DIR}/, {MANIFEST}, {CARD})"
        raise ValueError(msg)
    if not any(location.exists(location.path(name)) for name in (SHARDS_DIR, MANIFEST, CARD)):
        msg = f"{location.uri}: not a dataset (no {SHARDS_DIR}/, {MANIFEST} or {CARD} in it)"
        raise ValueError(msg)


def _check_metadata(sample: ShardSample, decoded: DecodedMembers, reasons: list[str]) -> dict[str, Any] | None:
    if META in decoded.errors:
        reasons.append(f"json: invalid JSON ({decoded.errors[META]})")
        return None
    if META not in sample.members:
        return None
    meta = decoded.metadata
    try:
        SampleMetadata.model_validate(meta)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        reasons.append(f"json: invalid metadata ({where}: {first['msg']})")
        return meta if isinstance(meta, dict) else None
    if meta["key"] != sample.key:
        reasons.append(f"json: key {meta['key']!r} differs from the member name")
    return meta


def _check_digests(sample: ShardSample, meta: dict[str, Any], reasons: list[str]) -> None:
    digests = meta.get("digests") or {}
    for extension, data in sample.members.items():
        if extension == META:
            continue
        expected = digests.get(extension)
        if expected is None:
            reasons.append(f"{extension}: member has no digest in the json")
        elif member_digest(data) != expected:
            reasons.append(f"{extension}: sha256 differs from the json digest")
    for extension in sorted(set(digests) - set(sample.members) - set(REQUIRED)):
        reasons.append(f"missing member {sample.key}.{extension} (listed in the json digests)")


def _check_mask(name: str, mask: np.ndarray, image: np.ndarray | None, reasons: list[str]) -> None:
    if mask.ndim != 2 or mask.dtype != np.uint8:
        reasons.append(f"{name}: must be single-channel 8-bit, got shape {mask.shape} {mask.dtype}")
        return
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 255}:
        shown = ", ".join(str(v) for v in values[:6])
        reasons.append(f"{name}: values other than 0 and 255 ({shown}{'...' if values.size > 6 else ''})")
    if image is not None and image.ndim == 3 and mask.shape != image.shape[:2]:
        reasons.append(
            f"{name}: size {mask.shape[1]}x{mask.shape[0]} differs from the image's {image.shape[1]}x{image.shape[0]}"
        )


def _decode_problem(decoded: DecodedMembers, extension: str) -> list[str]:
    err = decoded.errors.get(extension)
    return [] if err is None else [f"{extension}: does not decode as PNG ({type(err).__name__}: {err})"]


def check_sample(sample: ShardSample) -> tuple[list[str], dict[str, Any] | None]:
    """Every problem of one sample's members, and its parsed metadata (None when unreadable)."""
    reasons = list(sample.problems)
    reasons += [f"missing member {sample.key}.{ext}" for ext in REQUIRED if ext not in sample.members]
    decoded = decode_members(sample.members)
    meta = _check_metadata(sample, decoded, reasons)
    if meta is not None:
        _check_digests(sample, meta, reasons)
    image = decoded.image
    reasons += _decode_problem(decoded, IMAGE)
    if image is not None and (image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8):
        reasons.append(f"png: image must be HxWx3 uint8 RGB, got shape {image.shape} {image.dtype}")
    for extension, mask in ((MASK, decoded.mask), (COND, decoded.cond_mask)):
        reasons += _decode_problem(decoded, extension)
        if mask is None:
            continue
        _check_mask(extension, mask, image, reasons)
        area = meta.get("mask_area") if meta and extension == MASK else None
        if isinstance(area, int) and mask.ndim == 2 and area != int((mask == 255).sum()):
            reasons.append(f"json: mask_area {area} differs from the mask's {int((mask == 255).sum())} pixels")
    return reasons, meta


@dataclass
class _Found:
    shard: str
    meta: dict[str, Any] | None
    reasons: list[str]


def _verify_shard(location: Location, path: str, report: VerifyReport, found: dict[str, _Found]) -> dict[str, str]:
    """Check one shard; returns key -> shard of the samples lost to it when it cannot be read to the end."""
    shard = posixpath.basename(path)
    read: list[tuple[str, _Found]] = []
    bad_members: list[str] = []
    try:
        for sample in read_shard(location, path, on_bad_member=bad_members.append):
            reasons, meta = check_sample(sample)
            read.append((sample.key, _Found(shard, meta, reasons)))
    except ShardError as err:
        report.corrupt_shards.append(Problem(CORRUPT_SHARD, err.problem, shard=shard))
        return {key: shard for key, _ in read}
    for problem in bad_members:
        report.corrupt_shards.append(Problem(CORRUPT_SHARD, problem, shard=shard))
    for key, sample in read:
        if key in found:
            where = "twice in this shard" if found[key].shard == shard else f"also in {found[key].shard}"
            report.corrupt_samples.append(Problem(CORRUPT_SAMPLE, f"key found {where}", shard=shard, key=key))
            continue
        found[key] = sample
    report.samples += len(read)
    return {}


def _manifest_rows(location: Location, report: VerifyReport) -> dict[str, dict[str, Any]] | None:
    try:
        table = read_manifest(location)
    except DatasetError as err:
        report.dataset.append(Problem(DATASET, err.problem))
        return None
    columns = [name for name in ("key", "shard", *_COMPARED) if name in table.column_names]
    rows: dict[str, dict[str, Any]] = {}
    for row in table.select(columns).to_pylist():
        if row["key"] in rows:
            report.dataset.append(Problem(DATASET, f"{MANIFEST} lists the key twice", key=row["key"]))
        rows[row["key"]] = row
    report.manifest_rows = table.num_rows
    return rows


def _compare_row(row: dict[str, Any], sample: _Found) -> None:
    if row["shard"] != sample.shard:
        sample.reasons.append(f"manifest row names shard {row['shard']!r}, the sample is in {sample.shard!r}")
    for name in _COMPARED:
        if sample.meta is not None and name in row and row[name] != sample.meta.get(name):
            sample.reasons.append(f"manifest {name} {row[name]!r} differs from the json's {sample.meta.get(name)!r}")


def _compare(
    rows: dict[str, dict[str, Any]], found: dict[str, _Found], lost: dict[str, str], report: VerifyReport
) -> None:
    corrupt = {p.shard for p in report.corrupt_shards}
    for key, row in rows.items():
        if key in found:
            _compare_row(row, found[key])
        elif key in lost or row["shard"] in corrupt:
            reason = "its shard cannot be read to the end"
            report.missing.append(Problem(MISSING, reason, shard=lost.get(key, row["shard"]), key=key))
        else:
            reason = "in the manifest, in no complete shard"
            report.missing.append(Problem(MISSING, reason, shard=row["shard"], key=key))
    for key in sorted(set(found) - set(rows), key=lambda k: (found[k].shard, k)):
        report.extra.append(Problem(EXTRA, f"in the shard, not in {MANIFEST}", shard=found[key].shard, key=key))


def _check_card(location: Location, found: dict[str, _Found], report: VerifyReport) -> None:
    try:
        card = read_card(location)
    except DatasetError as err:
        report.dataset.append(Problem(DATASET, err.problem))
        return
    if report.manifest_rows is not None and card.get("samples") != report.manifest_rows:
        reason = f"{CARD} says {card.get('samples')} sample(s), {MANIFEST} has {report.manifest_rows} row(s)"
        report.dataset.append(Problem(DATASET, reason))
    if report.corrupt_shards:
        return  # the digest of what could be read differs anyway; the corrupt shards are the finding
    samples = [
        IndexedSample(key, s.shard, metadata={"digests": (s.meta or {}).get("digests", {})}) for key, s in found.items()
    ]
    if card.get("digest") != content_digest(samples):
        reason = f"{CARD} digest differs from the content of the readable shards (stale card or changed samples)"
        report.dataset.append(Problem(DATASET, reason))


def _note_stray_files(location: Location, report: VerifyReport) -> None:
    shards_dir = location.path(SHARDS_DIR)
    if not location.exists(shards_dir):
        report.dataset.append(Problem(DATASET, f"{SHARDS_DIR}/ directory is missing"))
        return
    for path in location.list_files(shards_dir):
        name = posixpath.basename(path)
        if name.endswith(PARTIAL):
            report.notes.append(f"{SHARDS_DIR}/{name}: incomplete shard of an interrupted write (ignored)")
        elif not name.endswith(".tar"):
            report.notes.append(f"{SHARDS_DIR}/{name}: not a shard (ignored)")


def verify_dataset(
    uri: str | Path, filesystem: pafs.FileSystem | None = None, *, progress: bool = False
) -> VerifyReport:
    """Re-read every shard of a dataset in full and check it against its manifest and card.

    Args:
        uri: The dataset directory: a local path or a pyarrow URI (``s3://bucket/prefix``).
        filesystem: A pyarrow filesystem to read ``uri`` on, instead of resolving it.
        progress: Show a progress bar over the shards.

    Returns:
        The report; see the module docstring for what each kind of problem means.

    Raises:
        ValueError: ``uri`` does not exist, is not a directory or holds no dataset at all.
    """
    location = resolve(uri, filesystem)
    require_dataset(location)
    report = VerifyReport(uri=location.uri)
    rows = _manifest_rows(location, report)
    _note_stray_files(location, report)
    found: dict[str, _Found] = {}
    lost: dict[str, str] = {}
    paths = complete_shards(location)
    report.shards = len(paths)
    for path in tqdm(paths, desc="verifying shards", unit="shard", disable=not progress):
        for key, shard in _verify_shard(location, path, report, found).items():
            lost.setdefault(key, shard)
    lost = {key: shard for key, shard in lost.items() if key not in found}
    if rows is not None:
        _compare(rows, found, lost, report)
    for key, sample in sorted(found.items(), key=lambda item: (item[1].shard, item[0])):
        if sample.reasons:
            report.corrupt_samples.append(Problem(CORRUPT_SAMPLE, "; ".join(sample.reasons), sample.shard, key))
    _check_card(location, found, report)
    logger.info("verified %s: %s", location.uri, "ok" if report.ok else f"{len(report.problems)} problem(s)")
    return report
