"""A plain folder layout, one directory per product.

```
<root>/<product>/<normal_dir>/*.png                  normal images (default "good")
<root>/<product>/<defect_type>/*.png                 one directory per defect type (every other directory)
<root>/<product>/<mask_dir>/<defect_type>/<stem><mask_suffix>.png   the mask of <defect_type>/<stem>.*
<root>/<product>/foreground/<same relative path>.png optional foreground masks
```
Naming rule: a defect image ``scratch/17.jpg`` has its mask at ``masks/scratch/17_mask.png`` with the
defaults. The layout has no held-out normals; the split carves them from the normal pool.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.layouts.common import (
    FOREGROUND_DIR,
    check_no_orphans,
    foreground_path,
    list_images,
    normal_records,
    require_file,
    subdirectories,
)
from defectsynth.storage.records import ImageRecord, ProductData


class FolderLayout(BaseModel):
    """Directory names and the mask naming rule of the folder layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    normal_dir: str = Field("good", min_length=1, description="directory of normal images")
    mask_dir: str = Field("masks", min_length=1, description="directory holding one mask directory per type")
    mask_suffix: str = Field("_mask", description="appended to the image stem to name its mask (.png)")

    @field_validator("normal_dir", "mask_dir", "mask_suffix")
    @classmethod
    def _inside_the_product(cls, value: str) -> str:
        """A name inside the product directory: no separator, NUL, ``.`` or ``..`` (paths stay under the root)."""
        if any(c in value for c in "/\\\x00") or value in (".", ".."):
            msg = f"{value!r} must be a plain name inside the product directory"
            raise ValueError(msg)
        return value


def _reserved(layout: FolderLayout) -> set[str]:
    return {layout.normal_dir, layout.mask_dir, FOREGROUND_DIR}


def list_products(root: Path, layout: FolderLayout | None = None) -> list[str]:
    """Products under a root: the directories holding a normal directory."""
    layout = layout or FolderLayout()
    return [p.name for p in subdirectories(root) if (p / layout.normal_dir).is_dir()]


def read_product(root: Path, product: str, layout: FolderLayout | None = None) -> ProductData:
    """Read one product of the folder layout."""
    layout = layout or FolderLayout()
    product_root = root / product
    if not product_root.is_dir():
        raise DatasetError(product_root, f"product {product!r} not found under {root}")
    normals = normal_records(product, product_root, product_root / layout.normal_dir, "train")
    defects: list[ImageRecord] = []
    for type_dir in subdirectories(product_root):
        if type_dir.name in _reserved(layout):
            continue
        for image in list_images(type_dir, what=f"defect type {type_dir.name!r}"):
            mask = product_root / layout.mask_dir / type_dir.name / f"{image.stem}{layout.mask_suffix}.png"
            require_file(mask, f"missing mask for {type_dir.name}/{image.name}")
            defects.append(
                ImageRecord(
                    product=product,
                    image_id=f"{type_dir.name}/{image.stem}",
                    path=image,
                    defect_type=type_dir.name,
                    origin="test",
                    mask_paths=(mask,),
                    foreground_path=foreground_path(product_root, image),
                )
            )
    if not defects:
        raise DatasetError(product_root, f"product {product!r} has no defect type directories")
    check_no_orphans(product_root / layout.mask_dir, {r.mask_paths[0] for r in defects})
    return ProductData(
        name=product,
        root=product_root,
        layout="folder",
        normals=tuple(normals),
        test_normals=(),
        defects=tuple(defects),
        has_foreground=(product_root / FOREGROUND_DIR).is_dir(),
    )
