"""Test-session environment: no hub access, no MLflow telemetry; the shared ``one_thread`` fixture."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def one_thread():
    """Run torch single-threaded: on a shared 2-core runner, OpenMP threads spinning under load cost ~20x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
