"""Tiny dataset trees in each layout, written by tests (a few 16x16 images each)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16


def write_image(path: Path, seed: int = 0, size: int = SIZE, suffix_format: str | None = None) -> Path:
    """A small random RGB image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=suffix_format)
    return path


def write_mask(path: Path, box: tuple[int, int, int, int] = (4, 4, 9, 9), size: int = SIZE, value: int = 255) -> Path:
    """A binary mask with one filled box (x0, y0, x1, y1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    Image.fromarray(mask).save(path)
    return path


def make_mvtec(
    root: Path,
    product: str = "widget",
    types: dict[str, int] | None = None,
    normals: int = 6,
    test_normals: int = 3,
    foreground: bool = False,
) -> Path:
    """``root/product`` in MVTec AD layout; ``types`` maps defect type to image count."""
    types = types if types is not None else {"crack": 4, "hole": 3}
    base = root / product
    paths = [write_image(base / "train/good" / f"{i:03d}.png", i) for i in range(normals)]
    paths += [write_image(base / "test/good" / f"{i:03d}.png", 100 + i) for i in range(test_normals)]
    for t, (name, count) in enumerate(types.items()):
        for i in range(count):
            paths.append(write_image(base / "test" / name / f"{i:03d}.png", 200 + 10 * t + i))
            write_mask(base / "ground_truth" / name / f"{i:03d}_mask.png")
    if foreground:
        for path in paths:
            write_mask(base / "foreground" / path.relative_to(base), box=(1, 1, 15, 15))
    return base


def make_loco(root: Path, product: str = "box") -> Path:
    """``root/product`` in MVTec LOCO layout, two mask files per defect image."""
    base = root / product
    for i in range(4):
        write_image(base / "train/good" / f"{i:03d}.png", i)
    for i in range(2):
        write_image(base / "validation/good" / f"{i:03d}.png", 50 + i)
        write_image(base / "test/good" / f"{i:03d}.png", 60 + i)
    for name in ("logical_anomalies", "structural_anomalies"):
        for i in range(3):
            write_image(base / "test" / name / f"{i:03d}.png", 70 + i)
            write_mask(base / "ground_truth" / name / f"{i:03d}" / "000.png", box=(0, 0, 4, 4), value=254)
            write_mask(base / "ground_truth" / name / f"{i:03d}" / "001.png", box=(10, 10, 14, 14), value=253)
    return base


def make_visa(root: Path, product: str = "candle", anomalies: int = 4, annotate: bool = True) -> Path:
    """A VisA root: split_csv/1cls.csv, Data/Images/{Normal,Anomaly}, label-valued masks."""
    rows = []
    for i in range(5):
        rel = f"{product}/Data/Images/Normal/{i:04d}.JPG"
        write_image(root / rel, i, suffix_format="JPEG")
        rows.append([product, "train" if i < 3 else "test", "normal", rel, ""])
    anno = []
    for i in range(anomalies):
        rel = f"{product}/Data/Images/Anomaly/{i:03d}.JPG"
        mask_rel = f"{product}/Data/Masks/Anomaly/{i:03d}.png"
        write_image(root / rel, 10 + i, suffix_format="JPEG")
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[2:5, 2:5] = 1
        mask[9:12, 9:12] = 2  # VisA masks carry region labels
        (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / mask_rel)
        rows.append([product, "test", "anomaly", rel, mask_rel])
        anno.append([rel, "chunk of wax missing" if i % 2 else "weird candle wick", mask_rel])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv/1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["object", "split", "label", "image", "mask"], *rows])
    if annotate:
        with (root / product / "image_anno.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["image", "label", "mask"], *anno])
    return root


def make_folder(root: Path, product: str = "plate") -> Path:
    """``root/product`` in the folder layout: good/, one dir per type, masks/<type>/<stem>_mask.png."""
    base = root / product
    for i in range(6):
        write_image(base / "good" / f"{i}.png", i)
    for name in ("dent", "stain"):
        for i in (1, 2, 10):
            write_image(base / name / f"{i}.png", 30 + i)
            write_mask(base / "masks" / name / f"{i}_mask.png")
    return base
