"""MVTec AD layout: ``<product>/train/good``, ``test/<type>``, ``ground_truth/<type>/<id>_mask.png``.

MVTec LOCO (``loco.py``) shares this reader with its own mask rule and a ``validation/good`` pool.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.layouts.common import (
    check_no_orphans,
    foreground_path,
    list_images,
    normal_records,
    require_file,
    subdirectories,
)
from defectsynth.storage.records import NORMAL, ImageRecord, ProductData

MaskRule = Callable[[Path, str, Path], tuple[Path, ...]]  # (product_root, defect_type, image) -> mask files


def mvtec_masks(product_root: Path, defect_type: str, image: Path) -> tuple[Path, ...]:
    """MVTec AD: one mask per image, ``ground_truth/<type>/<stem>_mask.png``."""
    mask = product_root / "ground_truth" / defect_type / f"{image.stem}_mask.png"
    return (require_file(mask, f"missing mask for test/{defect_type}/{image.name}"),)


def list_products(root: Path) -> list[str]:
    """Products under a dataset root: the directories holding ``train/good``."""
    return [p.name for p in subdirectories(root) if (p / "train" / NORMAL).is_dir()]


def defect_records(product: str, product_root: Path, mask_rule: MaskRule) -> list[ImageRecord]:
    """Records for every ``test/<type>`` directory other than good, with their masks."""
    records: list[ImageRecord] = []
    test_dir = product_root / "test"
    for type_dir in subdirectories(test_dir) if test_dir.is_dir() else []:
        if type_dir.name == NORMAL:
            continue
        for image in list_images(type_dir, what=f"defect type {type_dir.name!r}"):
            records.append(
                ImageRecord(
                    product=product,
                    image_id=f"test/{type_dir.name}/{image.stem}",
                    path=image,
                    defect_type=type_dir.name,
                    origin="test",
                    mask_paths=mask_rule(product_root, type_dir.name, image),
                    foreground_path=foreground_path(product_root, image),
                )
            )
    return records


def read_tree(root: Path, product: str, layout: str, mask_rule: MaskRule, normal_dirs: dict[str, str]) -> ProductData:
    """Read an MVTec-style product; ``normal_dirs`` maps origin ("train", "validation") to its good dir."""
    product_root = root / product
    if not product_root.is_dir():
        raise DatasetError(product_root, f"product {product!r} not found under {root}")
    normals = [
        record
        for origin, rel in normal_dirs.items()
        if origin == "train" or (product_root / rel).is_dir()
        for record in normal_records(product, product_root, product_root / rel, origin)
    ]
    test_good = product_root / "test" / NORMAL
    test_normals = normal_records(product, product_root, test_good, "test") if test_good.is_dir() else []
    defects = defect_records(product, product_root, mask_rule)
    if not defects:
        raise DatasetError(product_root / "test", f"product {product!r} has no defect images (no test/<type>/ dirs)")
    ground_truth = product_root / "ground_truth"
    check_no_orphans(ground_truth, {mask for record in defects for mask in record.mask_paths})
    return ProductData(
        name=product,
        root=product_root,
        layout=layout,
        normals=tuple(normals),
        test_normals=tuple(test_normals),
        defects=tuple(defects),
        has_foreground=(product_root / "foreground").is_dir(),
    )


def read_product(root: Path, product: str) -> ProductData:
    """Read one MVTec AD product."""
    return read_tree(root, product, "mvtec", mvtec_masks, {"train": "train/good"})
