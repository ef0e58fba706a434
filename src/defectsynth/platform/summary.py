"""Plain-text summaries for the terminal: ``data inspect`` (datasets, splits) and ``shards inspect``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from defectsynth.core.text_table import table
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import SplitManifest


def product_summary(product: ProductData, manifest: SplitManifest) -> str:
    """Counts of one product per defect type, and how the split divides them."""
    split = manifest.products[product.name]
    fg = ", foreground masks" if product.has_foreground else ""
    lines = [f"{product.name}  ({product.layout}, {product.root}{fg})"]
    rows = [
        [
            "good",
            str(len(product.normals) + len(product.test_normals)),
            f"{len(split.train_normals)} train + {len(split.val_normals)} val",
            str(len(split.test_normals)),
        ]
    ]
    for defect_type in product.defect_types:
        train = split.generator_train[defect_type]
        rows.append(
            [
                defect_type,
                str(len(product.defects_of(defect_type))),
                f"{len(train)}: {', '.join(i.rsplit('/', 1)[-1] for i in train)}",
                str(len(split.test_defects[defect_type])),
            ]
        )
    lines.append(table(["type", "images", "generator train (ids)", "test"], rows))
    return "\n".join(lines)


def dataset_summary(products: list[ProductData], manifest: SplitManifest) -> str:
    """The summary of every product, headed by the split protocol and the manifest digest."""
    settings = manifest.settings
    protocol = settings.protocol + (
        f" (k={settings.k})" if settings.k else f" (fold {settings.fold})" if settings.fold else ""
    )
    head = f"{len(products)} product(s); split protocol {protocol}, digest {manifest.digest()[:12]}"
    return "\n\n".join([head, *(product_summary(p, manifest) for p in products)])


MAX_SHARDS_LISTED = 12


def _number(value: float) -> str:
    return f"{value:.4g}"


def manifest_summary(manifest: pa.Table) -> str:
    """Labels, intensity range, mask_area quartiles of anomalous rows and qc rejections of a manifest."""
    rows = manifest.num_rows
    names = set(manifest.column_names)
    labels = manifest.column("label").to_pylist() if "label" in names else []
    anomalous = sum(1 for label in labels if label == 1)
    lines = [f"manifest: {rows} row(s), {anomalous} anomalous, {sum(1 for v in labels if v == 0)} normal"]
    intensity = [v for v in manifest.column("intensity").to_pylist() if v is not None] if "intensity" in names else []
    if intensity:
        span = f"{_number(min(intensity))} .. {_number(max(intensity))}"
        lines.append(f"  intensity: {span} ({len(intensity)} row(s) with a value)")
    else:
        lines.append("  intensity: none recorded")
    areas = []
    if "mask_area" in names:
        areas = [
            a
            for a, label in zip(manifest.column("mask_area").to_pylist(), labels, strict=False)
            if a is not None and label == 1
        ]
    if areas:
        q1, q2, q3 = np.percentile(np.asarray(areas, dtype=float), [25, 50, 75])
        lines.append(
            f"  mask_area (anomalous, pixels): min {min(areas)}, q1 {_number(q1)}, median {_number(q2)}, "
            f"q3 {_number(q3)}, max {max(areas)}"
        )
    if "qc_passed" in names:
        rejected = sum(1 for v in manifest.column("qc_passed").to_pylist() if v is False)
        lines.append(f"  qc rejected: {rejected} of {rows}")
    return "\n".join(lines)


def _shards_table(shards: list[dict[str, Any]]) -> str:
    rows = [[str(s.get("name")), str(s.get("samples"))] for s in shards[:MAX_SHARDS_LISTED]]
    text = table(["shard", "samples"], rows)
    if len(shards) > MAX_SHARDS_LISTED:
        text += f"\n... and {len(shards) - MAX_SHARDS_LISTED} more"
    return text


def _rejections_line(rejections: dict[str, Any]) -> str:
    """The quality gates' rejections by reason (kept out of the shards; a few previewed under rejected/)."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in (rejections.get("by_reason") or {}).items())
    return f"rejected by the quality gates: {rejections.get('total', 0)}" + (f" ({reasons})" if reasons else "")


def shards_summary(uri: str, card: dict[str, Any], manifest: pa.Table) -> str:
    """A shard dataset for the terminal: the card (counts, shards, generators, digest) and the manifest summary."""
    counts = card.get("counts") or {}
    count_rows = [[p, t, str(n)] for p, types in counts.items() for t, n in types.items()]
    shards = card.get("shards") or []
    generators = card.get("generators") or []
    generator_rows = [
        [str(g.get(k) or "-") for k in ("method", "model_uri", "model_version", "base_model", "config_digest")]
        for g in generators
    ]
    parts = [
        f"dataset {uri}\n"
        f"samples {card.get('samples')}, qc rejected {card.get('qc_rejected')}, {len(counts)} product(s), "
        f"{len(shards)} shard(s); schema version {card.get('schema_version')}\n"
        f"digest {card.get('digest')}\nupdated {card.get('updated_at')}",
        table(["product", "type", "samples"], count_rows),
        _rejections_line(card.get("rejections") or {}),
        _shards_table(shards),
        table(["method", "model_uri", "model_version", "base_model", "config_digest"], generator_rows),
        manifest_summary(manifest),
    ]
    return "\n\n".join(parts)
