"""Faults a cluster really has, each on a real Ray cluster this test starts, and killed only there.

A generation actor killed by its pid, a worker node of a multi-node cluster removed, a Ray Train worker
killed mid-fit of a trainable generator, the generate driver killed: each job ends with exactly the
requested samples, none twice, no partial shard, and a manifest and card that describe them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from defectsynth.jobs.common import start
from defectsynth.jobs.finetune import finetune
from defectsynth.jobs.generate import generate
from defectsynth.platform.cluster import WORKER_ENV
from defectsynth.platform.config import Config, load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import setup_tracking
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.ray_cluster import TESTS, local_cluster
from helpers.ray_train import kill_train_workers, wait_for_first_checkpoint
from helpers.stamp_jobs import PER_TYPE, STAMP, TYPES, dataset_dir, stamp_config
from helpers.tiny_base import register_tiny_base
from helpers.tiny_diffusion import TINY_BASE_OVERRIDES
from test_generate_protocol import register_stamp
from test_shards import read_tar

pytestmark = pytest.mark.integration


def assert_exactly_the_requested_samples(dataset: Path) -> None:
    """Every requested sample once, nothing partial, and a manifest and card that list exactly the shards' samples."""
    keys = [key for shard in sorted((dataset / "shards").glob("*.tar")) for key in read_tar(shard)]
    assert len(keys) == len(set(keys)) == PER_TYPE * len(TYPES), "a sample is missing or written twice"
    assert not list((dataset / "shards").glob("*.partial"))
    manifest = read_manifest(resolve(dataset)).to_pylist()
    assert sorted(row["key"] for row in manifest) == sorted(keys)
    assert Counter(row["defect_type"] for row in manifest) == dict.fromkeys(TYPES, PER_TYPE)
    assert read_card(resolve(dataset))["samples"] == len(keys)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 180) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def own_processes(marker: str) -> list[psutil.Process]:
    """Descendants of this test process whose command line holds ``marker`` (Ray sets it to the actor's name)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def committed_shards(dataset: Path) -> list[Path]:
    return list((dataset / "shards").glob("*.tar"))


def generate_in_thread(cfg: Config, prepared: object) -> tuple[threading.Thread, list]:
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.extend(generate(cfg, prepared)), daemon=True)
    thread.start()
    return thread, outcomes


def test_a_killed_generation_actor_is_restarted_and_the_job_writes_each_sample_once(
    demo_root: Path, tmp_path: Path
) -> None:
    cfg = stamp_config(demo_root, tmp_path / "run")
    dataset = dataset_dir(cfg, "stamp")
    with local_cluster(STAMP):
        prepared = start(cfg)
        register_stamp(cfg, prepared)
        thread, outcomes = generate_in_thread(cfg, prepared)
        wait_for(lambda: committed_shards(dataset), "the first committed shard")
        (actor, *_) = wait_for(lambda: own_processes("GenerationActor"), "a generation actor")
        os.kill(actor.pid, signal.SIGKILL)
        thread.join(timeout=600)
    assert outcomes, "generate did not finish after the actor was killed"
    assert_exactly_the_requested_samples(dataset)


def test_a_worker_node_removed_mid_generation(demo_root: Path, tmp_path: Path) -> None:
    """Head (no CPU, the driver) and two 1-CPU worker nodes; the node running the only actor is removed."""
    cfg = stamp_config(demo_root, tmp_path / "run")
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"actors": 1})})
    dataset = dataset_dir(cfg, "stamp")
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), previous]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        runtime_env = {"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": STAMP}
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False)
        prepared = start(cfg)
        register_stamp(cfg, prepared)
        thread, outcomes = generate_in_thread(cfg, prepared)
        wait_for(lambda: committed_shards(dataset), "the first committed shard")
        (busy,) = wait_for(
            lambda: [a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Map" in a.class_name],
            "the generation actor",
        )
        cluster.remove_node(next(node for node in nodes if node.node_id == busy))
        thread.join(timeout=600)
        assert outcomes, "generate did not finish after its node was removed"
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("PYTHONPATH") if previous is None else os.environ.update(PYTHONPATH=previous)
    assert_exactly_the_requested_samples(dataset)


def test_a_killed_generate_driver_then_a_rerun_writes_only_the_missing_keys(demo_root: Path, tmp_path: Path) -> None:
    """A driver process (``helpers.stamp_driver``) killed after its first shard; the re-run completes the dataset."""
    cfg = stamp_config(demo_root, tmp_path / "run")
    config = tmp_path / "job.yaml"
    config.write_text(cfg.to_yaml())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "helpers.stamp_driver", str(config)]
    dataset = dataset_dir(cfg, "stamp")
    driver = subprocess.Popen(command, env=env)
    try:
        wait_for(lambda: committed_shards(dataset) or driver.poll() is not None, "the first committed shard", 300)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first = {p.name for p in committed_shards(dataset)}
    assert len(first) < PER_TYPE * len(TYPES) // 4, "the driver finished before it was killed"
    rerun = subprocess.run(command, env=env, timeout=600, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert first <= {p.name for p in committed_shards(dataset)}  # the killed run's shards were kept
    assert_exactly_the_requested_samples(dataset)


def test_a_killed_train_worker_resumes_a_generators_fit_where_it_checkpointed(demo_root: Path, tmp_path: Path) -> None:
    """cadiff on a tiny base, 20 steps, a checkpoint every 5: kill the worker after the first; the steps go on."""
    overrides = [
        f"data.root={demo_root}", f"workdir={tmp_path / 'run'}", "data.resolution=32", *TINY_BASE_OVERRIDES,
        "products=[wood]", "methods=[cadiff]", "evaluate.baselines=[]", "finetune.max_steps=20",
        "finetune.checkpoint_every=5", "generators.cadiff={batch_size: 2, saim_heads: 2}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    runs = cfg.workdir / "ray_results"
    with local_cluster():
        setup_tracking(cfg)
        prepared = prepare_dataset(cfg)
        register_tiny_base(cfg, prepared)  # the fit's restart is the subject: test_pretrain trains bases
        outcomes: list = []
        thread = threading.Thread(target=lambda: outcomes.extend(finetune(cfg, prepared)), daemon=True)
        thread.start()
        wait_for(lambda: list(runs.glob("finetune-wood-*")) if runs.is_dir() else [], "the fit's run", timeout=600)
        wait_for_first_checkpoint(runs, "finetune-wood-*", timeout=600)
        assert kill_train_workers(), "no training worker to kill"
        thread.join(timeout=900)
    assert outcomes, "finetune did not finish after the worker was killed"
    (fitted,) = outcomes
    steps = [m.value for m in MlflowClient(cfg.tracking_uri).get_metric_history(fitted.run_id, "step")]
    assert steps[-1] == 20 and 5 < steps[0] <= 20, f"the fit restarted from step {steps[0]}, not its checkpoint"
    assert steps == list(range(int(steps[0]), 21)), "the step counter does not continue"
