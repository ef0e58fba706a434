"""MLflow: one experiment per product, generator models in the registry, scores linked to both.

With the default SQLite store (``sqlite:///<workdir>/mlflow.db``) artifacts go to
``<workdir>/mlartifacts``; with a tracking server, the server decides. Registered generators are
pyfunc models wrapping the generator's artifact directory (for a method that fits per defect type, the
units' directories and a manifest listing them, loaded as a ``UnitGenerator``), so a user loads one with
``mlflow.pyfunc.load_model("models:/defectsynth-<product>-<method>@champion")`` and calls
``predict`` on a DataFrame of request rows, or ``unwrap_python_model().generator`` directly.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from mlflow.utils import logging_utils

from defectsynth.core.pyfunc_logging import log_pyfunc_model
from defectsynth.core.tracking_errors import TrackingStoreError, is_not_found
from defectsynth.generators.base import Generator, Request
from defectsynth.generators.fit_units import product_generator
from defectsynth.platform.config import Config
from defectsynth.storage.keys import short_digest
from defectsynth.storage.redact import redact

logger = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
GENERATOR_ARTIFACT = "generator"
MODEL_CODE = Path(__file__).with_name("generator_model_code.py")


def dataset_input(uri: str, method: str, digest: str) -> MetaDataset:
    """A generated dataset as an MLflow run input: its URI (credentials masked), name and digest."""
    with warnings.catch_warnings():  # a local path fits several source types; MLflow's first choice is right here
        warnings.filterwarnings(
            "ignore", message="The specified dataset source can be interpreted", category=UserWarning
        )
        source = resolve_dataset_source(redact(uri))
    return MetaDataset(source=source, name=f"defectsynth-{method}", digest=digest[:32])


def setup_tracking(cfg: Config) -> str:
    """Point MLflow at the configured tracking URI (creating the workdir for a SQLite store)."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    return cfg.tracking_uri


def experiment_id(cfg: Config, product: str) -> str:
    """The product's experiment ``defectsynth-<product>``, created on first use."""
    name = f"defectsynth-{product}"
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (cfg.workdir / "mlartifacts" / product).as_uri() if cfg.tracking_uri.startswith("sqlite") else None
    return mlflow.create_experiment(name, artifact_location=location)


def model_name(product: str, method: str) -> str:
    """The registered model name ``defectsynth-<product>-<method>``."""
    return f"defectsynth-{product}-{method}"


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """A fitted generator as an MLflow pyfunc model; ``model_config`` holds method and settings."""

    generator: Generator

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the generator from the config and load its artifacts (one unit per defect type where it fits so)."""
        config = context.model_config or {}
        self.generator = product_generator(config["method"], config.get("settings"))
        self.generator.load(Path(context.artifacts[GENERATOR_ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Request rows in, one row per sample out: key, image, mask, cond_mask arrays and metadata JSON."""
        requests = [Request.from_row(row) for row in model_input.to_dict(orient="records")]
        samples = self.generator.generate(requests)
        return pd.DataFrame(
            {
                "key": [s.key for s in samples],
                "image": [s.image for s in samples],
                "mask": [s.mask for s in samples],
                "cond_mask": [s.cond_mask for s in samples],
                "metadata": [s.metadata.model_dump_json() for s in samples],
            }
        )


def request_signature() -> ModelSignature:
    """The pyfunc's signature: request rows in (``Request.to_row``'s columns), sample rows out.

    The output's image and mask columns hold arrays, which a column signature cannot type: only the key and the
    metadata JSON are declared.
    """
    text, whole, real = DataType.string, DataType.long, DataType.double
    inputs = [
        ColSpec(text, "product"), ColSpec(text, "defect_type"), ColSpec(whole, "sample_index"), ColSpec(whole, "seed"),
        ColSpec(whole, "resolution"), ColSpec(text, "source_image"), ColSpec(text, "source_path"),
        ColSpec(text, "mask_source"), ColSpec(text, "mask_image", required=False),
        ColSpec(Array(text), "mask_paths", required=False), ColSpec(text, "foreground_path", required=False),
        ColSpec(real, "intensity", required=False), ColSpec(whole, "label", required=False),
        ColSpec(whole, "attempt", required=False),
    ]  # fmt: skip
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec(text, "key"), ColSpec(text, "metadata")]))


def log_generator(artifacts: Path, method: str, settings: dict[str, Any]) -> str:
    """Log a fitted generator in the active run; returns the logged model's URI."""
    config = {"method": method, "settings": settings}
    return log_pyfunc_model(
        GENERATOR_ARTIFACT, MODEL_CODE, {GENERATOR_ARTIFACT: str(artifacts)}, config, request_signature()
    )


@contextmanager
def _mlflow_stream_muted() -> Iterator[None]:
    """Hold back what MLflow prints to its own stream ("Successfully registered model ..."): ``register`` logs it."""
    stream = logging_utils.MLFLOW_LOGGING_STREAM
    enabled, stream.enabled = stream.enabled, False
    try:
        yield
    finally:
        stream.enabled = enabled


def register(
    model_uri: str, name: str, alias: str = CANDIDATE, tags: dict[str, str] | None = None, description: str = ""
) -> ModelVersion:
    """Register a logged model as a new version of ``name`` with ``tags`` and ``description``; point ``alias`` at it."""
    with _mlflow_stream_muted():
        version = mlflow.register_model(model_uri, name, tags=tags)
    client = MlflowClient()
    if description:
        version = client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s as @%s", name, version.version, alias)
    return version


def settings_digest(settings: dict[str, Any]) -> str:
    """The ``settings_digest`` tag of a fitted version: the digest of the method's settings as configured."""
    return short_digest(settings)


def newest_tagged_version(name: str, tag: str, value: str) -> ModelVersion | None:
    """The newest version of registered model ``name`` tagged ``tag=value``, or None (also when ``name`` is new)."""
    versions = MlflowClient().search_model_versions(f"name='{name}' and tags.{tag}='{value}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def registry_uri(name: str, alias_or_version: str | int) -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` for a version number."""
    alias_or_version = str(alias_or_version)
    sep = "/" if re.fullmatch(r"\d+", alias_or_version) else "@"
    return f"models:/{name}{sep}{alias_or_version}"


def resolve_version(name: str, alias_or_version: str | int, client: MlflowClient | None = None) -> ModelVersion:
    """The model version an alias or version number points at (in ``client``'s store, by default the active one).

    Raises:
        ValueError: There is no such version.
        TrackingStoreError: The store failed to answer.
    """
    alias_or_version = str(alias_or_version)
    client = client or MlflowClient()
    try:
        if re.fullmatch(r"\d+", alias_or_version):
            return client.get_model_version(name, alias_or_version)
        return client.get_model_version_by_alias(name, alias_or_version)
    except MlflowException as err:
        if not is_not_found(err):
            msg = f"resolving {registry_uri(name, alias_or_version)}"
            raise TrackingStoreError(msg, err, store=client.tracking_uri) from err
        msg = f"no registered model {registry_uri(name, alias_or_version)}: run jobs.finetune first ({err.message})"
        raise ValueError(msg) from err


def check_registered_generator(version: ModelVersion, method: str) -> None:
    """Refuse, before any actor loads it, a registered version fitted by another method or whose artifacts are gone.

    Raises:
        ValueError: Naming the model version: its ``method`` tag is not ``method``, or it lists no artifacts.
    """
    uri = registry_uri(version.name, version.version)
    tagged = (version.tags or {}).get("method")
    if tagged is not None and tagged != method:
        msg = f"{uri} is a {tagged} model, not {method}: its registered name and its content disagree"
        raise ValueError(msg)
    try:
        listed = mlflow.artifacts.list_artifacts(artifact_uri=uri)
    except MlflowException as err:
        if not is_not_found(err):
            action = f"listing the artifacts of {uri}"
            raise TrackingStoreError(action, err) from err
        listed = []
    if not listed:
        msg = f"{uri}: its artifacts are missing (from {version.source}); fit it again with jobs.finetune"
        raise ValueError(msg)


def load_generator(model_uri: str) -> Generator:
    """Load a registered generator (``models:/...``) ready to generate."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().generator


def champion_score(name: str, metric: str) -> float | None:
    """The champion version's score on ``metric`` (a version tag written by evaluate), or None when there is none.

    Raises:
        TrackingStoreError: The store failed to answer; never read as "no champion".
    """
    try:
        version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if is_not_found(err):
            return None
        msg = f"reading {registry_uri(name, CHAMPION)}"
        raise TrackingStoreError(msg, err) from err
    value = version.tags.get(f"eval.{metric}")
    return float(value) if value is not None else None


def record_scores(name: str, version: str, scores: dict[str, float], metric: str) -> bool:
    """Tag a version with its scores; move ``champion`` to it when it beats the current champion."""
    client = MlflowClient()
    for key, value in scores.items():
        client.set_model_version_tag(name, str(version), f"eval.{key}", f"{value:.6f}")
    current = champion_score(name, metric)
    new = scores.get(metric)
    if new is None or (current is not None and new <= current):
        logger.info("%s v%s: %s %s does not beat champion %s", name, version, metric, new, current)
        return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    logger.info("%s v%s is the new champion (%s %.4f > %s)", name, version, metric, new, current)
    return True
