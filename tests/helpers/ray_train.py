"""Fault injection for Ray Train tests: wait for a run's first checkpoint, then kill its workers."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

import psutil


def wait_for_first_checkpoint(
    runs: Path, pattern: str, *, exclude: Collection[Path] = (), timeout: float = 300
) -> None:
    """Return once a run under ``runs`` matching ``pattern`` (and not in ``exclude``) has a registered checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [d for d in runs.glob(pattern) if d not in exclude]
        snapshot = fresh[0] / "checkpoint_manager_snapshot.json" if fresh else None
        if snapshot and snapshot.exists() and '"checkpoint_dir_name"' in snapshot.read_text():
            return
        time.sleep(0.2)


def kill_train_workers() -> int:
    """SIGKILL the Ray Train workers of this test's own cluster (descendants of this process); returns how many.

    Workers of other Ray clusters on the machine (another test session, a benchmark) are left alone.
    """
    own = psutil.Process().children(recursive=True)
    workers = [p for p in own if "RayTrainWorker" in " ".join(p.cmdline())]
    for process in workers:
        process.kill()
    return len(workers)
