"""Tree-walking helpers shared by the layout readers: strict listings that never skip a file silently."""

from __future__ import annotations

import os
from pathlib import Path

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.imageio import IMAGE_SUFFIXES, is_image_file
from defectsynth.storage.records import NORMAL, ImageRecord, id_sort_key

FOREGROUND_DIR = "foreground"


def list_images(directory: Path, *, what: str) -> list[Path]:
    """Image files of a directory in id order; any other visible file is an error.

    Hidden files (``.DS_Store``) are ignored; an empty directory is an error naming ``what`` it should hold.
    """
    if not directory.is_dir():
        raise DatasetError(directory, f"directory is missing (expected {what})")
    images: list[Path] = []
    for path in directory.iterdir():
        if path.name.startswith("."):
            continue
        if not is_image_file(path):
            kind = "a directory" if path.is_dir() else "not an image file"
            raise DatasetError(path, f"{kind} inside {what}; expected only images {IMAGE_SUFFIXES}")
        images.append(path)
    if not images:
        raise DatasetError(directory, f"no images ({what} is empty)")
    return sorted(images, key=lambda p: id_sort_key(p.stem))


def subdirectories(directory: Path) -> list[Path]:
    """Visible subdirectories, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def inside_root(root: Path, relative: str, where: Path | str, what: str) -> Path:
    """``root / relative`` when it stays under ``root``, else a DatasetError at ``where`` naming ``what``.

    The check is lexical (an absolute path or ``..`` out is refused); symlinks inside the root may point anywhere.
    """
    path = Path(os.path.normpath(Path(root) / relative))
    if Path(relative).is_absolute() or not path.is_relative_to(os.path.normpath(root)):
        raise DatasetError(where, f"{what} {relative!r} lies outside the dataset root {root}")
    return path


def require_file(path: Path, problem: str) -> Path:
    """Return ``path`` if it is a file, else raise a DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(path, problem)
    return path


def foreground_path(product_root: Path, image: Path) -> Path | None:
    """The foreground mask of an image, when the product has a ``foreground/`` tree.

    Rule: ``<product>/foreground/<image path relative to the product>`` with a ``.png`` suffix.
    Once the tree exists, every image must have its mask there.
    """
    tree = product_root / FOREGROUND_DIR
    if not tree.is_dir():
        return None
    relative = image.relative_to(product_root).with_suffix(".png")
    return require_file(tree / relative, f"foreground mask missing for {relative} (the product has {FOREGROUND_DIR}/)")


def normal_records(product: str, product_root: Path, directory: Path, origin: str) -> list[ImageRecord]:
    """Records for a directory of good images, with ids ``<origin>/good/<stem>``."""
    return [
        ImageRecord(
            product=product,
            image_id=f"{origin}/{NORMAL}/{path.stem}",
            path=path,
            defect_type=NORMAL,
            origin=origin,
            foreground_path=foreground_path(product_root, path),
        )
        for path in list_images(directory, what=f"good images of {product!r}")
    ]


def check_no_orphans(mask_dir: Path, expected: set[Path]) -> None:
    """Every file in a mask directory must belong to an image: a stray mask is an error."""
    for path in sorted(mask_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path not in expected:
            raise DatasetError(path, "mask has no matching image")
