"""Credentials in URIs never reach a log line, the resolved config, a dataset card or MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from defectsynth.platform.config import load_config, save_resolved
from defectsynth.platform.logs import RedactingFormatter
from defectsynth.platform.tracking import dataset_input
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import CARD
from defectsynth.storage.redact import redact, redact_tree

SECRET = "hunter2"
TRACKING = f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow"
OUTPUT = f"s3://AKIAEXAMPLE:{SECRET}@bucket/datasets?endpoint_override=http://minio:9000&session_token={SECRET}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TRACKING, "postgresql://mlflow:***@db.internal:5432/mlflow"),
        ("https://ghp_token@github.com/org/repo", "https://***@github.com/org/repo"),
        ("s3://bucket/x?endpoint_override=http://minio:9000&secret_key=abc", "s3://bucket/x?endpoint_override=http://minio:9000&secret_key=***"),
        ("--set tracking.uri=http://u:p@host:5000 --set x=1", "--set tracking.uri=http://u:***@host:5000 --set x=1"),
        ("sqlite:////tmp/run/mlflow.db", "sqlite:////tmp/run/mlflow.db"),
        ("file:///data/user@corp/images", "file:///data/user@corp/images"),
        ("s3://bucket/path@v2/shards", "s3://bucket/path@v2/shards"),
        ("data.resolution=64", "data.resolution=64"),
    ],
)  # fmt: skip
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_tree_keeps_the_shape() -> None:
    tree = {"a": [TRACKING, 3, None], "b": {"c": OUTPUT}}
    redacted = redact_tree(tree)
    assert SECRET not in json.dumps(redacted)
    assert redacted["a"][1:] == [3, None] and redacted["b"]["c"].startswith("s3://AKIAEXAMPLE:***@bucket/")


def test_resolved_config_and_its_log_hold_no_secret(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={tmp_path}", f"workdir={tmp_path}", f"tracking.uri={TRACKING}"])
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"output": OUTPUT})})
    assert cfg.tracking_uri == TRACKING  # the process keeps the real URI
    path = save_resolved(cfg)
    assert SECRET not in path.read_text() and SECRET not in cfg.to_yaml()
    assert "mlflow:***@db.internal" in path.read_text()


def test_log_lines_are_redacted() -> None:
    formatter = RedactingFormatter("%(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "joining %s", (TRACKING,), None)
    assert formatter.format(record) == "joining postgresql://mlflow:***@db.internal:5432/mlflow"


def test_dataset_card_and_location_hold_no_secret(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={tmp_path}", f"workdir={tmp_path}", f"tracking.uri={TRACKING}"])
    location = resolve(f"{tmp_path}/d?token={SECRET}", pafs.LocalFileSystem())
    assert SECRET not in location.uri
    with DatasetWriter(tmp_path / "dataset", config=cfg.public_dump()) as writer:
        pass
    assert writer.card is not None and SECRET not in json.dumps(writer.card)
    assert SECRET not in (tmp_path / "dataset" / CARD).read_text()


def test_mlflow_dataset_input_holds_no_secret() -> None:
    dataset = dataset_input(OUTPUT, "perlin", "0" * 64)
    assert SECRET not in json.dumps(dataset.source.to_dict())
    assert dataset.name == "defectsynth-perlin"
