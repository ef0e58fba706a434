"""``defectsynth models list|describe|promote`` against a real MLflow store (SQLite in a temp dir)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from defectsynth.cli import main
from defectsynth.platform.tracking import CHAMPION, record_scores
from helpers.registration import register_stamp_model

NAME = "defectsynth-wood-stamp"


@pytest.fixture
def store(tmp_path: Path):
    """Two versions of ``defectsynth-wood-stamp``; version 1 scored and champion. Yields the store URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("defectsynth-wood", artifact_location=(tmp_path / "art").as_uri())
    register_stamp_model(NAME, experiment, tmp_path, description="stamp fitted for wood")
    register_stamp_model(NAME, experiment, tmp_path)
    record_scores(NAME, "1", {"pixel_ap": 0.42, "image_auroc": 0.9}, "pixel_ap")
    yield uri
    mlflow.set_tracking_uri(before)


def test_registering_prints_no_mlflow_chatter(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("defectsynth-wood", artifact_location=(tmp_path / "art").as_uri())
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # not only once per process: an earlier test may have logged a model
            register_stamp_model(NAME, experiment, tmp_path)
            register_stamp_model(NAME, experiment, tmp_path)
    finally:
        mlflow.set_tracking_uri(before)
    err = capfd.readouterr().err
    assert "Successfully registered" not in err and "already exists" not in err and "Created version" not in err
    assert not [w for w in caught if "input example" in str(w.message)], "MLflow's input-example warning shows"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_version_with_aliases_and_scores(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "list", "--tracking-uri", store)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["name", "version", "aliases", "product", "method", "pixel_ap"]
    first, second = (line.split() for line in lines[2:4])
    assert first[:6] == [NAME, "1", "champion", "wood", "stamp", "0.4200"] and "image_auroc=0.900" in lines[2]
    assert second[:6] == [NAME, "2", "candidate", "wood", "stamp", "-"]
    _, out, _ = run(capsys, "models", "list", "--tracking-uri", store, "--method", "perlin")
    assert out.strip() == "no defectsynth-* model is registered"


def test_describe_prints_description_tags_scores_and_fit_parameters(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "models", "describe", f"{NAME}@champion", "--tracking-uri", store)
    assert code == 0
    assert out.startswith(f"models:/{NAME}/1  aliases: champion")
    assert "description: stamp fitted for wood" in out and "method: stamp" in out and "pixel_ap: 0.4200" in out


def test_promote_moves_the_alias_and_says_from_where(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "promote", f"{NAME}/2", "--tracking-uri", store)
    assert (code, out.strip()) == (0, f"{NAME}@champion: version 1 -> version 2")
    assert str(MlflowClient(store).get_model_version_by_alias(NAME, CHAMPION).version) == "2"


@pytest.mark.parametrize(("reference", "message"), [(f"{NAME}/9", "no registered model"), (NAME, "expected NAME")])
def test_a_bad_reference_is_one_line(
    store: str, capsys: pytest.CaptureFixture[str], reference: str, message: str
) -> None:
    code, _, err = run(capsys, "models", "describe", reference, "--tracking-uri", store)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_registered_generator_predicts_request_rows_through_its_signature(store: str, tmp_path: Path) -> None:
    from defectsynth.generators.base import Request
    from helpers.stamp_generator import registered

    source = next((tmp_path / "data/wood/train/good").glob("*.png"))
    request = Request("wood", "crack", 0, 7, 16, "train/good/000", str(source), "perlin", intensity=1.0)
    with registered():
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
        out = model.predict(pd.DataFrame([request.to_row()]))
    assert [c.name for c in model.metadata.get_input_schema().inputs][:3] == ["product", "defect_type", "sample_index"]
    assert list(out["key"]) == [request.key("stamp")] and out["image"][0].shape == (16, 16, 3)
