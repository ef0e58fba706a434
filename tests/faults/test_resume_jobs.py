"""Resuming the generate job on a real Ray cluster: a re-fit is refused, a lower per_type leaves no surplus."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectsynth.jobs.common import start
from defectsynth.jobs.generate import generate
from defectsynth.storage.errors import DatasetError
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.ray_cluster import local_cluster
from helpers.stamp_jobs import PER_TYPE, STAMP, TYPES, dataset_dir, stamp_config
from test_generate_protocol import register_stamp
from test_shards import read_tar

pytestmark = pytest.mark.integration


def test_generate_after_a_refit_is_refused_and_a_lower_per_type_drops_the_surplus(
    demo_root: Path, tmp_path: Path
) -> None:
    cfg = stamp_config(demo_root, tmp_path / "run", delay=0.0)
    dataset = dataset_dir(cfg, "stamp")
    with local_cluster(STAMP):
        prepared = start(cfg)
        register_stamp(cfg, prepared)
        generate(cfg, prepared)
        fewer = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"per_type": 2})})
        (outcome,) = generate(fewer, prepared)
        assert outcome.written == 0 and read_card(resolve(dataset))["samples"] == 2 * len(TYPES)
        keys = [key for shard in (dataset / "shards").glob("*.tar") for key in read_tar(shard)]
        assert sorted(keys) == sorted(row["key"] for row in read_manifest(resolve(dataset)).to_pylist())
        assert len(keys) == 2 * len(TYPES) < PER_TYPE * len(TYPES)
        register_stamp(cfg, prepared)  # a re-fit: version 2 becomes the candidate
        with pytest.raises(DatasetError, match="made with model_version 1; this run has model_version 2"):
            generate(cfg, prepared)
    assert read_card(resolve(dataset))["samples"] == 2 * len(TYPES)  # nothing was written by the refused run
