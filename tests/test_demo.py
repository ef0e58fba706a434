from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectsynth.storage.demo import DEMO_PRODUCTS, DemoProduct, contact_sheet, render_sample, write_demo

SIZE = 64
INDICES = range(4)
CASES = [(p, d) for p, product in DEMO_PRODUCTS.items() for d in product.defect_types]


def _changed(sample) -> np.ndarray:
    diff = np.abs(sample.image.astype(np.int16) - sample.normal.astype(np.int16))
    return diff.max(axis=-1)


def test_catalogue():
    kinds = [p.kind for p in DEMO_PRODUCTS.values()]
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    for name, product in DEMO_PRODUCTS.items():
        assert isinstance(product, DemoProduct) and product.name == name
        assert len(product.defect_types) >= 4 and "good" not in product.defect_types
        assert ("missing_piece" in product.defect_types) <= (product.kind == "object")


@pytest.mark.parametrize(("product", "defect_type"), CASES)
def test_mask_covers_exactly_the_defect(product, defect_type):
    for index in INDICES:
        sample = render_sample(product, "test", defect_type, index, seed=7, size=SIZE)
        assert sample.image.shape == sample.normal.shape == (SIZE, SIZE, 3)
        assert sample.image.dtype == sample.normal.dtype == np.uint8
        assert sample.mask.shape == (SIZE, SIZE) and sample.mask.dtype == bool
        assert sample.mask.any(), "mask is empty"
        change = _changed(sample)
        assert not (change[~sample.mask] > 0).any(), "pixels changed outside the mask"
        assert (change[sample.mask] >= 10).mean() >= 0.95, "defect not visible inside its mask"
        if DEMO_PRODUCTS[product].kind == "object":
            assert sample.foreground is not None
            assert not (sample.mask & ~sample.foreground).any(), "object defect outside the foreground"
        else:
            assert sample.foreground is None


@pytest.mark.parametrize("product", [p for p, d in DEMO_PRODUCTS.items() if d.kind == "object"])
def test_missing_piece_shows_background(product):
    for index in INDICES:
        sample = render_sample(product, "test", "missing_piece", index, seed=1, size=SIZE)
        background = sample.normal[~sample.foreground].astype(float).mean()
        assert abs(sample.image[sample.mask].astype(float).mean() - background) < 25


@pytest.mark.parametrize("product", list(DEMO_PRODUCTS))
def test_good_images_and_their_variation(product):
    samples = [render_sample(product, "train", "good", i, seed=0, size=SIZE) for i in range(5)]
    for sample in samples:
        assert np.array_equal(sample.image, sample.normal)
        assert not sample.mask.any()
        if DEMO_PRODUCTS[product].kind == "object":
            assert sample.foreground is not None and 0 < sample.foreground.mean() < 0.8
    for a in range(len(samples)):
        for b in range(a + 1, len(samples)):
            assert not np.array_equal(samples[a].image, samples[b].image)
    means = [s.image.mean() for s in samples]
    assert max(means) - min(means) > 1.0, "no global lighting variation"
    if DEMO_PRODUCTS[product].kind == "object":
        assert len({s.foreground.tobytes() for s in samples}) > 1, "object pose never varies"


def test_render_is_deterministic_and_seeded():
    late = render_sample("pill", "test", "crack", 3, seed=5, size=SIZE)
    for index in range(3):  # other renders in between must not matter
        render_sample("pill", "test", "crack", index, seed=5, size=SIZE)
    again = render_sample("pill", "test", "crack", 3, seed=5, size=SIZE)
    assert np.array_equal(late.image, again.image) and np.array_equal(late.mask, again.mask)
    other = render_sample("pill", "test", "crack", 3, seed=6, size=SIZE)
    assert not np.array_equal(late.image, other.image)
    train = render_sample("wood", "train", "good", 0, seed=5, size=SIZE)
    test = render_sample("wood", "test", "good", 0, seed=5, size=SIZE)
    assert not np.array_equal(train.image, test.image)


def _write_small(out: Path, seed: int = 0, products=None) -> list[str]:
    return write_demo(
        out, size=48, seed=seed, train_good=2, test_good=1, per_defect=2, products=products, progress=False
    )


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_written_tree_layout(tmp_path):
    names = _write_small(tmp_path)
    assert names == list(DEMO_PRODUCTS)
    assert (tmp_path / "contact_sheet.png").is_file()
    assert not list(tmp_path.glob(".*")), "partial directories left behind"
    for name, product in DEMO_PRODUCTS.items():
        root = tmp_path / name
        expected = {f"train/good/{i:03d}.png" for i in range(2)} | {"test/good/000.png"}
        for defect_type in product.defect_types:
            expected |= {f"test/{defect_type}/{i:03d}.png" for i in range(2)}
        images = {str(p.relative_to(root)) for p in root.glob("t*/*/*.png")}
        assert images == expected
        masks = {str(p.relative_to(root)) for p in (root / "ground_truth").rglob("*.png")}
        assert masks == {f"ground_truth/{d}/{i:03d}_mask.png" for d in product.defect_types for i in range(2)}
        for rel in masks:
            with Image.open(root / rel) as mask:
                assert mask.mode == "L" and mask.size == (48, 48)
                values = set(np.unique(np.asarray(mask)).tolist())
            assert values == {0, 255}
        for rel in images:
            with Image.open(root / rel) as image:
                assert image.mode == "RGB" and image.size == (48, 48)
        foreground = {str(p.relative_to(root / "foreground")) for p in root.glob("foreground/**/*.png")}
        if product.kind == "object":
            assert foreground == expected
            with Image.open(root / "foreground" / "train" / "good" / "000.png") as fg:
                assert fg.mode == "L" and set(np.unique(np.asarray(fg)).tolist()) == {0, 255}
        else:
            assert not (root / "foreground").exists()


def test_written_mask_matches_render(tmp_path):
    _write_small(tmp_path, seed=4, products=["washer"])
    sample = render_sample("washer", "test", "scratch", 1, seed=4, size=48)
    image = np.asarray(Image.open(tmp_path / "washer" / "test" / "scratch" / "001.png"))
    mask = np.asarray(Image.open(tmp_path / "washer" / "ground_truth" / "scratch" / "001_mask.png")) > 0
    assert np.array_equal(image, sample.image) and np.array_equal(mask, sample.mask)


def test_written_files_are_byte_identical_per_seed(tmp_path):
    _write_small(tmp_path / "a", products=["pill", "fabric"])
    _write_small(tmp_path / "b", products=["fabric", "pill"])  # order must not matter
    _write_small(tmp_path / "c", seed=1, products=["pill", "fabric"])
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["pill/test/crack/000.png"] != c["pill/test/crack/000.png"]
    assert a["fabric/train/good/000.png"] != c["fabric/train/good/000.png"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"size": 31}, "size"),
        ({"products": ["wood", "teapot"]}, "teapot"),
        ({"train_good": 0}, "train_good"),
        ({"test_good": 0}, "test_good"),
        ({"per_defect": -1}, "per_defect"),
        ({"products": []}, "products"),
    ],
)
def test_write_demo_rejects_bad_arguments(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        write_demo(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_write_demo_refuses_non_empty_product_dir(tmp_path):
    (tmp_path / "wood").mkdir()
    (tmp_path / "wood" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="wood"):
        _write_small(tmp_path, products=["pill", "wood"])
    assert not (tmp_path / "pill").exists(), "nothing is written when one product is refused"
    (tmp_path / "fabric").mkdir()  # an empty directory is fine
    assert _write_small(tmp_path, products=["fabric"]) == ["fabric"]
    assert (tmp_path / "fabric" / "train" / "good" / "000.png").is_file()


def test_render_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        render_sample("wood", "test", "good", 0, seed=0, size=16)
    with pytest.raises(ValueError, match="teapot"):
        render_sample("teapot", "test", "good", 0, seed=0, size=SIZE)
    with pytest.raises(ValueError, match="valid"):
        render_sample("wood", "train", "crack", 0, seed=0, size=SIZE)
    with pytest.raises(ValueError, match="missing_piece"):
        render_sample("fabric", "test", "missing_piece", 0, seed=0, size=SIZE)
    with pytest.raises(ValueError, match="split"):
        render_sample("wood", "val", "good", 0, seed=0, size=SIZE)


def test_contact_sheet(tmp_path):
    _write_small(tmp_path, products=["washer", "wood"])
    out = contact_sheet(tmp_path, tmp_path / "sheet.png", per_product=3)
    with Image.open(out) as sheet:
        assert sheet.mode == "RGB" and sheet.width > 4 * 48 and sheet.height > 2 * 2 * 48
    with pytest.raises(ValueError, match="per_product"):
        contact_sheet(tmp_path, tmp_path / "x.png", per_product=0)
    with pytest.raises(ValueError, match="no products"):
        contact_sheet(tmp_path / "washer" / "train", tmp_path / "x.png")
