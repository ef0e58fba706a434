"""Fixtures of the fault tests: a small demo product, and ``stamp`` registered in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from defectsynth.storage.demo import write_demo
from helpers.stamp_generator import registered


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    write_demo(root, size=64, train_good=6, test_good=2, per_defect=3, products=["wood"], progress=False)
    return root


@pytest.fixture(autouse=True)
def stamp_registered() -> Iterator[None]:
    with registered():
        yield
