"""Dataset layouts: one reader per on-disk format, chosen by name, each yielding ``ProductData``.

Example:
    >>> from defectsynth.storage.layouts import read_dataset
    >>> products = read_dataset("data/demo", layout="mvtec")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.imageio import MAX_PIXELS, load_item
from defectsynth.storage.layouts import folder, loco, mvtec, visa
from defectsynth.storage.layouts.folder import FolderLayout
from defectsynth.storage.records import ProductData

logger = logging.getLogger(__name__)

LAYOUTS = ("mvtec", "visa", "loco", "folder")


class LayoutOptions(BaseModel):
    """Per-layout settings: the folder layout's naming rule and VisA's split CSV."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: FolderLayout = Field(default_factory=FolderLayout)
    visa_split_csv: str = Field(visa.DEFAULT_SPLIT_CSV, description="VisA split CSV, relative to the root")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        msg = f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}"
        raise ValueError(msg)


def detect_layout(root: Path) -> str:
    """Guess the layout of a dataset root from its marker files; raise when nothing matches."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset root is not a directory")
    if (root / visa.DEFAULT_SPLIT_CSV).is_file():
        return "visa"
    products = mvtec.list_products(root)
    if products:
        return "loco" if any((root / p / "validation" / "good").is_dir() for p in products) else "mvtec"
    if folder.list_products(root):
        return "folder"
    raise DatasetError(root, f"unknown layout: no product matches any of {', '.join(LAYOUTS)}")


def list_products(root: Path, layout: str, options: LayoutOptions | None = None) -> list[str]:
    """The products a layout finds under ``root``."""
    _check_layout(layout)
    options = options or LayoutOptions()
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset root is not a directory")
    if layout == "visa":
        return visa.list_products(root, options.visa_split_csv)
    if layout == "folder":
        return folder.list_products(root, options.folder)
    return mvtec.list_products(root)


def read_product(root: Path, product: str, layout: str, options: LayoutOptions | None = None) -> ProductData:
    """Read the records of one product (no pixels decoded; see ``validate_product``)."""
    _check_layout(layout)
    options = options or LayoutOptions()
    root = Path(root)
    if layout == "visa":
        return visa.read_product(root, product, options.visa_split_csv)
    if layout == "folder":
        return folder.read_product(root, product, options.folder)
    if layout == "loco":
        return loco.read_product(root, product)
    return mvtec.read_product(root, product)


def validate_product(product: ProductData, *, progress: bool = False, max_pixels: int = MAX_PIXELS) -> None:
    """Decode every image and mask once: truncated files, size mismatches, bad masks and oversized images raise."""
    records = list(product.records())
    for record in tqdm(records, desc=f"checking {product.name}", unit="img", disable=not progress):
        load_item(record, max_pixels=max_pixels)


def read_dataset(
    root: Path | str,
    layout: str,
    products: Sequence[str] = (),
    *,
    options: LayoutOptions | None = None,
    validate: bool = True,
    progress: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> list[ProductData]:
    """Read (and by default fully validate) the named products, or every product under ``root``."""
    _check_layout(layout)
    root = Path(root)
    available = list_products(root, layout, options)
    names = list(products) or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise DatasetError(root, f"product(s) {unknown} not found; the {layout} layout found {available}")
    if not names:
        raise DatasetError(root, f"no products found for layout {layout!r}")
    result = [read_product(root, name, layout, options) for name in names]
    if validate:
        for product in result:
            validate_product(product, progress=progress, max_pixels=max_pixels)
    logger.info("read %d product(s) from %s (%s)", len(result), root, layout)
    return result


__all__ = [
    "LAYOUTS",
    "FolderLayout",
    "LayoutOptions",
    "detect_layout",
    "list_products",
    "read_dataset",
    "read_product",
    "validate_product",
]
