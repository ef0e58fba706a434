"""Bad image files in a product tree: each is converted correctly or refused with the file named.

The malformed trees of every layout (missing, non-binary and mis-sized masks, truncated PNGs, empty
types) are in ``tests/test_layouts.py``; these are the pixel formats and sizes that reach the decoder.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectsynth.platform.config import ConfigError, load_config
from defectsynth.storage.errors import DatasetError
from defectsynth.storage.imageio import MAX_PIXELS, read_image
from defectsynth.storage.layouts import read_dataset
from helpers.trees import SIZE, make_mvtec, write_image


def _error(root: Path, **kwargs: int) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        read_dataset(root, "mvtec", **kwargs)
    return info.value


def _refused(path: Path, match: str) -> None:
    """``read_image`` refuses ``path`` with a DatasetError that names it and matches ``match``."""
    with pytest.raises(DatasetError, match=match) as info:
        read_image(path)
    assert info.value.path == path


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = read_image(path)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1
    assert (pixels == 255).mean() < 0.01  # Pillow's own convert("RGB") makes 99% of them 255


def test_eight_bit_grey_and_rgba_become_rgb(tmp_path: Path) -> None:
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(read_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgba[..., :3])  # colour kept, alpha dropped


def test_float_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((SIZE, SIZE), np.float32), mode="F").save(path)
    _refused(path, "floating-point image")


def test_image_past_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    path = base / "train/good/002.png"
    write_image(path, size=64)
    err = _error(tmp_path, max_pixels=SIZE * SIZE)
    assert err.path == path
    assert "64x64 = 4096 pixels, over the limit of 256" in str(err) and "before decoding" in str(err)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    """A PNG whose header claims 100000 x 100000 pixels and holds none: refused, never decoded."""
    path = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR's width and height
    data[29:33] = zlib.crc32(data[12:29]).to_bytes(4, "big")  # and its checksum
    path.write_bytes(bytes(data))
    _refused(path, "over the limit|refused before decoding")


def test_truncated_jpeg(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    path = base / "test/crack/001.png"
    path.unlink()
    jpeg = base / "test/crack/001.jpg"
    write_image(jpeg, size=64, suffix_format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    err = _error(tmp_path)
    assert err.path == jpeg
    assert "truncated" in str(err)


def test_duplicate_ids_name_both_files(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    write_image(base / "train/good/001.jpg", suffix_format="JPEG")
    with pytest.raises(DatasetError) as info:
        read_dataset(tmp_path, "mvtec", validate=False)
    message = str(info.value)
    assert "duplicate image id 'train/good/001'" in message
    assert "001.png" in message and "001.jpg" in message


def test_pixel_limit_setting_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_pixels"):
        load_config(None, [f"data.root={tmp_path}", f"data.max_pixels={MAX_PIXELS + 1}"])
    assert load_config(None, [f"data.root={tmp_path}", "data.max_pixels=4096"]).data.max_pixels == 4096
