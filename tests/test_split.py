"""The split protocols on hand-checked examples, and the write-once manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectsynth.storage.layouts import read_product
from defectsynth.storage.split import SplitSettings, carve, ensure_split, load_split, make_split, split_product
from helpers.trees import make_folder, make_mvtec, write_image, write_mask


def _stems(ids: list[str]) -> list[str]:
    return [i.rsplit("/", 1)[-1] for i in ids]


@pytest.fixture
def product(tmp_path: Path):
    # ids of unequal length: numeric order is 1, 2, 9, 10, 11, 100 (string order would put 10 before 2)
    base = make_mvtec(tmp_path, types={"hole": 1}, normals=10)
    for stem in ("10", "9", "100", "2", "11", "1"):
        write_image(base / "test/crack" / f"{stem}.png")
        write_mask(base / "ground_truth/crack" / f"{stem}_mask.png")
    return read_product(tmp_path, "widget", "mvtec")


def test_third_takes_lowest_ids_by_number(product) -> None:
    split = split_product(product, SplitSettings())
    assert _stems(split.generator_train["crack"]) == ["1", "2"]  # ceil(6 / 3) = 2
    assert _stems(split.test_defects["crack"]) == ["9", "10", "11", "100"]
    assert _stems(split.generator_train["hole"]) == ["000"]  # at least one, even from a single image
    assert split.test_defects["hole"] == []


@pytest.mark.parametrize(("n", "train"), [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (7, 3), (9, 3), (10, 4)])
def test_third_counts(tmp_path: Path, n: int, train: int) -> None:
    make_mvtec(tmp_path, types={"crack": n})
    split = split_product(read_product(tmp_path, "widget", "mvtec"), SplitSettings())
    assert len(split.generator_train["crack"]) == train
    assert len(split.test_defects["crack"]) == n - train


def test_kshot(product) -> None:
    with pytest.raises(ValueError, match="widget/hole: 1 image"):
        split_product(product, SplitSettings(protocol="kshot", k=1))


def test_kshot_counts(tmp_path: Path) -> None:
    make_mvtec(tmp_path, types={"crack": 5, "hole": 3})
    product = read_product(tmp_path, "widget", "mvtec")
    split = split_product(product, SplitSettings(protocol="kshot", k=2))
    assert _stems(split.generator_train["crack"]) == ["000", "001"]
    assert _stems(split.test_defects["hole"]) == ["002"]


def test_twofold_halves_swap(tmp_path: Path) -> None:
    make_mvtec(tmp_path, types={"crack": 5})
    product = read_product(tmp_path, "widget", "mvtec")
    fold1 = split_product(product, SplitSettings(protocol="twofold", fold=1))
    fold2 = split_product(product, SplitSettings(protocol="twofold", fold=2))
    assert _stems(fold1.generator_train["crack"]) == ["000", "001", "002"]
    assert _stems(fold1.test_defects["crack"]) == ["003", "004"]
    assert fold2.generator_train["crack"] == fold1.test_defects["crack"]
    assert fold2.test_defects["crack"] == fold1.generator_train["crack"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"protocol": "kshot"}, "split.k is required"),
        ({"protocol": "third", "k": 2}, "split.k is required"),
        ({"protocol": "twofold"}, "split.fold"),
        ({"protocol": "kshot", "k": 0}, "greater than or equal to 1"),
    ],
)
def test_settings_validation(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitSettings(**settings)


def test_validation_comes_from_training_side_only(product) -> None:
    split = split_product(product, SplitSettings(val_fraction=0.2))
    assert len(split.val_normals) == 2 and len(split.train_normals) == 8
    assert not set(split.validation) & set(split.test)
    assert set(split.validation) == set(split.val_normals) | {i for v in split.generator_train.values() for i in v}
    every = split.train_normals + split.validation + split.test
    assert sorted(every) == sorted(r.image_id for r in product.records())  # a partition of the product


def test_carve_is_seeded_and_order_free() -> None:
    ids = [f"train/good/{i:03d}" for i in range(20)]
    kept, carved = carve(ids, 0.25, seed=3, salt="p")
    assert len(carved) == 5 and not set(kept) & set(carved)
    assert carve(list(reversed(ids)), 0.25, seed=3, salt="p")[1] == sorted(carved, reverse=True)
    assert carve(ids, 0.25, seed=4, salt="p")[1] != carved


def test_folder_layout_holds_out_normals(tmp_path: Path) -> None:
    make_folder(tmp_path)
    split = split_product(read_product(tmp_path, "plate", "folder"), SplitSettings(test_normal_fraction=0.34))
    assert len(split.test_normals) == 2 and len(split.train_normals) + len(split.val_normals) == 4


def test_manifest_written_once(tmp_path: Path, product) -> None:
    path = tmp_path / "run/split.json"
    first = ensure_split(path, [product], SplitSettings())
    assert load_split(path) == first
    assert ensure_split(path, [product], SplitSettings()).digest() == first.digest()
    with pytest.raises(ValueError, match="written with split settings"):
        ensure_split(path, [product], SplitSettings(protocol="kshot", k=1))


def test_manifest_refuses_changed_images(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path / "data")
    path = tmp_path / "split.json"
    ensure_split(path, [read_product(tmp_path / "data", "widget", "mvtec")], SplitSettings())
    write_image(base / "test/crack/004.png")
    write_mask(base / "ground_truth/crack/004_mask.png")
    with pytest.raises(ValueError, match="images of product 'widget' changed"):
        ensure_split(path, [read_product(tmp_path / "data", "widget", "mvtec")], SplitSettings())


def test_manifest_adds_new_products(tmp_path: Path) -> None:
    make_mvtec(tmp_path / "data", product="a")
    make_mvtec(tmp_path / "data", product="b")
    read = lambda name: read_product(tmp_path / "data", name, "mvtec")  # noqa: E731
    path = tmp_path / "split.json"
    first = ensure_split(path, [read("a")], SplitSettings())
    both = ensure_split(path, [read("a"), read("b")], SplitSettings())
    assert set(both.products) == {"a", "b"} and both.products["a"] == first.products["a"]
    assert make_split([read("a"), read("b")], SplitSettings()).digest() == both.digest()
