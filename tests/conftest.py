"""Test-session environment: no hub access, no MLflow telemetry; the shared ``one_thread`` fixture; a clean exit."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Ray Train's controller polls its workers every 2 s: a test fit of a few steps then waits on the poll, not the work.
# Clusters the tests start inherit this environment (README "Contributing").
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture
def one_thread():
    """Run torch single-threaded: on a shared 2-core runner, OpenMP threads spinning under load cost ~20x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember the session's exit status for ``pytest_unconfigure``."""
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the session's status once pytest is done, skipping the interpreter's teardown.

    After every test had passed, CI's interpreter once died in its own teardown (``Segmentation fault``, exit
    139), most likely finalising the native objects that Ray, torch, gloo and gRPC leave in a process that ran
    dozens of clusters; it did not recur in two local runs. That teardown is not what the suite tests, and a crash
    in it must not turn a green run red (nor hide a red one: the status is the session's).
    """
    if EXIT_STATUS not in config.stash:
        return  # pytest stopped before the session ran (usage error, --help): its own exit is fine
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])
