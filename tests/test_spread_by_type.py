"""``bench/spread_by_type.py`` and ``bench/base_draws.py`` on hand-built rows: per-type spreads, draws joined."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from defectsynth.evaluation.report import ResultRow

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A bench script as a module, its siblings importable."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``spread_by_type`` (it imports its sibling ``base_draws``)."""
    return load_bench("spread_by_type", monkeypatch)


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


def test_a_draw_joins_the_methods_its_run_lacks_from_another_run_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_bench("base_draws", monkeypatch)
    ours = [ResultRow("wood", "gen", "segmenter", {"pixel_ap": 0.4}, seed=0)]
    theirs = [ResultRow("wood", m, "segmenter", {"pixel_ap": 0.1}, seed=0) for m in ("gen", "croppaste")]
    joined = [(r.method, r.metrics["pixel_ap"]) for r in module.joined(ours, theirs)]
    assert joined == [("gen", 0.4), ("croppaste", 0.1)], "the run's own rows win; the other's add what it lacks"
