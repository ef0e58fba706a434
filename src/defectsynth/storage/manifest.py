"""``manifest.parquet`` (one row per sample) and ``dataset.json`` (the dataset card).

Both are rebuilt from the complete shards themselves, so they always agree with what a reader
can stream, after a crash and a resume too. The content digest covers every sample's key and
member digests, not shard boundaries or times, so the same samples give the same digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from defectsynth.storage.errors import DatasetError, MissingFileError
from defectsynth.storage.fs import Location
from defectsynth.storage.keys import canonical_json
from defectsynth.storage.sample import COND, SCHEMA_VERSION
from defectsynth.storage.shard_index import SHARDS_DIR, IndexedSample, complete_shards

MANIFEST = "manifest.parquet"
CARD = "dataset.json"

BASE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("product", pa.string()),
        ("defect_type", pa.string()),
        ("label", pa.int8()),
        ("intensity", pa.float64()),
        ("strength", pa.float64()),
        ("mask_area", pa.int64()),
        ("qc_passed", pa.bool_()),
        ("has_cond", pa.bool_()),
        ("bbox", pa.list_(pa.int32())),
        ("method", pa.string()),
        ("model_uri", pa.string()),
        ("model_version", pa.string()),
        ("base_model", pa.string()),
        ("config_digest", pa.string()),
        ("seed", pa.int64()),
        ("sampler", pa.string()),
        ("steps", pa.int64()),
        ("source_image", pa.string()),
        ("created_at", pa.string()),
    ]
)
_NESTED = {"generator", "qc", "digests", "schema_version"}


def manifest_row(sample: IndexedSample) -> dict[str, Any]:
    """One manifest row: the base columns, then every extra scalar metadata field (others as JSON text)."""
    meta = sample.metadata or {}
    generator, qc = meta.get("generator") or {}, meta.get("qc") or {}
    row: dict[str, Any] = {
        "key": sample.key,
        "shard": sample.shard,
        "qc_passed": qc.get("passed"),
        "has_cond": COND in sample.extensions,
        **{
            name: generator.get(name)
            for name in ("method", "model_uri", "model_version", "base_model", "config_digest")
        },
    }
    for name in BASE_SCHEMA.names:
        row.setdefault(name, meta.get(name))
    for name, value in meta.items():
        if name not in row and name not in _NESTED:
            row[name] = value if value is None or isinstance(value, str | int | float | bool) else json.dumps(value)
    return row


def build_manifest(samples: list[IndexedSample]) -> pa.Table:
    """The manifest table, rows sorted by key; extra fields follow the base columns."""
    rows = sorted((manifest_row(s) for s in samples), key=lambda r: r["key"])
    extras = sorted({name for row in rows for name in row} - set(BASE_SCHEMA.names))
    columns = {name: [row.get(name) for row in rows] for name in BASE_SCHEMA.names}
    table = pa.table(columns, schema=BASE_SCHEMA)
    for name in extras:
        table = table.append_column(name, pa.array([row.get(name) for row in rows]))
    return table


def content_digest(samples: list[IndexedSample]) -> str:
    """sha256 over (key, member digests) of every sample, in key order."""
    entries = sorted((s.key, (s.metadata or {}).get("digests", {})) for s in samples)
    return hashlib.sha256(canonical_json(entries).encode()).hexdigest()


def build_card(
    samples: list[IndexedSample], *, config: Any = None, split: Any = None, rejections: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The dataset card: counts per product, type and label, rejections, shards, generators, config, split, digest.

    ``qc_rejected`` (and per product) adds the samples in the shards that failed their QC (datasets written
    before the quality gates) to the rejections the gates kept out (``rejections``, see ``storage.rejections``).
    """
    rejections = rejections or {"total": 0, "by_reason": {}, "by_type": {}, "by_type_and_reason": {}, "previewed": 0}
    labels: Counter[int] = Counter()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    shards: Counter[str] = Counter()
    generators: dict[str, dict[str, Any]] = {}
    rejected: Counter[str] = Counter()
    for sample in samples:
        meta = sample.metadata or {}
        counts[meta.get("product", "?")][meta.get("defect_type", "?")] += 1
        shards[sample.shard] += 1
        generator = meta.get("generator") or {}
        generators.setdefault(canonical_json(generator), generator)
        rejected[meta.get("product", "?")] += not (meta.get("qc") or {}).get("passed", True)
        labels[meta.get("label", 1)] += 1
    for product, types in rejections["by_type"].items():
        rejected[product] += sum(types.values())
    return {
        "schema_version": SCHEMA_VERSION,
        "samples": len(samples),
        "normals": labels[0],
        "anomalous": labels[1],
        "qc_rejected": sum(rejected.values()),
        "qc_rejected_by_product": dict(sorted(rejected.items())),
        "rejections": rejections,
        "counts": {p: dict(sorted(c.items())) for p, c in sorted(counts.items())},
        "shards": [{"name": name, "samples": n} for name, n in sorted(shards.items())],
        "generators": [generators[k] for k in sorted(generators)],
        "config": config,
        "split": split,
        "digest": content_digest(samples),
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_manifest_and_card(location: Location, samples: list[IndexedSample], card: dict[str, Any]) -> None:
    """Write both files atomically, the manifest first, so a card never describes a missing manifest."""
    buffer = io.BytesIO()
    pq.write_table(build_manifest(samples), buffer)
    location.write_atomically(location.path(MANIFEST), buffer.getvalue())
    location.write_atomically(location.path(CARD), json.dumps(card, indent=2, default=str).encode())


def read_manifest(location: Location, columns: Sequence[str] | None = None) -> pa.Table:
    """The manifest (only ``columns`` when given), or a DatasetError naming the file when it cannot serve.

    Raises:
        MissingFileError: There is no manifest (a ``FileNotFoundError`` too).
        DatasetError: It is unreadable, or lacks ``key``, ``shard`` or one of ``columns``.
    """
    path = location.path(MANIFEST)
    if not location.exists(path):
        raise MissingFileError(location.uri, f"{MANIFEST} is missing")
    try:
        with location.fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            absent = [
                name
                for name in dict.fromkeys(["key", "shard", *(columns or ())])
                if name not in parquet.schema_arrow.names
            ]
            if absent:
                raise DatasetError(location.uri, f"{MANIFEST} lacks the column(s) {', '.join(absent)}")
            return parquet.read(columns=None if columns is None else list(columns))
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(location.uri, f"{MANIFEST} is unreadable ({err})") from err


def manifest_shard_paths(location: Location, names: Iterable[str]) -> dict[str, str]:
    """``name -> path`` of the shards a manifest names, each a complete shard under ``shards/``.

    Streaming and export open only these paths, so a manifest row can never send a reader to a
    partial shard or outside the dataset.

    Raises:
        DatasetError: Naming the manifest and every named shard that is not complete under ``shards/``.
    """
    complete = {posixpath.basename(path): path for path in complete_shards(location)}
    wanted = set(names)
    missing = sorted((name for name in wanted if name not in complete), key=str)
    if missing:
        raise DatasetError(location.uri, f"{MANIFEST} names shard(s) not complete under {SHARDS_DIR}/: {missing}")
    return {name: complete[name] for name in wanted}


def read_card(location: Location) -> dict[str, Any]:
    """The dataset card, or a DatasetError naming the file when it is missing or not a JSON object."""
    path = location.path(CARD)
    if not location.exists(path):
        raise MissingFileError(location.uri, f"{CARD} is missing")
    try:
        card = json.loads(location.read_bytes(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(location.uri, f"{CARD} is unreadable ({err})") from err
    if not isinstance(card, dict):
        raise DatasetError(location.uri, f"{CARD} is not a JSON object")
    return card
