"""``bench/spread_by_type.py``: each (product, method, type)'s seed spread beside its fidelity, on hand-built rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from defectsynth.evaluation.report import ResultRow

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The bench script as a module (it imports its sibling ``base_draws``)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("spread_by_type", BENCH / "spread_by_type.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows() -> list[ResultRow]:
    """Two seeds that disagree on holes and agree on cracks, and the dataset's appearance distances."""
    seeds = [
        ResultRow("wood", "gen", "segmenter", {"pixel_ap.hole": hole, "pixel_ap.crack": 0.5}, seed=seed)
        for seed, hole in ((0, 0.1), (1, 0.9))
    ]
    generation = ResultRow(
        "wood", "gen", "generation", {"appearance_distance.hole": 1.9, "appearance_distance.crack": 0.5}
    )
    return [*seeds, generation]


def test_each_type_gets_its_seed_spread_and_appearance_distance(bench: ModuleType) -> None:
    by_type = {r["type"]: r for r in bench.pairs("run", rows(), "segmenter")}
    assert by_type["hole"]["ap_mean"] == pytest.approx(0.5) and by_type["hole"]["ap_std"] == pytest.approx(0.5657)
    assert by_type["hole"]["appearance"] == 1.9 and by_type["crack"]["ap_std"] == 0


def test_the_type_mean_spread_with_and_without_one_type(bench: ModuleType) -> None:
    (spread,) = bench.type_mean_spreads("run", rows(), "segmenter", without="hole")
    assert spread["type_mean"] == pytest.approx(0.5)
    assert spread["std"] == pytest.approx(0.2828) and spread["std_without"] == 0
