"""The data step every job starts with: demo data if asked for, read and validate, the split manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from defectsynth.platform.config import Config
from defectsynth.storage.demo import write_demo
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import SplitManifest, ensure_split

logger = logging.getLogger(__name__)

SPLIT_NAME = "split.json"


@dataclass(frozen=True)
class PreparedData:
    """The validated products of a run and the split they are used under."""

    products: list[ProductData]
    split: SplitManifest
    split_path: Path


def ensure_demo_data(cfg: Config, *, progress: bool = False) -> None:
    """Write the procedural demo products to ``data.root`` when ``data.demo`` is set and it is absent."""
    demo = cfg.data.demo
    root = cfg.data.root
    if demo is None or (root.is_dir() and any(root.iterdir())):
        return
    logger.info("making demo products in %s", root)
    write_demo(
        root,
        size=demo.size,
        seed=demo.seed,
        train_good=demo.train_good,
        test_good=demo.test_good,
        per_defect=demo.per_defect,
        progress=progress,
    )


def prepare_dataset(cfg: Config, *, progress: bool = False) -> PreparedData:
    """Read and validate the configured products; write or check ``<workdir>/split.json``."""
    ensure_demo_data(cfg, progress=progress)
    products = read_dataset(
        cfg.data.root,
        cfg.data.layout,
        cfg.products,
        options=cfg.data.layout_options,
        progress=progress,
        max_pixels=cfg.data.max_pixels,
    )
    split_path = cfg.workdir / SPLIT_NAME
    manifest = ensure_split(split_path, products, cfg.split)
    return PreparedData(products=products, split=manifest, split_path=split_path)
