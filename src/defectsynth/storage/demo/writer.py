"""Writing demo products as an MVTec AD tree, one product at a time via a hidden partial directory."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from defectsynth.storage.demo.products import DEMO_PRODUCTS
from defectsynth.storage.demo.sample import GOOD, DemoSample, check_size, render_sample
from defectsynth.storage.demo.sheet import contact_sheet

logger = logging.getLogger(__name__)

Job = tuple[str, str, int]  # (split, defect type, index)


def _save_png(array: np.ndarray, path: Path) -> None:
    """Save an RGB image or a bool mask (as 'L' with 0/255) as PNG, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array.astype(np.uint8) * 255 if array.dtype == bool else array
    # zlib level 3: level 6 (the default) takes 2.5x the time for about 6% smaller files.
    Image.fromarray(data).save(path, format="PNG", compress_level=3)


def _jobs(product: str, train_good: int, test_good: int, per_defect: int) -> Iterator[Job]:
    """Every image of a product in writing order: train/good, test/good, then each defect type."""
    yield from (("train", GOOD, i) for i in range(train_good))
    yield from (("test", GOOD, i) for i in range(test_good))
    for defect_type in DEMO_PRODUCTS[product].defect_types:
        yield from (("test", defect_type, i) for i in range(per_defect))


def _write_sample(root: Path, job: Job, sample: DemoSample) -> None:
    """Write one image, its mask (defects) and its foreground (objects) under a product root."""
    split, defect_type, index = job
    relative = Path(split) / defect_type / f"{index:03d}.png"
    _save_png(sample.image, root / relative)
    if defect_type != GOOD:
        _save_png(sample.mask, root / "ground_truth" / defect_type / f"{index:03d}_mask.png")
    if sample.foreground is not None:
        _save_png(sample.foreground, root / "foreground" / relative)


def _check_counts(**counts: int) -> None:
    """Reject image counts below one, naming the argument."""
    for name, value in counts.items():
        if value < 1:
            msg = f"{name} must be at least 1, got {value}"
            raise ValueError(msg)


def _check_products(out: Path, products: Sequence[str] | str | None) -> list[str]:
    """Resolve the product list (deduplicated, in order) and refuse unknown or already written ones."""
    if isinstance(products, str):
        products = [products]
    names = list(DEMO_PRODUCTS) if products is None else list(dict.fromkeys(products))
    if not names:
        msg = "products is empty: name at least one demo product"
        raise ValueError(msg)
    for name in names:
        if name not in DEMO_PRODUCTS:
            msg = f"unknown demo product {name!r}; known: {', '.join(DEMO_PRODUCTS)}"
            raise ValueError(msg)
        target = out / name
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            msg = f"{target} already exists and is not empty; remove it or choose another output directory"
            raise ValueError(msg)
    return names


def _write_product(out: Path, product: str, jobs: list[Job], *, seed: int, size: int, bar: tqdm) -> None:
    """Render a product into ``.<product>.partial`` and rename it into place once complete."""
    partial = out / f".{product}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        for job in jobs:
            _write_sample(partial, job, render_sample(product, *job, seed=seed, size=size))
            bar.update(1)
        target = out / product
        if target.is_dir():
            target.rmdir()  # checked empty before writing started
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_demo(
    out: Path,
    *,
    size: int = 128,
    seed: int = 0,
    train_good: int = 48,
    test_good: int = 16,
    per_defect: int = 9,
    products: Sequence[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Write procedural demo products as an MVTec AD tree under ``out``, plus ``contact_sheet.png``.

    Returns the product names written. Raises ValueError (naming the bad value) for ``size`` < 32,
    counts < 1, unknown products, or a product directory that already exists and is not empty.
    """
    out = Path(out)
    check_size(size)
    _check_counts(train_good=train_good, test_good=test_good, per_defect=per_defect)
    names = _check_products(out, products)
    plans = {name: list(_jobs(name, train_good, test_good, per_defect)) for name in names}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = sum(len(jobs) for jobs in plans.values())
    with tqdm(total=total, desc="demo images", unit="img", disable=not progress) as bar:
        for name, jobs in plans.items():
            _write_product(out, name, jobs, seed=seed, size=size, bar=bar)
            logger.info("wrote demo product %s (%d images) to %s", name, len(jobs), out / name)
    contact_sheet(out, out / "contact_sheet.png")
    logger.info("wrote %d demo images in %.1f s", total, time.perf_counter() - started)
    return names
