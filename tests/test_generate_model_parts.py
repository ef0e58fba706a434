"""Extra model parts and a pluggable noise predictor need no change in the jobs.

The ``controlled`` test generator (``helpers.controlnet_generator``) adds a ControlNet to a tiny diffusion
base, saves the ControlNet alone in diffusers' layout beside a reference to the base, and samples through
``ControlNetPredictor``. It passes the
generator contract, and the real generate job runs it from the MLflow registry on a real local Ray cluster,
unchanged.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from defectsynth.diffusion.controlnet import PART
from defectsynth.diffusion.model import PART_CLASSES
from defectsynth.generators.base import FitContext, Generator, Request, build_generator, generator_class
from defectsynth.jobs.common import start
from defectsynth.jobs.generate import generate, product_requests
from defectsynth.platform.config import load_config
from defectsynth.platform.tracking import experiment_id, log_generator, model_name, register
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from helpers.controlnet_generator import NAME, registered
from helpers.generator_contract import PRODUCTS, GeneratorContract
from helpers.ray_cluster import local_cluster
from helpers.tiny_diffusion import tiny_model

SIDE = 32
STEPS = 2
TYPES = ("contamination", "crack", "discoloration", "hole", "scratch")


@pytest.fixture(scope="module", autouse=True)
def controlled_registered():
    with registered():
        yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny seeded base at 32 px, saved in diffusers' layout, without parts."""
    return str(tiny_model(resolution=SIDE, words=PRODUCTS).save(tmp_path_factory.mktemp("base")))


class TestControlledContract(GeneratorContract):
    method = NAME
    settings = {"steps": STEPS}
    requests_per_source = 3
    resolution = SIDE
    sampler = "ddim"

    @pytest.fixture(scope="class")
    @classmethod
    def base_model(cls, base_dir: str) -> str:
        return base_dir

    def test_the_artifacts_hold_the_controlnet_in_diffusers_layout(self, artifacts: Path, base_model: str) -> None:
        assert (artifacts / PART / "config.json").is_file() and not (Path(base_model) / PART).exists()
        assert {p.name for p in artifacts.iterdir()} == {PART, "generator.json"}, "the ControlNet, not the base"
        assert isinstance(PART_CLASSES[PART].from_pretrained(artifacts / PART), torch.nn.Module)

    def test_the_controlnet_steers_the_samples(self, generator: Generator, requests: list[Request], samples) -> None:
        fitted = generator.settings
        generator.settings = fitted.model_copy(update={"conditioning_scale": 0.0})  # the U-Net alone
        try:
            plain = generator.generate(requests[:2])
        finally:
            generator.settings = fitted
        for ours, unsteered in zip(samples[:2], plain, strict=True):
            assert ours.image.tobytes() != unsteered.image.tobytes()
            assert ours.metadata.generator.config_digest != unsteered.metadata.generator.config_digest


# -- the generate job on a real Ray cluster -------------------------------------------------------------------


def overrides(root: Path, workdir: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"workdir={workdir}",
        f"data.resolution={SIDE}",
        "products=[wood]",
        f"methods=[{NAME}]",
        "evaluate.baselines=[]",
        "generate.per_type=1",
        "generate.normals_per_product=0",
        "generate.batch_size=3",
        "generate.mask_source=real",
        f"generators.{NAME}={{steps: {STEPS}}}",
        "ray.log_to_driver=false",
    ]


def register_controlled(cfg, prepared, base_model: str) -> Path:
    """Fit ``controlled`` in-process and register it as ``defectsynth-wood-controlled@candidate``, as finetune would."""
    product, split = prepared.products[0], prepared.split.products["wood"]
    settings = cfg.generators[NAME]
    with mlflow.start_run(experiment_id=experiment_id(cfg, "wood"), run_name=f"finetune-{NAME}"):
        context = FitContext(output_dir=cfg.workdir / f"{NAME}-artifacts", max_steps=1, base_model=base_model)
        artifacts = build_generator(NAME, settings).fit(product, split, context)
        uri = log_generator(artifacts, NAME, settings)
    register(uri, model_name("wood", NAME))
    return artifacts


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, base_dir: str):
    root = tmp_path_factory.mktemp("parts") / "data"
    write_demo(root, size=SIDE, train_good=4, test_good=1, per_defect=3, products=["wood"], progress=False)
    cfg = load_config(None, overrides(root, tmp_path_factory.mktemp("run")))
    with local_cluster("helpers.controlnet_generator.register"):
        prepared = start(cfg)
        artifacts = register_controlled(cfg, prepared, base_dir)
        (outcome,) = generate(cfg, prepared)
        yield cfg, prepared, artifacts, outcome


def test_the_job_generates_every_type_from_the_registered_model_with_its_controlnet(ran, base_dir: str) -> None:
    *_, outcome = ran
    card = read_card(resolve(outcome.uri))
    assert card["counts"] == {"wood": dict.fromkeys(TYPES, 1)}
    assert outcome.written == len(TYPES) and outcome.short == 0
    assert {g["base_model"] for g in card["generators"]} == {base_dir}
    rows = read_manifest(resolve(outcome.uri), ["method", "sampler", "steps"]).to_pylist()
    assert rows == [{"method": NAME, "sampler": "ddim", "steps": STEPS}] * len(TYPES)


def shard_images(uri: str) -> dict[str, np.ndarray]:
    """Every sample's image in the dataset's shards, by key."""
    images = {}
    for shard in sorted((Path(uri) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                if extension == "png":
                    images[key] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    return images


def retries(request: Request, max_retries: int) -> list[Request]:
    """``request`` and its re-tries, attempts 0 .. ``max_retries``."""
    attempts = [request]
    for _ in range(max_retries):
        attempts.append(attempts[-1].retried())
    return attempts


def test_the_actors_sampled_with_the_registered_controlnet(ran) -> None:
    """The registry's model holds the fitted ControlNet; the job's requests regenerated with it give the shards."""
    cfg, prepared, artifacts, outcome = ran
    logged = mlflow.pyfunc.load_model(f"models:/{model_name('wood', NAME)}@candidate").unwrap_python_model()
    generator = logged.generator  # loaded as a generation actor loads it
    fitted = PART_CLASSES[PART].from_pretrained(artifacts / PART).state_dict()
    assert all(torch.equal(generator.model.part(PART).state_dict()[k], v) for k, v in fitted.items())

    product, split = prepared.products[0], prepared.split.products["wood"]
    requests = product_requests(cfg, product, split, "real", generator_class(NAME))
    attempts = {r.key(NAME): r for request in requests for r in retries(request, cfg.generate.max_retries)}
    written = shard_images(outcome.uri)
    assert len(written) == len(TYPES)
    batch = [attempts[key] for key in sorted(written)]
    ours = [sample.image for sample in generator.generate(batch)]
    generator.settings = generator.settings.model_copy(update={"conditioning_scale": 0.0})
    unsteered = [sample.image for sample in generator.generate(batch)]
    for key, image, plain in zip(sorted(written), ours, unsteered, strict=True):
        # another process and batch: float32 differs in the last bits, so a pixel may round the other way
        assert np.abs(image.astype(int) - written[key]).max() <= 1
        assert np.abs(plain.astype(int) - written[key]).max() > 1
