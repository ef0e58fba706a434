"""Fit units (one fit per defect type) and artifacts that refer to the base instead of copying it.

The ``typetune`` test generator (``helpers.typetune_generator``) fits the base's U-Net once per defect type
and keeps only the U-Net and a reference to the base. It passes the generator contract as one model per
product, and the real finetune and generate jobs run it on a real local Ray cluster with MLflow in a
temporary SQLite store, unchanged: the units come from its class, never from its name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from contextlib import redirect_stderr
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from defectsynth.diffusion.tracking import BASE_TINY, log_base_model
from defectsynth.generators.anomalydiffusion.generator import AnomalyDiffusionGenerator
from defectsynth.generators.base import ARTIFACT_FILE, FitContext, build_generator, fits_jointly
from defectsynth.generators.fit_units import (
    FitUnit,
    UnitGenerator,
    assemble_units,
    fit_units,
    product_generator,
    unit_view,
)
from defectsynth.jobs.common import start
from defectsynth.jobs.finetune import finetune
from defectsynth.jobs.generate import generate
from defectsynth.jobs.pretrain import BASE_EXPERIMENT, base_digest
from defectsynth.jobs.training import make_trainer
from defectsynth.platform.config import TrainerConfig, load_config
from defectsynth.platform.tracking import experiment_id, load_generator, model_name, register, registry_uri
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.manifest import read_card
from defectsynth.storage.split import SplitSettings, split_product
from helpers.generator_contract import PRODUCTS, GeneratorContract, make_requests
from helpers.ray_cluster import local_cluster
from helpers.tiny_diffusion import tiny_model
from helpers.typetune_generator import UNET_FILE, registered

SIDE = 32


@pytest.fixture(scope="module", autouse=True)
def typetune_registered():
    with registered():
        yield


class TestTypeTuneContract(GeneratorContract):
    method = "typetune"
    requests_per_source = 5
    resolution = SIDE

    @pytest.fixture(scope="class")
    @classmethod
    def base_model(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        return str(tiny_model(resolution=SIDE, words=PRODUCTS).save(tmp_path_factory.mktemp("base")))

    def test_one_unit_per_defect_type_each_on_its_own_type(self, generator, split, artifacts: Path) -> None:
        types = sorted(t for t, ids in split.generator_train.items() if ids)
        assert sorted(generator.units) == types
        assert all(unit.defect_type == kind for kind, unit in generator.units.items())
        listed = json.loads((artifacts / ARTIFACT_FILE).read_text())["units"]
        assert listed == {kind: f"units/{kind}" for kind in types}
        assert all((artifacts / "units" / kind / UNET_FILE).is_file() for kind in types)


# -- units, views, assembly ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wood(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("units") / "data"
    write_demo(root, size=SIDE, train_good=3, test_good=1, per_defect=3, products=["wood"], progress=False)
    product = read_dataset(root, "mvtec", ["wood"])[0]
    return product, split_product(product, SplitSettings())


def test_a_method_fits_per_product_unless_its_class_asks_per_type(wood) -> None:
    product, split = wood
    assert fit_units("perlin", split) == [FitUnit()]
    assert fit_units("typetune", split) == [FitUnit(t) for t in product.defect_types]
    assert FitUnit("crack").subdir == "units/crack" and FitUnit().subdir == ""
    assert (FitUnit("crack").metric("loss"), FitUnit().metric("loss")) == ("loss.crack", "loss")


def test_a_per_type_method_without_training_defects_is_an_error(wood) -> None:
    _, split = wood
    empty = split.model_copy(update={"generator_train": {t: [] for t in split.generator_train}})
    with pytest.raises(ValueError, match="no generator-training defects"):
        fit_units("typetune", empty)


def test_a_unit_sees_only_its_type(wood) -> None:
    product, split = wood
    data, narrowed = unit_view(product, split, FitUnit("crack"))
    assert {r.defect_type for r in data.defects} == {"crack"}
    assert list(narrowed.generator_train) == ["crack"] and list(narrowed.test_defects) == ["crack"]
    assert narrowed.train_normals == split.train_normals and data.normals == product.normals
    assert unit_view(product, split, FitUnit()) == (product, split)


def test_a_per_type_method_cannot_fit_jointly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AnomalyDiffusionGenerator, "fit_unit", "defect_type")
    with pytest.raises(ValueError, match="joint_products does not apply"):
        fits_jointly("anomalydiffusion", {"joint_products": True})


def test_assembly_keeps_a_product_fit_and_gathers_per_type_units(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert assemble_units(tmp_path / "out", "perlin", "wood", {}, {FitUnit(): whole}) == whole
    units = {}
    for kind in ("hole", "crack"):
        units[FitUnit(kind)] = tmp_path / kind
        units[FitUnit(kind)].mkdir()
        (units[FitUnit(kind)] / "weights.bin").write_bytes(kind.encode())
    out = assemble_units(tmp_path / "out", "typetune", "wood", {}, units)
    manifest = json.loads((out / ARTIFACT_FILE).read_text())
    assert manifest["units"] == {"crack": "units/crack", "hole": "units/hole"}
    assert (manifest["method"], manifest["product"], manifest["fit_unit"]) == ("typetune", "wood", "defect_type")
    assert (out / "units" / "hole" / "weights.bin").read_bytes() == b"hole"
    with pytest.raises(ValueError, match="product-wide"):
        assemble_units(tmp_path / "mixed", "typetune", "wood", {}, {**units, FitUnit(): whole})


def test_requests_go_to_their_type_in_order_and_unknown_types_are_refused(wood, tmp_path: Path) -> None:
    product, split = wood
    base = str(tiny_model(resolution=SIDE).save(tmp_path / "base"))
    generator = product_generator("typetune", {})
    assert isinstance(generator, UnitGenerator)
    with pytest.raises(RuntimeError, match="fit"):
        generator.generate(make_requests(product, split, "typetune", 1, "real", resolution=SIDE))
    generator.fit(product, split, FitContext(output_dir=tmp_path / "artifacts", max_steps=1, base_model=base))
    requests = make_requests(product, split, "typetune", 2 * len(product.defect_types), "real", resolution=SIDE)
    samples = generator.generate(requests)
    assert [s.metadata.defect_type for s in samples] == [r.defect_type for r in requests]
    one = build_generator("typetune", {})
    one.load(tmp_path / "artifacts" / "units" / requests[1].defect_type)
    assert one.generate([requests[1]])[0].image.tobytes() == samples[1].image.tobytes()
    with pytest.raises(ValueError, match="no fit for defect type 'dent'"):
        generator.generate([dataclasses.replace(requests[0], defect_type="dent")])


def test_checkpoints_kept_per_fit_follow_the_config(tmp_path: Path) -> None:
    def loop(config: dict) -> None:
        return None

    assert TrainerConfig().keep_checkpoints == 2
    for keep in (1, 3):
        trainer = make_trainer(loop, {}, TrainerConfig(keep_checkpoints=keep), name="keep", storage=tmp_path)
        assert trainer.run_config.checkpoint_config.num_to_keep == keep


# -- the finetune and generate jobs on a real Ray cluster -----------------------------------------------------

PER_TYPE = 2
KEEP = 2


def register_base(cfg, prepared, directory: Path) -> None:
    """Register a tiny seeded base under this run's digest, as jobs.pretrain would: finetune reuses it (no training)."""
    digest = base_digest(cfg, prepared)
    with mlflow.start_run(experiment_id=experiment_id(cfg, BASE_EXPERIMENT), run_name="pretrain-tiny"):
        uri = log_base_model(tiny_model(resolution=SIDE).save(directory), digest=digest)
    register(uri, BASE_TINY, tags={"digest": digest})


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("units-jobs") / "data"
    write_demo(root, size=SIDE, train_good=4, test_good=1, per_defect=3, products=["wood"], progress=False)
    overrides = [
        f"data.root={root}",
        f"workdir={tmp_path_factory.mktemp('run')}",
        f"data.resolution={SIDE}",
        "products=[wood]",
        "methods=[typetune]",
        "evaluate.baselines=[]",
        "finetune.max_steps=2",
        f"finetune.keep_checkpoints={KEEP}",
        f"generate.per_type={PER_TYPE}",
        "generate.batch_size=4",
        "ray.log_to_driver=false",
    ]
    cfg = load_config(None, overrides)
    with local_cluster("helpers.typetune_generator.register"):
        prepared = start(cfg)
        register_base(cfg, prepared, tmp_path_factory.mktemp("base"))
        bars = io.StringIO()
        with redirect_stderr(bars):
            outcomes = finetune(cfg, prepared)
        (generated,) = generate(cfg, prepared)
        yield cfg, prepared, outcomes, generated, bars.getvalue()


def digests(directory: Path) -> set[str]:
    """The sha256 of every file under ``directory`` of 4 KiB or more (weights, not configs)."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.stat().st_size >= 4096]
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.integration
def test_one_model_per_product_holds_one_unit_per_type(ran) -> None:
    cfg, prepared, outcomes, *_ = ran
    (outcome,) = outcomes
    types = prepared.products[0].defect_types
    assert (outcome.product, outcome.method) == ("wood", "typetune")
    client = MlflowClient(cfg.tracking_uri)
    assert [v.version for v in client.search_model_versions(f"name='{model_name('wood', 'typetune')}'")] == [1]
    generator = load_generator(registry_uri(outcome.model_name, "candidate"))
    assert isinstance(generator, UnitGenerator) and sorted(generator.units) == types
    assert {kind: unit.defect_type for kind, unit in generator.units.items()} == {t: t for t in types}
    run = client.get_run(outcome.run_id)
    assert run.data.params["fit_units"] == ",".join(types)
    assert {f"loss.{t}" for t in types} <= set(run.data.metrics)
    assert run.data.metrics["fit_steps"] == 2 * len(types)


@pytest.mark.integration
def test_the_artifacts_refer_to_the_registered_base_and_hold_no_copy_of_it(ran, tmp_path: Path) -> None:
    cfg, _, (outcome,), *_ = ran
    client = MlflowClient(cfg.tracking_uri)
    version = client.get_model_version(outcome.model_name, outcome.version)
    base = version.tags["base_model"]
    assert base.startswith(f"models:/{BASE_TINY}/")
    assert client.get_run(outcome.run_id).data.params["base_model"] == base
    uri = registry_uri(outcome.model_name, outcome.version)
    model = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp_path / "model"))
    units = [json.loads(p.read_text()) for p in model.rglob(ARTIFACT_FILE) if p.parent.parent.name == "units"]
    assert len(units) == len(ran[1].products[0].defect_types) and {u["base_model"] for u in units} == {base}
    base_dir = Path(mlflow.artifacts.download_artifacts(base, dst_path=tmp_path / "base"))
    assert not digests(model) & digests(base_dir), "a file of the base was copied into the generator's artifacts"
    assert client.get_run(outcome.run_id).data.metrics["artifact_bytes"] > 0


@pytest.mark.integration
def test_generate_writes_every_type_from_its_unit(ran) -> None:
    _, prepared, _, generated, _ = ran
    card = read_card(resolve(generated.uri))
    assert card["counts"] == {"wood": {t: PER_TYPE for t in prepared.products[0].defect_types}}


@pytest.mark.integration
def test_the_finetune_bar_of_a_method_counts_its_units(ran) -> None:
    _, prepared, *_, bars = ran
    units = len(prepared.products[0].defect_types)
    assert "finetune typetune: 100%" in bars and f"{units}/{units}" in bars, bars


@pytest.mark.integration
def test_each_fit_keeps_at_most_the_configured_checkpoints(ran) -> None:
    cfg, prepared, *_ = ran
    assert len(prepared.products[0].defect_types) > KEEP, "every unit reports a checkpoint: more than are kept"
    (run,) = (cfg.workdir / "ray_results").glob("finetune-wood-*")
    assert 1 <= len([p for p in run.glob("checkpoint_*") if p.is_dir()]) <= KEEP
