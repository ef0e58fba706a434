"""Layout readers: a shared contract per layout, then the malformed trees each error must name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.imageio import load_item
from defectsynth.storage.layouts import detect_layout, read_dataset, read_product
from defectsynth.storage.layouts.visa import convert_to_mvtec, type_name
from helpers.trees import SIZE, make_folder, make_loco, make_mvtec, make_visa, write_image, write_mask


class LayoutContract:
    """What every layout reader guarantees; subclasses supply the tree and the expected counts."""

    layout: str
    product: str
    expected_types: dict[str, int]
    expected_normals: int
    expected_test_normals: int

    def build(self, root: Path) -> None:
        raise NotImplementedError

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        self.build(tmp_path)
        return tmp_path

    def test_detected(self, root: Path) -> None:
        assert detect_layout(root) == self.layout

    def test_counts_and_types(self, root: Path) -> None:
        (product,) = read_dataset(root, self.layout)
        assert product.name == self.product
        assert {t: len(product.defects_of(t)) for t in product.defect_types} == self.expected_types
        assert len(product.normals) == self.expected_normals
        assert len(product.test_normals) == self.expected_test_normals

    def test_items_are_typed_and_masked(self, root: Path) -> None:
        product = read_product(root, self.product, self.layout)
        for record in product.records():
            item = load_item(record)
            assert item.image.shape == (SIZE, SIZE, 3) and item.image.dtype == np.uint8
            assert item.gt_mask.shape == (SIZE, SIZE) and item.gt_mask.dtype == bool
            assert item.gt_label == record.label
            assert item.gt_mask.any() == bool(record.label)

    def test_defects_sorted_by_number(self, root: Path) -> None:
        product = read_product(root, self.product, self.layout)
        for defect_type in product.defect_types:
            numbers = [int(r.stem) for r in product.defects_of(defect_type)]
            assert numbers == sorted(numbers)


class TestMVTec(LayoutContract):
    layout, product = "mvtec", "widget"
    expected_types = {"crack": 4, "hole": 3}
    expected_normals, expected_test_normals = 6, 3

    def build(self, root: Path) -> None:
        make_mvtec(root)


class TestLoco(LayoutContract):
    layout, product = "loco", "box"
    expected_types = {"logical_anomalies": 3, "structural_anomalies": 3}
    expected_normals, expected_test_normals = 6, 2  # train/good + validation/good

    def build(self, root: Path) -> None:
        make_loco(root)

    def test_masks_are_merged(self, root: Path) -> None:
        product = read_product(root, "box", "loco")
        item = load_item(product.defects_of("logical_anomalies")[0])
        assert item.gt_mask[:4, :4].all() and item.gt_mask[10:14, 10:14].all()
        assert item.gt_mask.sum() == 32


class TestVisA(LayoutContract):
    layout, product = "visa", "candle"
    expected_types = {"chunk_of_wax_missing": 2, "weird_candle_wick": 2}
    expected_normals, expected_test_normals = 3, 2

    def build(self, root: Path) -> None:
        make_visa(root)

    def test_label_masks_merge_all_regions(self, root: Path) -> None:
        item = load_item(read_product(root, "candle", "visa").defects[0])
        assert item.gt_mask.sum() == 18

    def test_convert_to_mvtec_reads_back(self, root: Path, tmp_path: Path) -> None:
        out = tmp_path / "converted"
        convert_to_mvtec(read_product(root, "candle", "visa"), out)
        (product,) = read_dataset(out, "mvtec")
        assert {t: len(product.defects_of(t)) for t in product.defect_types} == self.expected_types
        mask = np.asarray(Image.open(out / "candle/ground_truth/weird_candle_wick/000_mask.png"))
        assert set(np.unique(mask)) == {0, 255}


class TestFolder(LayoutContract):
    layout, product = "folder", "plate"
    expected_types = {"dent": 3, "stain": 3}
    expected_normals, expected_test_normals = 6, 0

    def build(self, root: Path) -> None:
        make_folder(root)


def test_visa_without_annotations_uses_one_type(tmp_path: Path) -> None:
    make_visa(tmp_path, annotate=False)
    assert read_product(tmp_path, "candle", "visa").defect_types == ["anomaly"]


def test_visa_type_names() -> None:
    assert type_name("chunk of wax missing") == "chunk_of_wax_missing"
    assert type_name("Scratch, bent-wick") == "bent_wick+scratch"


def test_foreground_masks_are_read(tmp_path: Path) -> None:
    make_mvtec(tmp_path, foreground=True)
    (product,) = read_dataset(tmp_path, "mvtec")
    assert product.has_foreground
    assert all(load_item(r).foreground.sum() == 14 * 14 for r in product.records())


# Malformed trees: each error names the file at fault.


def _error(root: Path, layout: str = "mvtec") -> DatasetError:
    with pytest.raises(DatasetError) as info:
        read_dataset(root, layout)
    return info.value


def test_missing_mask(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    (base / "ground_truth/crack/002_mask.png").unlink()
    err = _error(tmp_path)
    assert err.path == base / "ground_truth/crack/002_mask.png"
    assert "missing mask for test/crack/002.png" in str(err)


def test_mask_size_differs(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    write_mask(base / "ground_truth/hole/001_mask.png", size=SIZE * 2)
    err = _error(tmp_path)
    assert err.path == base / "ground_truth/hole/001_mask.png"
    assert "differs" in str(err)


def test_non_binary_mask(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:6, 2:6] = 255
    mask[6:8, 2:6] = 128  # anti-aliased edge
    Image.fromarray(mask).save(base / "ground_truth/crack/000_mask.png")
    err = _error(tmp_path)
    assert err.path == base / "ground_truth/crack/000_mask.png"
    assert "not binary" in str(err)


def test_empty_mask_of_defect(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    write_mask(base / "ground_truth/crack/001_mask.png", box=(0, 0, 0, 0))
    err = _error(tmp_path)
    assert err.path == base / "ground_truth/crack/001_mask.png"
    assert "empty" in str(err)


def test_truncated_image(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    path = base / "train/good/003.png"
    write_image(path, size=64)
    path.write_bytes(path.read_bytes()[:200])
    err = _error(tmp_path)
    assert err.path == path
    assert "truncated" in str(err)


def test_unreadable_image(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    path = base / "test/hole/000.png"
    path.write_bytes(b"not a png at all")
    assert _error(tmp_path).path == path


def test_empty_defect_type(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    (base / "test/scratch").mkdir()
    err = _error(tmp_path)
    assert err.path == base / "test/scratch"
    assert "'scratch' is empty" in str(err)


def test_stray_file_is_not_skipped(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    (base / "test/crack/notes.txt").write_text("x")
    assert _error(tmp_path).path == base / "test/crack/notes.txt"


def test_orphan_mask(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    write_mask(base / "ground_truth/crack/009_mask.png")
    err = _error(tmp_path)
    assert err.path == base / "ground_truth/crack/009_mask.png"
    assert "no matching image" in str(err)


def test_missing_foreground(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, foreground=True)
    (base / "foreground/test/hole/002.png").unlink()
    assert _error(tmp_path).path == base / "foreground/test/hole/002.png"


def test_loco_missing_mask_dir(tmp_path: Path) -> None:
    base = make_loco(tmp_path)
    for path in (base / "ground_truth/logical_anomalies/001").iterdir():
        path.unlink()
    (base / "ground_truth/logical_anomalies/001").rmdir()
    assert _error(tmp_path, "loco").path == base / "ground_truth/logical_anomalies/001"


def test_visa_missing_image_names_csv_line(tmp_path: Path) -> None:
    make_visa(tmp_path)
    (tmp_path / "candle/Data/Images/Anomaly/002.JPG").unlink()
    err = _error(tmp_path, "visa")
    assert err.path == tmp_path / "candle/Data/Images/Anomaly/002.JPG"
    assert "1cls.csv:" in str(err)


def test_folder_missing_mask_names_rule(tmp_path: Path) -> None:
    base = make_folder(tmp_path)
    (base / "masks/stain/10_mask.png").unlink()
    err = _error(tmp_path, "folder")
    assert err.path == base / "masks/stain/10_mask.png"


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown layout 'kitti'"):
        read_dataset(tmp_path, "kitti")
    (tmp_path / "random_dir").mkdir()
    with pytest.raises(DatasetError, match="unknown layout"):
        detect_layout(tmp_path)


def test_unknown_product(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    with pytest.raises(DatasetError, match=r"product\(s\) \['gadget'\] not found"):
        read_dataset(tmp_path, "mvtec", ["gadget"])
