"""One writer per dataset, one model per dataset, no surplus, and a manifest after a failure (real tars)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defectsynth.storage.dataset_identity import IDENTITY_FILE
from defectsynth.storage.dataset_lock import LOCK_FILE
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.errors import DatasetError
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.samples import make_sample
from test_shards import read_tar

TESTS = Path(__file__).resolve().parents[1]


def _manifest_keys(root: Path) -> list[str]:
    return sorted(row["key"] for row in read_manifest(resolve(root)).to_pylist())


def _shard_keys(root: Path) -> list[str]:
    return sorted(key for shard in (root / "shards").glob("*.tar") for key in read_tar(shard))


def _start_slow_writer(root: Path) -> subprocess.Popen[bytes]:
    """A writer in another process, 60 samples at 0.05 s each, shards of 5; returns once it holds the lock."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    process = subprocess.Popen([sys.executable, "-m", "helpers.samples", str(root), "60", "5", "0.05"], env=env)
    deadline = time.monotonic() + 120
    while not list((root / "shards").glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def test_a_second_writer_is_refused_naming_the_holder_then_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    process = _start_slow_writer(tmp_path)
    try:
        partials = list((tmp_path / "shards").glob("*.partial"))
        with pytest.raises(DatasetError, match=rf"host {socket.gethostname()} pid {process.pid} since") as info:
            DatasetWriter(tmp_path, maxcount=5)
        assert LOCK_FILE in str(info.value)
        assert all(p.exists() or p.with_suffix("").exists() for p in partials)  # its open shard was not deleted
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with DatasetWriter(tmp_path, maxcount=5) as writer:  # the holder is dead: its lock is stale
        for index in range(60):
            writer.write(make_sample(index))
    assert _manifest_keys(tmp_path) == _shard_keys(tmp_path) == sorted(make_sample(i).key for i in range(60))
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(("age", "refused"), [(10.0, True), (7200.0, False)])
def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path: Path, age: float, refused: bool) -> None:
    (tmp_path / "shards").mkdir(parents=True)
    beat = time.time() - age
    holder = {"host": "gpu-node-7", "pid": 4242, "token": "x", "started": beat, "heartbeat": beat}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    if refused:
        with pytest.raises(DatasetError, match="host gpu-node-7 pid 4242"):
            DatasetWriter(tmp_path)
    else:
        with DatasetWriter(tmp_path) as writer:
            writer.write(make_sample(0))
        assert _manifest_keys(tmp_path) == [make_sample(0).key]


def test_a_failed_run_keeps_its_shards_described_by_a_manifest_and_card(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="generation failed"), DatasetWriter(tmp_path, maxcount=5) as writer:
        for index in range(12):
            writer.write(make_sample(index))
        msg = "generation failed"
        raise RuntimeError(msg)
    expected = sorted(make_sample(i).key for i in range(10))  # two complete shards; the third was open
    assert _manifest_keys(tmp_path) == _shard_keys(tmp_path) == expected
    assert read_card(resolve(tmp_path))["samples"] == 10
    assert not list((tmp_path / "shards").glob("*.partial")) and not (tmp_path / LOCK_FILE).exists()


def test_resuming_with_another_model_version_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    first = {"wood": {"model_version": "1", "settings_digest": "aaaa"}}
    with DatasetWriter(tmp_path, identity=first) as writer:
        for index in range(4):
            writer.write(make_sample(index))
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    refit = {"wood": {"model_version": "2", "settings_digest": "aaaa"}}
    with pytest.raises(DatasetError, match="wood samples were made with model_version 1; this run has model_version 2"):
        DatasetWriter(tmp_path, identity=refit)
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == before
    other_settings = {"wood": {"model_version": "1", "settings_digest": "bbbb"}}
    with pytest.raises(DatasetError, match="settings_digest aaaa; this run has settings_digest bbbb"):
        DatasetWriter(tmp_path, identity=other_settings)
    pill = {"pill": {"model_version": "5", "settings_digest": "cccc"}}  # another product joins: fine
    with DatasetWriter(tmp_path, identity=pill):
        pass
    assert set(json.loads((tmp_path / IDENTITY_FILE).read_text())) == {"wood", "pill"}


def test_a_dataset_without_identity_file_is_checked_against_its_samples(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path) as writer:  # make_sample records model_version "1"
        writer.write(make_sample(0))
    with pytest.raises(DatasetError, match="model_version 1; this run has model_version 3"):
        DatasetWriter(tmp_path, identity={"wood": {"model_version": "3", "settings_digest": "x"}})


def test_a_lower_per_type_removes_the_surplus_from_shards_manifest_and_card(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path, maxcount=5) as writer:
        for index in range(30):
            writer.write(make_sample(index))
        writer.write(make_sample(100, product="pill"))
    wanted = [make_sample(i).key for i in range(12)]
    with DatasetWriter(tmp_path, maxcount=5) as writer:
        removed = writer.retain(wanted, ["wood"])
    assert sorted(removed) == sorted(make_sample(i).key for i in range(12, 30))
    kept = sorted([*wanted, make_sample(100, product="pill").key])  # another product's samples stay
    assert _manifest_keys(tmp_path) == _shard_keys(tmp_path) == kept
    assert read_card(resolve(tmp_path))["samples"] == 13
