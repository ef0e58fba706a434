"""Per-stage progress bars fed by work that finishes inside Ray workers."""

from __future__ import annotations

import pytest
import ray

from defectsynth.jobs.progress_board import BOARD_KEY, stage_bars, with_board, without_board
from helpers.ray_cluster import local_cluster


@ray.remote(num_cpus=0)
def finish(config: dict, stages: list[str]) -> dict:
    """A stand-in worker loop: advances the board it was given once per item, as evaluate_worker does."""
    rest, board = without_board(config)
    for stage in stages:
        board.advance.remote(stage)
    return rest


def test_config_carries_the_board_and_the_worker_gets_the_config_back() -> None:
    assert with_board({"a": 1}, None) == {"a": 1}
    config = with_board({"a": 1}, "handle")
    assert config == {"a": 1, BOARD_KEY: "handle"}
    assert without_board(config) == ({"a": 1}, "handle")
    assert without_board({"a": 1}) == ({"a": 1}, None)


@pytest.mark.integration
def test_each_stage_bar_counts_what_the_workers_finished(capsys: pytest.CaptureFixture[str]) -> None:
    with local_cluster():
        with stage_bars({"segmenter": 3, "classifier": 1}, "evaluate") as board:
            config = with_board({"product": "wood"}, board)
            assert ray.get(finish.remote(config, ["segmenter", "segmenter", "classifier"])) == {"product": "wood"}
            ray.get(finish.remote(config, ["segmenter"]))
            assert ray.get(board.read.remote()) == {"segmenter": 3, "classifier": 1}
            ray.get(board.reach.remote("classifier", 1))  # a worker that counts its own sets the count
            assert ray.get(board.read.remote()) == {"segmenter": 3, "classifier": 1}
        err = capsys.readouterr().err
    assert "evaluate segmenter: 100%" in err and "3/3" in err
    assert "evaluate classifier: 100%" in err and "1/1" in err
