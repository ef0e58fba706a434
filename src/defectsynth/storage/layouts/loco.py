"""MVTec LOCO AD layout: like MVTec AD, plus ``validation/good``, and a directory of masks per image.

``ground_truth/<type>/<stem>/000.png, 001.png, ...``: each file is binary (0 and one per-defect value
from LOCO's ``defects_config.json``); they are merged by union into one defect mask.
"""

from __future__ import annotations

from pathlib import Path

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.layouts.common import list_images
from defectsynth.storage.layouts.mvtec import list_products, read_tree
from defectsynth.storage.records import ProductData

__all__ = ["list_products", "loco_masks", "read_product"]


def loco_masks(product_root: Path, defect_type: str, image: Path) -> tuple[Path, ...]:
    """Every mask file in ``ground_truth/<type>/<stem>/``."""
    mask_dir = product_root / "ground_truth" / defect_type / image.stem
    if not mask_dir.is_dir():
        raise DatasetError(mask_dir, f"missing mask directory for test/{defect_type}/{image.name}")
    return tuple(list_images(mask_dir, what=f"masks of test/{defect_type}/{image.name}"))


def read_product(root: Path, product: str) -> ProductData:
    """Read one LOCO product; ``validation/good`` joins the training-side normal pool."""
    return read_tree(root, product, "loco", loco_masks, {"train": "train/good", "validation": "validation/good"})
