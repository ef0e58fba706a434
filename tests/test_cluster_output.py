"""What starting Ray prints: nothing of Ray's own by default, its start-up lines with ``ray.log_to_driver``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

START = """
import ray
from defectsynth.platform.cluster import init_ray
from defectsynth.platform.config import RayConfig
init_ray(RayConfig(num_cpus=1, log_to_driver={verbose}))
ray.shutdown()
"""


def ray_start_output(*, verbose: bool) -> str:
    """Everything a fresh process prints while it starts and stops a local cluster through ``init_ray``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run(
        [sys.executable, "-c", START.format(verbose=verbose)], capture_output=True, text=True, env=env, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def test_starting_ray_prints_none_of_its_start_up_lines_unless_verbose() -> None:
    quiet = ray_start_output(verbose=False)
    assert "Started a local Ray instance" not in quiet and "Token authentication is enabled" not in quiet, quiet
    assert "Started a local Ray instance" in ray_start_output(verbose=True)
