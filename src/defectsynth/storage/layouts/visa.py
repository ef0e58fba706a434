"""VisA layout: a split CSV over ``<product>/Data/Images/{Normal,Anomaly}`` and ``Data/Masks/Anomaly``.

The split CSV (default ``split_csv/1cls.csv``) has the columns ``object,split,label,image,mask`` with
paths relative to the root; ``label`` is ``normal`` or ``anomaly``. Defect types come from the
product's ``image_anno.csv`` (columns ``image,label``) when present, else every anomaly is of type
``anomaly``. VisA masks carry region labels, so any non-zero pixel marks the defect.
``convert_to_mvtec`` writes the MVTec-style tree (binary 0/255 masks, one directory per type).
"""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.imageio import read_mask
from defectsynth.storage.layouts.common import foreground_path, inside_root, require_file
from defectsynth.storage.records import NORMAL, ImageRecord, ProductData

DEFAULT_SPLIT_CSV = "split_csv/1cls.csv"
SPLIT_COLUMNS = ("object", "split", "label", "image", "mask")
UNTYPED = "anomaly"


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV with their line numbers; missing columns are an error naming the file."""
    require_file(path, "CSV file is missing")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(path, f"missing column(s) {missing}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            yield line, {k: (v or "").strip() for k, v in row.items() if k is not None}


def type_name(label: str) -> str:
    """A directory-safe defect type from a VisA annotation ("chunk of wax missing" -> chunk_of_wax_missing).

    Several labels on one image ("a,b") become one combined type "a+b", sorted.
    """
    parts = sorted(re.sub(r"[^0-9a-z]+", "_", p.strip().lower()).strip("_") for p in label.split(","))
    return "+".join(p for p in parts if p) or UNTYPED


def _defect_types(root: Path, product: str) -> dict[str, str]:
    """Image path (relative to the root) -> defect type, from ``image_anno.csv`` when it exists."""
    anno = root / product / "image_anno.csv"
    if not anno.is_file():
        return {}
    return {
        row["image"]: type_name(row["label"])
        for _, row in _rows(anno, ("image", "label"))
        if row["label"].lower() != "normal"
    }


def _split_csv_path(root: Path, split_csv: str) -> Path:
    return inside_root(root, split_csv, root, "the split CSV (data.visa_split_csv)")


def list_products(root: Path, split_csv: str = DEFAULT_SPLIT_CSV) -> list[str]:
    """Products named in the split CSV, sorted."""
    return sorted({row["object"] for _, row in _rows(_split_csv_path(root, split_csv), SPLIT_COLUMNS)})


def read_product(root: Path, product: str, split_csv: str = DEFAULT_SPLIT_CSV) -> ProductData:
    """Read one VisA product through the split CSV."""
    csv_path = _split_csv_path(root, split_csv)
    types = _defect_types(root, product)
    normals: list[ImageRecord] = []
    test_normals: list[ImageRecord] = []
    defects: list[ImageRecord] = []
    for line, row in _rows(csv_path, SPLIT_COLUMNS):
        if row["object"] != product:
            continue
        where = f"{csv_path}:{line}"
        if row["split"] not in ("train", "test"):
            raise DatasetError(where, f"split must be train or test, got {row['split']!r}")
        image = require_file(inside_root(root, row["image"], where, "image"), f"image listed at {where} is missing")
        fg = foreground_path(root / product, image)
        if row["label"] == "normal":
            record = ImageRecord(
                product, f"{row['split']}/{NORMAL}/{image.stem}", image, NORMAL, row["split"], foreground_path=fg
            )
            (normals if row["split"] == "train" else test_normals).append(record)
        elif row["label"] == "anomaly":
            if not row["mask"]:
                raise DatasetError(where, f"anomaly {row['image']} has no mask in the split CSV")
            mask = require_file(inside_root(root, row["mask"], where, "mask"), f"mask listed at {where} is missing")
            defect_type = types.get(row["image"], UNTYPED)
            defects.append(
                ImageRecord(
                    product,
                    f"test/{defect_type}/{image.stem}",
                    image,
                    defect_type,
                    "test",
                    mask_paths=(mask,),
                    foreground_path=fg,
                    mask_is_label_map=True,
                )
            )
        else:
            raise DatasetError(where, f"label must be normal or anomaly, got {row['label']!r}")
    if not normals:
        raise DatasetError(csv_path, f"no training normal images for product {product!r}")
    if not defects:
        raise DatasetError(csv_path, f"no anomaly images for product {product!r}")
    return ProductData(
        product,
        root / product,
        "visa",
        tuple(normals),
        tuple(test_normals),
        tuple(defects),
        has_foreground=(root / product / "foreground").is_dir(),
    )


def convert_to_mvtec(product: ProductData, out: Path) -> Path:
    """Write one VisA product as an MVTec AD tree under ``out/<product>``; returns that directory.

    Images are copied byte for byte; masks are re-encoded as 0/255 PNGs named ``<stem>_mask.png``.
    """
    target = out / product.name
    if target.exists() and any(target.iterdir()):
        raise DatasetError(target, "output product directory exists and is not empty")
    for record in product.records():
        split = "train" if record.origin == "train" else "test"
        image_out = target / split / record.defect_type / f"{record.stem}{record.path.suffix}"
        image_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record.path, image_out)
        if record.label:
            mask = read_mask(record.mask_paths[0], labels_allowed=True)
            mask_out = target / "ground_truth" / record.defect_type / f"{record.stem}_mask.png"
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(mask_out)
    return target
