"""What Ray prints: none of its start-up lines or actor-pool notices by default, both with ``ray.log_to_driver``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ACTOR_POOL = """
import glob, os
import ray
from defectsynth.platform.cluster import init_ray, ray_notices_hidden
from defectsynth.platform.config import RayConfig
init_ray(RayConfig(num_cpus=1, log_to_driver={verbose}))

class Identity:
    def __call__(self, batch):
        return batch

with ray_notices_hidden(verbose={verbose}):
    print(ray.data.range(2).map_batches(Identity, concurrency=1).count())
logs = ray._private.worker._global_node.get_logs_dir_path()
notices = [p for p in glob.glob(os.path.join(logs, "python-core-driver-*.log")) if "max_restarts > 0" in open(p).read()]
print("driver log has the notice:", bool(notices))
ray.shutdown()
"""
NOTICE = "has constructor arguments in the object store and max_restarts > 0"


def ray_output(*, verbose: bool) -> str:
    """Everything a fresh process prints while it starts a local cluster through ``init_ray`` and runs an actor pool."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run(
        [sys.executable, "-c", ACTOR_POOL.format(verbose=verbose)], capture_output=True, text=True, env=env, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def test_ray_start_up_lines_and_actor_pool_notices_stay_off_the_console_unless_verbose() -> None:
    quiet = ray_output(verbose=False)
    assert "Started a local Ray instance" not in quiet and "Token authentication is enabled" not in quiet, quiet
    assert NOTICE not in quiet and "driver log has the notice: True" in quiet, quiet
    verbose = ray_output(verbose=True)
    assert "Started a local Ray instance" in verbose and NOTICE in verbose, verbose
