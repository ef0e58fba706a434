"""Paths and references that point where they must not: refused with the file, key or value named.

Config and CSV paths stay under the dataset root, a shard's metadata must be UTF-8 JSON, and a
registered model must be the method its name says, with its artifacts present.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from defectsynth.platform.config import ConfigError, load_config
from defectsynth.platform.tracking import check_registered_generator, load_generator
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.errors import DatasetError, ShardError
from defectsynth.storage.layouts import read_dataset
from helpers.registration import register_stamp_model
from helpers.samples import make_sample
from helpers.stamp_generator import registered
from helpers.trees import make_visa, write_image


@pytest.mark.parametrize("listed", ["../outside/0000.JPG", "/etc/hostname"])
def test_a_split_csv_path_out_of_the_root_is_refused_naming_the_line(tmp_path: Path, listed: str) -> None:
    root = tmp_path / "visa"
    make_visa(root)
    write_image(tmp_path / "outside/0000.JPG", suffix_format="JPEG")
    csv_path = root / "split_csv/1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("candle/Data/Images/Normal/0000.JPG", listed, 1))
    with pytest.raises(DatasetError, match=f"image '{listed}' lies outside the dataset root") as info:
        read_dataset(root, "visa")
    assert str(info.value.path).startswith(f"{csv_path}:")


@pytest.mark.parametrize(
    "override",
    ["data.visa_split_csv=../elsewhere.csv", "data.visa_split_csv=/etc/passwd", "data.folder.normal_dir=../good",
     "data.folder.mask_dir=a/b", "data.folder.mask_suffix=/x"],
)  # fmt: skip
def test_config_paths_out_of_the_root_are_config_errors(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].removeprefix("data.")):
        load_config(None, [f"data.root={tmp_path}", override])


def _replace_member(shard: Path, name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, content in members:
            content = data if member.name == name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


def test_shard_json_that_is_not_utf8_stops_a_resume_naming_the_shard(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path) as writer:
        for index in range(3):
            writer.write(make_sample(index))
    (shard,) = (tmp_path / "shards").glob("*.tar")
    key = make_sample(1).key
    _replace_member(shard, f"{key}.json", b'{"key": "\xff\xfe"}')
    with pytest.raises(ShardError, match=rf"{shard.name}: {key}\.json is not valid JSON"):
        DatasetWriter(tmp_path)


@pytest.fixture
def store(tmp_path: Path):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("defectsynth-wood", artifact_location=(tmp_path / "mlartifacts").as_uri())
    yield experiment
    mlflow.set_tracking_uri(before)


def test_a_registered_model_of_another_method_is_refused(store: str, tmp_path: Path) -> None:
    version = register_stamp_model("defectsynth-wood-perlin", store, tmp_path)
    with pytest.raises(ValueError, match="models:/defectsynth-wood-perlin/1 is a stamp model, not perlin"):
        check_registered_generator(version, "perlin")
    check_registered_generator(version, "stamp")


def test_a_registered_model_whose_artifacts_are_gone_is_refused(store: str, tmp_path: Path) -> None:
    version = register_stamp_model("defectsynth-wood-stamp", store, tmp_path)
    shutil.rmtree(tmp_path / "mlartifacts")
    version = MlflowClient().get_model_version(version.name, version.version)
    with pytest.raises(ValueError, match="models:/defectsynth-wood-stamp/1: its artifacts are missing"):
        check_registered_generator(version, "stamp")


def test_a_registered_generator_holds_no_pickle_and_loads_from_its_code(store: str, tmp_path: Path) -> None:
    version = register_stamp_model("defectsynth-wood-stamp", store, tmp_path)
    uri = f"models:/{version.name}/{version.version}"
    files = [a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=uri)]
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    with registered():
        assert load_generator(uri).name == "stamp"


@pytest.mark.parametrize("base", ["models://prod@registry.example/defectsynth-base-tiny/1", "hf://org/model"])
def test_a_base_model_from_another_registry_is_a_config_error(tmp_path: Path, base: str) -> None:
    with pytest.raises(ConfigError, match="base_model"):
        load_config(None, [f"data.root={tmp_path}", f"diffusion.base_model={base}"])
