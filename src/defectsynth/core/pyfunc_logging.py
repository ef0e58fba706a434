"""How every model is logged to MLflow: as code (a file, not a pickle), with this package's pinned requirements."""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature


def package_requirements() -> list[str]:
    """The package's pinned runtime requirements, recorded with every logged model."""
    requires = importlib.metadata.requires("defectsynth") or []
    return [r for r in requires if "extra ==" not in r]


def log_pyfunc_model(
    name: str, code: Path, artifacts: dict[str, str], config: dict[str, Any], signature: ModelSignature
) -> str:
    """Log a models-from-code pyfunc in the active run; returns its model URI.

    The signature is declared, so no input example is logged: one would cost a prediction (a diffusion sample)
    at every logging, and MLflow's warning that none was given is held back.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts=artifacts,
            model_config=config,
            signature=signature,
            pip_requirements=package_requirements(),
        )
    return info.model_uri
