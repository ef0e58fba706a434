"""Registering test generators: in this process's generator registry for one block, and in an MLflow registry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from defectsynth.generators.base import FitContext, build_generator
from defectsynth.generators.registry import REGISTRY
from defectsynth.platform.tracking import log_generator, register
from defectsynth.storage.layouts import read_dataset


@contextmanager
def registered_as(name: str, target: str) -> Iterator[None]:
    """``name`` -> ``target`` ("module:Class") in the registry for the duration of the block."""
    REGISTRY[name] = target
    try:
        yield
    finally:
        REGISTRY.pop(name, None)


def register_stamp_model(name: str, experiment: str, root: Path, description: str = "") -> ModelVersion:
    """Fit ``stamp`` on a tiny MVTec tree under ``root``; register it as a new version of ``name`` (active store)."""
    from helpers.stamp_generator import registered
    from helpers.trees import make_mvtec

    with registered():
        (product,) = read_dataset(make_mvtec(root / "data", product="wood").parent, "mvtec", validate=False)
        output = root / f"stamp-{len(list(root.glob('stamp-*')))}"
        artifacts = build_generator("stamp", {}).fit(product, None, FitContext(output_dir=output, max_steps=1))  # type: ignore[arg-type]
        with mlflow.start_run(experiment_id=experiment):
            uri = log_generator(artifacts, "stamp", {})
        return register(uri, name, tags={"product": "wood", "method": "stamp"}, description=description)
