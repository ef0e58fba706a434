"""Typed records of a product dataset: where each image and mask is, and what it shows.

Readers (``storage.layouts``) build these from a tree on disk; nothing here touches pixels.
Ids sort by their number (``9`` before ``10``), whatever the file names' lengths.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from defectsynth.storage.errors import DatasetError

NORMAL = "good"
_DIGITS = re.compile(r"\d+")


def id_sort_key(stem: str) -> tuple[int, int, str]:
    """Sort key for image ids: the last number in the name, then the name itself.

    Names with no number at all sort after every numbered one, alphabetically.

    Example:
        >>> sorted(["10", "9", "a"], key=id_sort_key)
        ['9', '10', 'a']
    """
    numbers = _DIGITS.findall(stem)
    if not numbers:
        return (1, 0, stem)
    return (0, int(numbers[-1]), stem)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a product with its masks; normal images have no defect masks."""

    product: str
    image_id: str  # unique within the product, e.g. "test/crack/003"
    path: Path
    defect_type: str  # NORMAL ("good") for normal images
    origin: str  # where the layout put it: "train", "validation" or "test"
    mask_paths: tuple[Path, ...] = ()  # merged by union (LOCO has several per image)
    foreground_path: Path | None = None
    mask_is_label_map: bool = False  # VisA: any non-zero value marks the defect, several labels allowed

    @property
    def label(self) -> int:
        """0 for a normal image, 1 for an anomalous one."""
        return 0 if self.defect_type == NORMAL else 1

    @property
    def stem(self) -> str:
        """The last part of the id, e.g. "003"."""
        return self.image_id.rsplit("/", 1)[-1]

    @property
    def sort_key(self) -> tuple[int, int, str]:
        """Key that orders images of one defect type by their id number."""
        return id_sort_key(self.stem)


@dataclass(frozen=True)
class ProductData:
    """Every image of one product, as read from a dataset layout.

    ``normals`` is the training-side pool of good images; ``test_normals`` are the good images the
    layout reserves for testing; ``defects`` are the anomalous images of every type, each with masks.
    """

    name: str
    root: Path
    layout: str
    normals: tuple[ImageRecord, ...]
    test_normals: tuple[ImageRecord, ...]
    defects: tuple[ImageRecord, ...]
    has_foreground: bool = False
    _by_id: dict[str, ImageRecord] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, ImageRecord] = {}
        for record in self.records():
            if record.image_id in by_id:
                first = by_id[record.image_id].path
                msg = f"duplicate image id {record.image_id!r} in product {self.name!r}: also {first}"
                raise DatasetError(record.path, msg)
            by_id[record.image_id] = record
        object.__setattr__(self, "_by_id", by_id)

    def records(self) -> Iterator[ImageRecord]:
        """All records: normals, test normals, then defects."""
        yield from self.normals
        yield from self.test_normals
        yield from self.defects

    @property
    def defect_types(self) -> list[str]:
        """Defect type names, sorted."""
        return sorted({record.defect_type for record in self.defects})

    def defects_of(self, defect_type: str) -> list[ImageRecord]:
        """The images of one defect type, in id-number order."""
        return sorted((r for r in self.defects if r.defect_type == defect_type), key=lambda r: r.sort_key)

    def record(self, image_id: str) -> ImageRecord:
        """Look an image up by id; KeyError names the id and the product."""
        try:
            return self._by_id[image_id]
        except KeyError:
            msg = f"no image {image_id!r} in product {self.name!r} ({self.root})"
            raise KeyError(msg) from None
