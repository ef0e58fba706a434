"""An MLflow store that stops answering: errors name the store, nothing reads a failure as "absent".

A real ``mlflow server`` (SQLite backend) runs in its own process and is stopped mid-run; a closed
port stands for a store that never answered. MLflow's HTTP client retries with a bound
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with exponential backoff); the tests set it to 0.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectsynth.core.tracking_errors import TrackingStoreError
from defectsynth.platform.tracking import CHAMPION, champion_score, record_scores, resolve_version
from helpers.servers import free_port, serving, stop

pytestmark = pytest.mark.integration

MODEL = "defectsynth-wood-perlin"


@pytest.fixture(autouse=True)
def no_http_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on the first refused connection instead of backing off for minutes; restore the tracking URI."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_a_store_that_never_answers_is_named_not_read_as_absent() -> None:
    mlflow.set_tracking_uri(f"http://mlflow:s3cret@127.0.0.1:{free_port()}")
    with pytest.raises(TrackingStoreError, match=r"MLflow store http://mlflow:\*\*\*@127\.0\.0\.1:\d+ failed") as info:
        champion_score(MODEL, "pixel_ap")  # before: None, as if there were no champion
    assert "s3cret" not in str(info.value)
    with pytest.raises(TrackingStoreError, match="failed while resolving models:/defectsynth-wood-perlin@champion"):
        resolve_version(MODEL, CHAMPION)  # before: "run jobs.finetune first"


def test_the_report_command_fails_in_one_line_naming_the_store() -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "defectsynth.cli",
        "report",
        "all",
        "--tracking-uri",
        f"http://u:pw@127.0.0.1:{port}",
    ]
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: MLflow store http://u:***@127.0.0.1:{port} failed")
    assert "Traceback" not in done.stderr and "pw@" not in done.stderr


def _server(backend: Path, port: int, log: Path) -> serving:
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{backend / 'mlflow.db'}",
        "--artifacts-destination", str(backend / "artifacts"),
    ]  # fmt: skip
    return serving(command, f"http://127.0.0.1:{port}/health", log, timeout=120)


def test_scores_recorded_while_the_store_goes_down_never_move_the_champion(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    with _server(tmp_path, port, log) as server:
        client = MlflowClient()
        client.create_registered_model(MODEL)
        with mlflow.start_run() as run:
            mlflow.log_text("weights", "model/weights.txt")
        for _ in range(2):
            client.create_model_version(MODEL, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        assert record_scores(MODEL, "1", {"pixel_ap": 0.5}, "pixel_ap")  # version 1 becomes champion
        stop(server)  # the store goes down mid-run
        with pytest.raises((MlflowException, TrackingStoreError)):
            record_scores(MODEL, "2", {"pixel_ap": 0.9}, "pixel_ap")
        with pytest.raises(TrackingStoreError):
            champion_score(MODEL, "pixel_ap")
    with _server(tmp_path, port, log):  # back up, on the same backend
        assert MlflowClient().get_model_version_by_alias(MODEL, CHAMPION).version == "1"
        assert champion_score(MODEL, "pixel_ap") == 0.5
