"""Shard writing: round trip, limits, commit by rename, resume after a kill, refused keys."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.errors import DatasetError, MissingFileError, ShardError
from defectsynth.storage.fs import resolve
from defectsynth.storage.keys import check_key, check_member_name, derive_key
from defectsynth.storage.manifest import manifest_shard_paths, read_card, read_manifest
from defectsynth.storage.sample import decode_png, encode_sample
from defectsynth.storage.shard_writer import ShardWriter
from helpers.samples import make_sample


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> extension -> bytes, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_round_trip_1000_samples(tmp_path: Path) -> None:
    written = [make_sample(i) for i in range(1000)]
    with DatasetWriter(tmp_path, maxcount=128) as writer:
        for sample in written:
            assert writer.write(sample)
    shards = sorted((tmp_path / "shards").iterdir())
    assert [p.name for p in shards] == [f"wood-perlin-{i:06d}.tar" for i in range(8)]
    read = {k: v for shard in shards for k, v in read_tar(shard).items()}
    assert len(read) == 1000
    for sample in written:
        members = read[sample.key]
        assert np.array_equal(decode_png(members["png"]), sample.image)
        mask = decode_png(members["mask.png"])
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, sample.mask)
        assert ("cond.png" in members) == (sample.cond_mask is not None)
        meta = json.loads(members["json"])
        assert meta["key"] == sample.key and meta["mask_area"] == int(sample.mask.sum())
        assert meta["intensity"] == sample.metadata.intensity
    manifest = read_manifest(resolve(tmp_path)).to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(s.key for s in written)
    assert {r["shard"] for r in manifest} == {p.name for p in shards}
    card = read_card(resolve(tmp_path))
    assert card["samples"] == 1000 and sum(card["counts"]["wood"].values()) == 1000
    assert card["qc_rejected"] == sum(1 for s in written if not s.metadata.qc.passed)


def test_manifest_has_metadata_columns(tmp_path: Path) -> None:
    sample = make_sample(3)
    sample.metadata.__pydantic_extra__["sharpness"] = 0.25  # a method-specific field
    with DatasetWriter(tmp_path) as writer:
        writer.write(sample)
    (row,) = read_manifest(resolve(tmp_path)).to_pylist()
    assert row["product"] == "wood" and row["label"] == 1 and row["method"] == "perlin"
    assert row["bbox"] == list(json.loads(read_tar(next((tmp_path / "shards").iterdir()))[sample.key]["json"])["bbox"])
    assert row["sharpness"] == 0.25 and row["qc_passed"] is True and row["has_cond"] is False


def test_shard_limits(tmp_path: Path) -> None:
    encoded = [encode_sample(make_sample(i, size=32)) for i in range(20)]
    limit = 3 * encoded[0].nbytes
    with ShardWriter(resolve(tmp_path), "s", "p", maxcount=100, maxsize=limit) as writer:
        for sample in encoded:
            writer.write(sample)
    assert len(writer.committed) > 5
    for info in writer.committed:
        assert info.nbytes <= limit or len(info.keys) == 1
        assert (tmp_path / "s" / info.name).stat().st_size <= info.nbytes + 1024 * 10  # tar end blocks
    assert sum(len(i.keys) for i in writer.committed) == 20


def test_tars_are_reproducible(tmp_path: Path) -> None:
    for run in ("a", "b"):
        with DatasetWriter(tmp_path / run, maxcount=10) as writer:
            for i in range(25):
                writer.write(make_sample(i))
    for shard in (tmp_path / "a/shards").iterdir():
        assert shard.read_bytes() == (tmp_path / "b/shards" / shard.name).read_bytes()
    assert read_card(resolve(tmp_path / "a"))["digest"] == read_card(resolve(tmp_path / "b"))["digest"]


def test_shard_appears_only_when_complete(tmp_path: Path) -> None:
    writer = ShardWriter(resolve(tmp_path), ".", "p", maxcount=3)
    writer.write(encode_sample(make_sample(0)))
    assert [p.name for p in tmp_path.iterdir()] == ["p-000000.tar.partial"]
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_resume_adds_only_missing(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path, maxcount=8) as writer:
        for i in range(20):
            writer.write(make_sample(i))
    first_digest = read_card(resolve(tmp_path))["digest"]
    with DatasetWriter(tmp_path, maxcount=8) as writer:
        for i in range(30):
            writer.write(make_sample(i))
    assert (writer.written, writer.skipped) == (10, 20)
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names[-1] == "wood-perlin-000004.tar"  # numbering continues after 000000-000002
    keys = [r["key"] for r in read_manifest(resolve(tmp_path)).to_pylist()]
    assert len(keys) == len(set(keys)) == 30
    assert read_card(resolve(tmp_path))["digest"] != first_digest


def test_killed_writer_leaves_only_complete_shards_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    process = subprocess.Popen([sys.executable, "-m", "helpers.samples", str(tmp_path), "60", "5", "0.05"], env=env)
    shards = tmp_path / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = [p.name for p in shards.iterdir()] if shards.is_dir() else []
        complete = [n for n in names if n.endswith(".tar")]
        if len(complete) >= 2 and any(n.endswith(".partial") for n in names):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    complete = sorted(shards.glob("*.tar"))
    assert complete, "the writer was killed before committing any shard"
    assert not (tmp_path / "manifest.parquet").exists()
    for shard in complete:
        assert len(read_tar(shard)) == 5  # every visible shard is whole
    with DatasetWriter(tmp_path, maxcount=5) as writer:
        for i in range(60):
            writer.write(make_sample(i))
    assert writer.skipped == 5 * len(complete) and writer.written == 60 - writer.skipped
    assert not list(shards.glob("*.partial"))
    keys = [k for shard in shards.glob("*.tar") for k in read_tar(shard)]
    assert sorted(keys) == sorted(make_sample(i).key for i in range(60))
    assert read_manifest(resolve(tmp_path)).num_rows == 60


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("../evil", "contains '..'"),
        ("/abs", "starts with '/'"),
        ("nul\x00byte", "contains NUL"),
        ("a..b", "contains '..'"),
        ("has.dot", "letters, digits"),
        ("", "empty"),
    ],
)
def test_unsafe_keys_are_refused(key: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace(".", r"\.")):
        check_key(key)


@pytest.mark.parametrize("name", ["../x.png", "/x.png", "a/b.png", "x\x00.png", "noextension"])
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        check_member_name(name)


def test_writer_refuses_unsafe_key_before_writing(tmp_path: Path) -> None:
    sample = make_sample(0)
    sample.metadata.key = "../../etc/passwd"
    with pytest.raises(ValueError, match="refused"), DatasetWriter(tmp_path) as writer:
        writer.write(sample)
    assert list((tmp_path / "shards").iterdir()) == []


def test_keys_follow_the_request() -> None:
    request = {"seed": 3, "sample_index": 1, "source_image": "train/good/004"}
    assert derive_key("wood", "perlin", "crack", request) == derive_key("wood", "perlin", "crack", dict(request))
    assert derive_key("wood", "perlin", "crack", request) != derive_key("wood", "seas", "crack", request)
    assert derive_key("pipe fryum", "perlin", "a+b", request).startswith("pipe-fryum_a-b_")


def test_manifest_and_card_errors_name_the_file(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path, maxcount=2) as writer:
        writer.write(make_sample(0))
    location = resolve(tmp_path)
    assert read_manifest(location, columns=["key"]).column_names == ["key"]
    with pytest.raises(DatasetError, match="manifest.parquet lacks the column"):
        read_manifest(location, columns=["key", "nope"])
    (tmp_path / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=f"{tmp_path}: manifest.parquet is unreadable"):
        read_manifest(location)
    (tmp_path / "manifest.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: manifest.parquet is missing") as caught:
        read_manifest(location)
    assert isinstance(caught.value, DatasetError)
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="dataset.json is not a JSON object"):
        read_card(location)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json is unreadable"):
        read_card(location)
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(MissingFileError, match="dataset.json is missing"):
        read_card(location)


def test_manifest_shard_paths_name_the_manifest_and_every_missing_shard(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path, maxcount=1) as writer:
        writer.write(make_sample(0))
        writer.write(make_sample(1))
    location = resolve(tmp_path)
    shards = sorted(path.name for path in (tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 2
    assert manifest_shard_paths(location, shards) == {name: location.path("shards", name) for name in shards}
    (tmp_path / "shards" / shards[1]).rename(tmp_path / "shards" / f"{shards[1]}.partial")
    problem = f"manifest.parquet names shard(s) not complete under shards/: {sorted([shards[1], '../escape.tar'])}"
    with pytest.raises(DatasetError, match=re.escape(f"{location.uri}: {problem}")):
        manifest_shard_paths(location, [*shards, "../escape.tar"])


@pytest.mark.parametrize(
    "error",
    [DatasetError("/d/manifest.parquet", "unreadable"), MissingFileError("/d", "gone"), ShardError("a.tar", "bad")],
)
def test_dataset_errors_survive_pickling(error: Exception) -> None:
    # Ray sends a worker's exception to the driver pickled: it must come back whole
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
