"""A contact sheet PNG: per product, a normal and a few defects with their masks tinted red beneath."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

GOOD = "good"
LABEL_HEIGHT = 14
GAP = 4
MIN_TILE = 128
BACKDROP = (24, 24, 24)


def _product_dirs(root: Path) -> list[Path]:
    """Visible product directories of an MVTec tree (those with a ``test/`` directory), sorted."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "test").is_dir())


def _pngs(directory: Path) -> list[Path]:
    """Visible PNG files of a directory in name order (none if it is missing)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".png" and not p.name.startswith("."))


def _pick(product_dir: Path, count: int) -> list[tuple[str, Path]]:
    """Up to ``count`` (defect type, image) pairs, taken round-robin over the defect types."""
    test = product_dir / "test"
    pools = {d.name: _pngs(d) for d in sorted(test.iterdir()) if d.is_dir() and d.name != GOOD}
    picked: list[tuple[str, Path]] = []
    for rank in range(max((len(files) for files in pools.values()), default=0)):
        for defect_type, files in pools.items():
            if rank < len(files) and len(picked) < count:
                picked.append((defect_type, files[rank]))
    return picked


def _tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` with ``mask`` blended half-way towards ``colour``."""
    tinted = image.astype(np.float32) * 0.45 + np.asarray(colour, dtype=np.float32) * 0.55
    return np.where(mask[..., None], tinted.astype(np.uint8), image)


def _read(path: Path, mode: str) -> np.ndarray:
    """Read an image file as an array in PIL ``mode``."""
    with Image.open(path) as image:
        return np.asarray(image.convert(mode))


def _cell(label: str, top: np.ndarray, bottom: np.ndarray | None, tile: int) -> Image.Image:
    """A labelled column cell: the image, and beneath it its overlay (or an empty tile)."""
    cell = Image.new("RGB", (tile, LABEL_HEIGHT + 2 * tile + GAP), BACKDROP)
    ImageDraw.Draw(cell).text((2, 1), label, fill=(235, 235, 235), font=ImageFont.load_default())
    cell.paste(Image.fromarray(top).resize((tile, tile), Image.Resampling.NEAREST), (0, LABEL_HEIGHT))
    if bottom is not None:
        cell.paste(
            Image.fromarray(bottom).resize((tile, tile), Image.Resampling.NEAREST),
            (0, LABEL_HEIGHT + tile + GAP),
        )
    return cell


def _row(product_dir: Path, per_product: int) -> list[Image.Image]:
    """The cells of one product: a normal (with its foreground mask for objects), then defects with masks."""
    normals = _pngs(product_dir / "train" / GOOD) or _pngs(product_dir / "test" / GOOD)
    if not normals:
        msg = f"{product_dir} has no good images for the contact sheet"
        raise ValueError(msg)
    normal = _read(normals[0], "RGB")
    tile = max(MIN_TILE, normal.shape[0])
    split = normals[0].parent.parent.name
    fg_path = product_dir / "foreground" / split / GOOD / normals[0].name
    fg_view = np.repeat(_read(fg_path, "L")[..., None], 3, axis=-1) if fg_path.is_file() else None
    cells = [_cell(f"{product_dir.name}/good", normal, fg_view, tile)]
    for defect_type, path in _pick(product_dir, per_product):
        image = _read(path, "RGB")
        mask_path = product_dir / "ground_truth" / defect_type / f"{path.stem}_mask.png"
        overlay = _tint(image, _read(mask_path, "L") > 0, (255, 0, 0)) if mask_path.is_file() else None
        cells.append(_cell(f"{product_dir.name}/{defect_type}", image, overlay, tile))
    return cells


def contact_sheet(root: Path, out_png: Path, *, per_product: int = 6) -> Path:
    """Write a PNG grid of the MVTec tree at ``root``: a row per product, masks tinted red beneath images."""
    root, out_png = Path(root), Path(out_png)
    if per_product < 1:
        msg = f"per_product must be at least 1, got {per_product}"
        raise ValueError(msg)
    products = _product_dirs(root) if root.is_dir() else []
    if not products:
        msg = f"no products (directories with test/) under {root}"
        raise ValueError(msg)
    rows = [_row(product, per_product) for product in products]
    width = max(sum(cell.width + GAP for cell in row) for row in rows) + GAP
    height = sum(max(cell.height for cell in row) + GAP for row in rows) + GAP
    sheet = Image.new("RGB", (width, height), BACKDROP)
    y = GAP
    for row in rows:
        x = GAP
        for cell in row:
            sheet.paste(cell, (x, y))
            x += cell.width + GAP
        y += max(cell.height for cell in row) + GAP
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    logger.info("wrote contact sheet of %d products to %s", len(rows), out_png)
    return out_png
