"""Exporting a shard dataset to plain image trees: anomalib's Folder layout and the MVTec AD layout.

Both exporters read the tars through the dataset's pyarrow filesystem (a local path or an ``s3://``
URI), pick samples from ``manifest.parquet`` (filters: ``products``, ``defect_types``, and
``qc_passed_only``, on by default), check each exported member against its sha256 in the sample's
JSON, and write the PNG bytes unchanged (masks are already single-channel 0/255 PNGs). The output is
a local directory; a product directory that exists and is not empty is refused. Each product is
written under a hidden staging directory and renamed into place once complete.

Files are numbered per product and defect type in sample-key order, zero-padded to at least three
digits (``000``, ``001``, ...; wider when there are 1000 or more). Within one directory every name has
the same width, so ``NNN.png`` and ``NNN_mask.png`` sort in the same order: anomalib pairs images and
masks by sorted position. ``<out>/<product>/keys.csv`` maps every exported file back to its sample
(columns ``file, mask, key, shard, defect_type, label``). Filters match the manifest's columns as they
are: a normal (label 0) sample passes ``defect_types`` only when its own defect type is listed.

anomalib Folder layout (``export_anomalib_folder``)::

    <out>/<product>/normal/NNN.png                      label-0 samples (generated normals), if any
    <out>/<product>/abnormal/<defect_type>/NNN.png      label-1 samples
    <out>/<product>/mask/<defect_type>/NNN_mask.png     their masks, 0/255
    <out>/<product>/keys.csv

Read it with anomalib's Folder datamodule (it lists ``abnormal_dir`` and ``mask_dir`` recursively,
sorts both and pairs them by position; the image stem must be part of the mask stem)::

    from anomalib.data import Folder

    datamodule = Folder(
        name="<product>",
        root="<out>/<product>",
        normal_dir="normal",  # or the absolute path of your real normal images when the export has none
        abnormal_dir="abnormal",  # or ["abnormal/crack", ...] for some defect types
        mask_dir="mask",  # or ["mask/crack", ...], in the same order
    )  # anomalib 1.x also takes task="segmentation"

MVTec AD layout (``export_mvtec``)::

    <out>/<product>/train/good/NNN.png                  label-0 samples, if any
    <out>/<product>/test/<defect_type>/NNN.png          label-1 samples
    <out>/<product>/ground_truth/<defect_type>/NNN_mask.png
    <out>/<product>/keys.csv

This is a test-side tree: ``defectsynth.storage.layouts.read_dataset(out, "mvtec")`` (and anomalib's
MVTecAD) need ``train/good``, which exists only when label-0 samples were exported; otherwise copy your
real normal images there. Its images and masks pass ``defectsynth.storage.imageio.load_item``.

Example:
    >>> result = export_mvtec("runs/demo/datasets/perlin", "exports/mvtec", products=["wood"])  # doctest: +SKIP
    >>> print(result.describe())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from defectsynth.storage.errors import ShardError
from defectsynth.storage.fs import Location, resolve
from defectsynth.storage.manifest import manifest_shard_paths, read_manifest
from defectsynth.storage.records import NORMAL
from defectsynth.storage.sample import IMAGE, MASK, META, member_digest
from defectsynth.storage.shard_reader import ShardSample, read_shard
from defectsynth.storage.verify import require_dataset

logger = logging.getLogger(__name__)

KEYS_CSV = "keys.csv"
MIN_DIGITS = 3

# (defect_type, label, number) -> (image path, mask path or None), relative to the product directory
Placer = Callable[[str, int, str], tuple[str, str | None]]


def place_anomalib_folder(defect_type: str, label: int, number: str) -> tuple[str, str | None]:
    """Where a sample goes in the anomalib Folder layout."""
    if label == 0:
        return f"normal/{number}.png", None
    return f"abnormal/{defect_type}/{number}.png", f"mask/{defect_type}/{number}_mask.png"


def place_mvtec(defect_type: str, label: int, number: str) -> tuple[str, str | None]:
    """Where a sample goes in the MVTec AD layout."""
    if label == 0:
        return f"train/{NORMAL}/{number}.png", None
    if defect_type == NORMAL:
        msg = f"an anomalous sample has defect type {NORMAL!r}, which MVTec AD reserves for normal images"
        raise ValueError(msg)
    return f"test/{defect_type}/{number}.png", f"ground_truth/{defect_type}/{number}_mask.png"


@dataclass(frozen=True)
class ExportedFile:
    """One selected sample and where it goes under its product directory."""

    key: str
    shard: str
    product: str
    defect_type: str
    label: int
    image: str
    mask: str | None


@dataclass
class ExportResult:
    """What an export wrote: the product directories and the file count per product and directory."""

    format: str
    out: Path
    products: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # product -> image directory -> files

    @property
    def samples(self) -> int:
        """Samples exported in all."""
        return sum(sum(c.values()) for c in self.counts.values())

    def describe(self) -> str:
        """A few lines for the terminal: where each product went and what it holds."""
        lines = [f"exported {self.samples} sample(s) to {self.out} ({self.format} layout)"]
        for product, path in self.products.items():
            held = ", ".join(f"{directory} {n}" for directory, n in sorted(self.counts[product].items()))
            lines.append(f"{product}: {path}  ({held}; {KEYS_CSV} maps files to sample keys)")
        return "\n".join(lines)


def _safe_name(name: Any, what: str) -> str:
    """A product or defect type used as a directory name: no separators, no dot names, no NUL."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\x00"):
        msg = f"{what} {name!r} cannot be used as a directory name"
        raise ValueError(msg)
    return name


def _check_filter(wanted: Sequence[str] | None, available: set[str], what: str) -> set[str] | None:
    if not wanted:
        return None
    unknown = sorted(set(wanted) - available)
    if unknown:
        msg = f"unknown {what}(s) {', '.join(unknown)}; the dataset has {', '.join(sorted(available)) or 'none'}"
        raise ValueError(msg)
    return set(wanted)


def select_rows(
    manifest: pa.Table,
    *,
    products: Sequence[str] | None = None,
    defect_types: Sequence[str] | None = None,
    qc_passed_only: bool = True,
) -> list[dict[str, Any]]:
    """Manifest rows that pass the filters, sorted by key; a row with no qc result counts as passed."""
    absent = [c for c in ("product", "defect_type", "label") if c not in manifest.column_names]
    if absent:
        msg = f"the manifest lacks the column(s) {', '.join(absent)}"
        raise ValueError(msg)
    columns = ["key", "shard", "product", "defect_type", "label"]
    columns += ["qc_passed"] if "qc_passed" in manifest.column_names else []
    rows = manifest.select(columns).to_pylist()
    keep_products = _check_filter(products, {r["product"] for r in rows}, "product")
    keep_types = _check_filter(defect_types, {r["defect_type"] for r in rows}, "defect type")
    selected = [
        row
        for row in rows
        if (keep_products is None or row["product"] in keep_products)
        and (keep_types is None or row["defect_type"] in keep_types)
        and (not qc_passed_only or row.get("qc_passed") is not False)
    ]
    return sorted(selected, key=lambda r: r["key"])


def plan_export(rows: list[dict[str, Any]], place: Placer) -> list[ExportedFile]:
    """Number the rows per product and defect type (normals: per product) in key order, then place them."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        product = _safe_name(row["product"], "product")
        label = row["label"]
        if label not in (0, 1):
            msg = f"sample {row['key']}: label {label!r} is neither 0 nor 1"
            raise ValueError(msg)
        defect_type = NORMAL if label == 0 else _safe_name(row["defect_type"], "defect type")
        groups[(product, label, defect_type)].append(row)
    planned: list[ExportedFile] = []
    for (product, label, defect_type), members in sorted(groups.items()):
        digits = max(MIN_DIGITS, len(str(len(members) - 1)))
        for index, row in enumerate(sorted(members, key=lambda r: r["key"])):
            image, mask = place(defect_type, label, f"{index:0{digits}d}")
            planned.append(ExportedFile(row["key"], row["shard"], product, row["defect_type"], label, image, mask))
    return planned


def _check_targets(out: Path, products: set[str]) -> None:
    for product in sorted(products):
        target = out / product
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            msg = f"{target}: output product directory is not empty; remove it or export elsewhere"
            raise ValueError(msg)


def _members(sample: ShardSample, file: ExportedFile) -> dict[str, bytes]:
    """The members to write, each checked against its digest in the sample's JSON."""
    needed = [IMAGE] + ([MASK] if file.mask else [])
    absent = [ext for ext in [*needed, META] if ext not in sample.members]
    if absent:
        raise ShardError(file.shard, f"sample {file.key} lacks {', '.join(absent)}; run `defectsynth shards verify`")
    digests = (sample.metadata() or {}).get("digests") or {}
    for ext in needed:
        if member_digest(sample.members[ext]) != digests.get(ext):
            problem = f"sample {file.key}: {ext} differs from its json digest; run `defectsynth shards verify`"
            raise ShardError(file.shard, problem)
    return {ext: sample.members[ext] for ext in needed}


def _write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _keys_csv(files: list[ExportedFile]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "mask", "key", "shard", "defect_type", "label"])
    for f in sorted(files, key=lambda f: f.image):
        writer.writerow([f.image, f.mask or "", f.key, f.shard, f.defect_type, f.label])
    return buffer.getvalue().encode()


def _copy_samples(location: Location, planned: list[ExportedFile], staging: dict[str, Path]) -> None:
    by_shard: dict[str, dict[str, ExportedFile]] = defaultdict(dict)
    for file in planned:
        by_shard[file.shard][file.key] = file
    paths = manifest_shard_paths(location, by_shard)
    for shard, files in sorted(by_shard.items()):
        written: set[str] = set()
        for sample in read_shard(location, paths[shard]):
            file = files.get(sample.key)
            if file is None:
                continue
            members = _members(sample, file)
            _write(staging[file.product], file.image, members[IMAGE])
            if file.mask:
                _write(staging[file.product], file.mask, members[MASK])
            written.add(sample.key)
        absent = sorted(set(files) - written)
        if absent:
            shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
            msg = f"{len(absent)} sample(s) of the manifest are not in it: {shown}; run `defectsynth shards verify`"
            raise ShardError(shard, msg)
        logger.debug("exported %d sample(s) from %s", len(written), shard)


def _export(
    uri: str | Path,
    out: str | Path,
    layout: str,
    place: Placer,
    *,
    products: Sequence[str] | None,
    defect_types: Sequence[str] | None,
    qc_passed_only: bool,
    filesystem: pafs.FileSystem | None,
) -> ExportResult:
    if "://" in str(out):
        msg = f"export output {out} must be a local directory"
        raise ValueError(msg)
    location = resolve(uri, filesystem)
    require_dataset(location)
    rows = select_rows(
        read_manifest(location), products=products, defect_types=defect_types, qc_passed_only=qc_passed_only
    )
    if not rows:
        msg = f"{location.uri}: no sample passes the filters (qc_passed_only={qc_passed_only})"
        raise ValueError(msg)
    planned = plan_export(rows, place)
    out = Path(out).expanduser().resolve()
    names = {f.product for f in planned}
    _check_targets(out, names)
    staging = {p: out / f".{p}.export-partial" for p in names}
    try:
        for path in staging.values():
            shutil.rmtree(path, ignore_errors=True)  # left by an interrupted export
            path.mkdir(parents=True)
        _copy_samples(location, planned, staging)
        result = ExportResult(format=layout, out=out)
        for product in sorted(names):
            files = [f for f in planned if f.product == product]
            (staging[product] / KEYS_CSV).write_bytes(_keys_csv(files))
            target = out / product
            if target.exists():
                target.rmdir()  # checked empty above
            staging[product].rename(target)
            result.products[product] = target
            result.counts[product] = dict(Counter(posixpath.dirname(f.image) for f in files))
            logger.info("exported %d sample(s) of %s to %s (%s)", len(files), product, target, layout)
    finally:
        for path in staging.values():
            shutil.rmtree(path, ignore_errors=True)
    return result


def export_anomalib_folder(
    uri: str | Path,
    out: str | Path,
    *,
    products: Sequence[str] | None = None,
    defect_types: Sequence[str] | None = None,
    qc_passed_only: bool = True,
    filesystem: pafs.FileSystem | None = None,
) -> ExportResult:
    """Export a shard dataset to the layout anomalib's Folder datamodule reads (see the module docstring).

    Args:
        uri: The dataset directory: a local path or a pyarrow URI (``s3://bucket/prefix``).
        out: The local output root; one directory per product is made under it.
        products: Export only these products (default: all).
        defect_types: Export only samples of these defect types (default: all).
        qc_passed_only: Leave out samples whose quality check failed.
        filesystem: A pyarrow filesystem to read ``uri`` on, instead of resolving it.

    Returns:
        Where each product went and how many files each directory holds.

    Raises:
        ValueError: A product directory under ``out`` is not empty, a filter names something unknown,
            nothing passes the filters, or a sample is missing or differs from its digest.
    """
    return _export(
        uri,
        out,
        "anomalib-folder",
        place_anomalib_folder,
        products=products,
        defect_types=defect_types,
        qc_passed_only=qc_passed_only,
        filesystem=filesystem,
    )


def export_mvtec(
    uri: str | Path,
    out: str | Path,
    *,
    products: Sequence[str] | None = None,
    defect_types: Sequence[str] | None = None,
    qc_passed_only: bool = True,
    filesystem: pafs.FileSystem | None = None,
) -> ExportResult:
    """Export a shard dataset to the MVTec AD layout (a test-side tree; see the module docstring).

    Args:
        uri: The dataset directory: a local path or a pyarrow URI (``s3://bucket/prefix``).
        out: The local output root; one directory per product is made under it.
        products: Export only these products (default: all).
        defect_types: Export only samples of these defect types (default: all).
        qc_passed_only: Leave out samples whose quality check failed.
        filesystem: A pyarrow filesystem to read ``uri`` on, instead of resolving it.

    Returns:
        Where each product went and how many files each directory holds.

    Raises:
        ValueError: A product directory under ``out`` is not empty, a filter names something unknown,
            nothing passes the filters, or a sample is missing or differs from its digest.
    """
    return _export(
        uri,
        out,
        "mvtec",
        place_mvtec,
        products=products,
        defect_types=defect_types,
        qc_passed_only=qc_passed_only,
        filesystem=filesystem,
    )


EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    "anomalib-folder": export_anomalib_folder,
    "mvtec": export_mvtec,
}
