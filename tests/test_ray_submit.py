"""``ray job submit`` runs a job unchanged against a cluster started with ``ray start --head``.

In its own module so that no other Ray cluster of the test session is alive beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from defectsynth.storage.demo import write_demo
from helpers.servers import free_port
from test_jobs import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("submit") / "data"
    write_demo(root, size=64, train_good=10, test_good=4, per_defect=4, products=["wood"], progress=False)
    return root


def _stop_cluster(temp: Path) -> None:
    """Stop only the Ray processes of the cluster this test started (``ray stop`` would kill them all)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(str(temp) in part for part in process.info["cmdline"] or []):
            process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit(demo_root: Path, tmp_path: Path) -> None:
    """The finetune job, unchanged, through ``ray job submit`` against a ``ray start --head`` cluster."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}"  # a short path: Ray's socket names have a length limit
    start = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        # the agents' default ports (52365, ...) clash with any other Ray on the machine: no job agent would start
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        config = tmp_path / "job.yaml"
        workdir = tmp_path / "run"
        config.write_text(json.dumps({"data": {"root": str(demo_root)}}))
        sets = [a for s in tiny_config(demo_root, workdir, ("methods=[perlin]",)) for a in ("--set", s)]
        repo = Path(__file__).resolve().parents[1]
        submit = [
            str(bin_dir / "ray"),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            str(repo),
            "--",
            sys.executable,
            "-m",
            "defectsynth.jobs.finetune",
            "--config",
            str(config),
            *sets,
        ]
        deadline = time.monotonic() + 300  # the job agent comes up seconds after `ray start`, minutes when loaded
        while True:
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
            if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "registered defectsynth-wood-perlin version 1" in done.stdout + done.stderr
        client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        assert client.get_model_version_by_alias("defectsynth-wood-perlin", "candidate")
    finally:
        _stop_cluster(temp)
