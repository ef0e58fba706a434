"""A local Ray cluster for job tests whose workers import ``helpers`` (test generators registered by a hook).

Ray workers start fresh interpreters, so a test generator registered in the driver is unknown to them:
``local_cluster`` puts tests/ on the workers' PYTHONPATH and names a ``worker_process_setup_hook`` (such as
``helpers.stamp_generator.register``) that each worker runs before its first task.

Example:
    >>> with local_cluster("helpers.stamp_generator.register"):  # doctest: +SKIP
    ...     generate(cfg, prepared)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from defectsynth.platform.cluster import WORKER_ENV

TESTS = Path(__file__).parents[1]


@contextmanager
def local_cluster(
    setup_hook: str | None = None, *, num_cpus: int = 2, log_to_driver: bool = False, **init_kwargs: Any
) -> Iterator[None]:
    """Run the block on a fresh local Ray cluster; Ray is shut down and PYTHONPATH restored however it ends.

    Workers get ``WORKER_ENV`` (as ``init_ray`` gives them) and, when named, ``setup_hook``; ``init_kwargs``
    go to ``ray.init`` as they are.
    """
    runtime_env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if setup_hook is not None:
        runtime_env["worker_process_setup_hook"] = setup_hook
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), previous] if previous else [str(TESTS)])
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            runtime_env=runtime_env,
            **init_kwargs,
        )
        yield
    finally:
        ray.shutdown()
        restore("PYTHONPATH", previous)


def restore(name: str, value: str | None) -> None:
    """Set environment variable ``name`` back to ``value``; None means it was unset."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
