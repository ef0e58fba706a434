"""Progress bars for work items finished inside Ray Train workers: one bar per stage, in the driver.

A fit's driver only learns when the whole fit ends. Where a fit runs many items (the evaluate job trains
every detector run of a product in one fit; pretraining runs its VAE and U-Net steps), its rank 0 advances a
``ProgressBoard`` actor after each item, and the driver draws one bar per stage (a detector, a phase) from the
board's counts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ray
from tqdm import tqdm

BOARD_KEY = "_progress_board"
"""Where ``with_board`` puts the board's handle in a loop config."""
POLL_SECONDS = 2.0


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Counts finished items per stage; workers advance it, the driver reads it."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def advance(self, stage: str) -> None:
        """One more item of ``stage`` finished."""
        self.counts[stage] = self.counts.get(stage, 0) + 1

    def reach(self, stage: str, done: int) -> None:
        """``done`` items of ``stage`` have finished: for a worker that counts its own (a restart recounts)."""
        self.counts[stage] = done

    def read(self) -> dict[str, int]:
        """Items finished so far, by stage."""
        return dict(self.counts)


@contextmanager
def stage_bars(totals: Mapping[str, int], job: str, unit: str = "run") -> Iterator[ray.actor.ActorHandle]:
    """Yield a new board while one bar per stage (``<job> <stage>``, out of ``totals[stage]``) follows it."""
    board = ProgressBoard.remote()
    bars = {
        stage: tqdm(total=total, desc=f"{job} {stage}", unit=unit, position=i, mininterval=POLL_SECONDS)
        for i, (stage, total) in enumerate(totals.items())
    }
    stop = threading.Event()

    def refresh() -> None:
        for stage, done in ray.get(board.read.remote()).items():
            if stage in bars:
                bars[stage].update(min(done, bars[stage].total) - bars[stage].n)

    def follow() -> None:
        while not stop.wait(POLL_SECONDS):
            refresh()
        refresh()

    follower = threading.Thread(target=follow, name=f"{job}-progress", daemon=True)
    follower.start()
    try:
        yield board
    finally:
        stop.set()
        follower.join()
        for bar in bars.values():
            bar.close()
        ray.kill(board)


def with_board(config: dict[str, Any], board: ray.actor.ActorHandle | None) -> dict[str, Any]:
    """``config`` carrying ``board`` to the workers (unchanged when there is none)."""
    return config if board is None else {**config, BOARD_KEY: board}


def without_board(config: dict[str, Any]) -> tuple[dict[str, Any], ray.actor.ActorHandle | None]:
    """A worker's view of ``config``: the config as the job built it, and the board if it came with one."""
    rest = {key: value for key, value in config.items() if key != BOARD_KEY}
    return rest, config.get(BOARD_KEY)
