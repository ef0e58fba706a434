"""What Ray prints: none of its start-up lines, actor-pool or worker-pool notices by default, all with ``-v``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ACTOR_POOL = """
import glob, os, time
import ray
from defectsynth.platform.cluster import init_ray, leave_ray
from defectsynth.platform.config import RayConfig
init_ray(RayConfig(num_cpus=1, log_to_driver={verbose}))

class Identity:
    def __call__(self, batch):
        return batch

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

logs = ray._private.worker._global_node.get_logs_dir_path()
raylet_log = os.path.join(logs, "raylet.out")
print(ray.data.range(2).map_batches(Identity, concurrency=1).count())
actors = [Idle.remote() for _ in range(16)]  # 4x more workers starting than the cluster's one CPU
print(sum(ray.get([actor.ping.remote() for actor in actors])), "actors")
for _ in range(100):
    if "worker processes have been started" in open(raylet_log).read():
        break
    time.sleep(0.1)
time.sleep(2)  # the driver's error listener prints it a moment after the raylet logs it
print("raylet log has the worker-pool notice:", "worker processes have been started" in open(raylet_log).read())
notices = [p for p in glob.glob(os.path.join(logs, "python-core-driver-*.log")) if "max_restarts > 0" in open(p).read()]
print("driver log has the notice:", bool(notices))
leave_ray()  # Ray prints the repeats its deduplicator held back as it disconnects
print("left")
"""
NOTICE = "has constructor arguments in the object store and max_restarts > 0"
WORKER_POOL_NOTICE = "(raylet)"


def ray_output(*, verbose: bool) -> str:
    """Everything a fresh process prints while it joins a local cluster through ``init_ray``, runs an actor pool,
    starts 16 actors at once and leaves through ``leave_ray``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run(
        [sys.executable, "-c", ACTOR_POOL.format(verbose=verbose)], capture_output=True, text=True, env=env, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def test_ray_start_up_lines_and_pool_notices_stay_off_the_console_unless_verbose() -> None:
    quiet = ray_output(verbose=False)
    assert "Started a local Ray instance" not in quiet and "Token authentication is enabled" not in quiet, quiet
    assert NOTICE not in quiet and "driver log has the notice: True" in quiet, quiet
    assert WORKER_POOL_NOTICE not in quiet and "raylet log has the worker-pool notice: True" in quiet, quiet
    assert quiet.rstrip().endswith("left"), quiet  # the console is whole again after leave_ray
    verbose = ray_output(verbose=True)
    assert "Started a local Ray instance" in verbose and NOTICE in verbose, verbose
    assert "worker processes have been started" in verbose, verbose
