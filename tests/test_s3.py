"""Datasets on S3: a real moto S3 server on 127.0.0.1 in a subprocess, written to through pyarrow.

Nothing here may reach AWS: credentials are fake, the endpoint is the local server, the shared
config and credentials files point nowhere and instance metadata lookups are disabled.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from defectsynth.storage import stream
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.keys import derive_key
from defectsynth.storage.sample import GeneratorInfo, Sample, SampleMetadata, encode_sample
from helpers.servers import free_port, serving

pytestmark = pytest.mark.integration

pytest.importorskip("moto.server", reason="moto[server] is in the dev extra: pip install -e '.[dev]'")

BUCKET = "defectsynth-test"
SIZE = 32
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server running in its own process for this module."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, f"{url}/moto-api/", log, env={**os.environ, **FAKE_ENV}, timeout=20):
        yield url


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[pafs.S3FileSystem]:
    """A pyarrow filesystem on the local server, with a fresh empty bucket (fake credentials in env)."""
    for name, value in FAKE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )
    fs.create_dir(BUCKET)
    yield fs
    fs.delete_dir(BUCKET)


def _uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _sample(index: int, product: str = "wood") -> Sample:
    rng = np.random.default_rng(index)
    image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[4 : 8 + index % 8, 6:20] = True
    method = "perlin"
    key = derive_key(product, method, "crack", {"seed": 7, "sample_index": index})
    metadata = SampleMetadata(
        key=key,
        product=product,
        defect_type="crack",
        intensity=0.5,
        generator=GeneratorInfo(method=method),
        seed=7,
    )
    return Sample(image=image, mask=mask, metadata=metadata, cond_mask=mask if index % 2 else None)


def _files(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return {
        info.path.removeprefix(f"{BUCKET}/{prefix}/"): info.size
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    }


def test_write_and_resume_on_s3(s3: pafs.S3FileSystem, endpoint: str) -> None:
    samples = [_sample(i) for i in range(10)]

    with DatasetWriter(_uri(endpoint, "ds"), maxcount=3) as writer:
        for sample in samples[:7]:
            assert writer.write(sample)
    first = _files(s3, "ds")
    assert sorted(first) == [
        "dataset.json",
        "manifest.parquet",
        "shards/wood-perlin-000000.tar",
        "shards/wood-perlin-000001.tar",
        "shards/wood-perlin-000002.tar",
    ]
    card = json.loads(s3.open_input_stream(f"{BUCKET}/ds/dataset.json").read())
    assert card["samples"] == 7
    assert card["counts"] == {"wood": {"crack": 7}}

    # Resume through an explicit filesystem: only the three missing keys are written, in new shards.
    writer = DatasetWriter(f"{BUCKET}/ds", maxcount=3, filesystem=s3)
    assert all(sample.key in writer for sample in samples[:7])
    for sample in samples:
        writer.write(sample)
    card = writer.close()
    assert (writer.written, writer.skipped) == (3, 7)
    assert card["samples"] == 10

    second = _files(s3, "ds")
    assert sorted(set(second) - set(first)) == ["shards/wood-perlin-000003.tar"]
    assert {name: second[name] for name in first if name.startswith("shards/")} == {
        name: size for name, size in first.items() if name.startswith("shards/")
    }
    assert not any(name.endswith(".partial") for name in second)
    with s3.open_input_file(f"{BUCKET}/ds/manifest.parquet") as handle:
        manifest = pq.read_table(handle)
    assert sorted(manifest.column("key").to_pylist()) == sorted(s.key for s in samples)
    assert manifest.column("shard").to_pylist().count("wood-perlin-000003.tar") == 3


def test_stream_reads_back_every_sample_from_s3(s3: pafs.S3FileSystem, endpoint: str) -> None:
    samples = [_sample(i) for i in range(8)] + [_sample(i, product="fabric") for i in range(3)]
    with DatasetWriter(_uri(endpoint, "ds"), maxcount=4) as writer:
        for sample in samples:
            writer.write(sample)

    streamed = list(stream(_uri(endpoint, "ds"), decode=False))
    assert len(streamed) == len(samples)
    by_key = {_key_of(item): item for item in streamed}
    assert sorted(by_key) == sorted(s.key for s in samples)
    for sample in samples:
        item = by_key[sample.key]
        encoded = encode_sample(sample)
        assert {name: bytes(item[name]) for name in encoded.members if name != "json"} == {
            name: data for name, data in encoded.members.items() if name != "json"
        }
        assert json.loads(item["json"])["key"] == sample.key

    decoded = list(stream(_uri(endpoint, "ds"), products="fabric"))
    assert sorted(item["key"] for item in decoded) == sorted(s.key for s in samples[8:])
    assert all(tuple(item["image"].shape) == (3, SIZE, SIZE) for item in decoded)


def _key_of(item: dict[str, Any]) -> str:
    return str(item.get("__key__") or json.loads(item["json"])["key"])
