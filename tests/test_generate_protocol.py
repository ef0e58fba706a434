"""Protocol extensions (normals, method-owned masks, intensity domains) and the quality gates of jobs.generate.

The ``stamp`` test generator (``helpers.stamp_generator``) uses every extension; it passes the generator
contract, and the real generate job runs it on a real local Ray cluster with MLflow in a temporary SQLite
store, unchanged: what the method can do comes from its class.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from defectsynth.evaluation.data import load_real
from defectsynth.generators.base import FitContext, Request, build_generator
from defectsynth.generators.intensity import IntensityControl, IntensityRange, draw_from_setting
from defectsynth.generators.quality_gates import QualityGates, Verdict, gated_sample, judge
from defectsynth.generators.refine import measured_sample
from defectsynth.jobs.common import start
from defectsynth.jobs.evaluate import DetectorRun, eval_task, synthetic_pairs, training_normals
from defectsynth.jobs.generate import (
    COLUMNS,
    accepted_in,
    check_intensity,
    check_sample,
    decode_row,
    generate,
    resume_point,
)
from defectsynth.platform.config import ConfigError, load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.summary import shards_summary
from defectsynth.platform.tracking import experiment_id, log_generator, model_name, register
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.demo import write_demo
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_card, read_manifest
from defectsynth.storage.rejections import REJECTED_DIR, REJECTION_LOG
from defectsynth.storage.sample import encode_sample
from helpers.generator_contract import GeneratorContract
from helpers.ray_cluster import local_cluster
from helpers.stamp_generator import BORDER, registered

TYPES = ("contamination", "crack", "discoloration", "hole", "scratch")
PER_TYPE = 2
NORMALS = 3
LEVELS = (0.5, 1.5)  # generate.intensity as a list: request i takes LEVELS[i % 2]
MISSING = {0: 2}  # request 0 of every type paints nothing on its first two attempts
LEAKING = {1: 1}  # request 1 of every type leaks into the background on its first attempt


@pytest.fixture(scope="module", autouse=True)
def stamp_registered():
    with registered():
        yield


class TestStampContract(GeneratorContract):
    method = "stamp"


def overrides(root: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"workdir={workdir}",
        "data.resolution=64",
        "products=[wood]",
        "methods=[stamp]",
        "evaluate.baselines=[]",
        f"generate.per_type={PER_TYPE}",
        f"generate.normals_per_product={NORMALS}",
        f"generate.intensity=[{','.join(map(str, LEVELS))}]",
        "generate.max_retries=3",
        "generate.quality.min_in_mask_change=0.03",
        "generate.quality.max_out_of_mask_change=0.1",
        "generate.quality.preview_per_type=1",
        "generate.batch_size=4",
        "generate.shard_maxcount=8",
        "generators.stamp={missing: {0: 2}, leaking: {1: 1}}",
        "ray.log_to_driver=false",
        *extra,
    ]


# -- intensity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "setting", "named"),
    [
        ("[stamp]", "{low: 0.5, high: 3.0}", "3.0 is outside stamp's weight w domain [-2.0, 2.0]"),
        ("[stamp]", "[1.0, -2.5]", "-2.5 is outside stamp's weight w domain [-2.0, 2.0]"),
        ("[perlin]", "[0.0, 0.5]", "0.0 is outside perlin's opacity domain (0.0, 1.0]"),
    ],
)
def test_out_of_domain_intensity_is_refused_before_any_work(
    tmp_path: Path, methods: str, setting: str, named: str
) -> None:
    cfg = load_config(None, [f"data.root={tmp_path / 'none'}", f"methods={methods}", f"generate.intensity={setting}"])
    with pytest.raises(ValueError, match="generate.intensity: ") as err:
        generate(cfg)  # no data, no Ray: the check comes first
    assert named in str(err.value)


def test_intensity_applies_only_to_methods_with_a_control(tmp_path: Path) -> None:
    args = [f"data.root={tmp_path}", "methods=[croppaste]", "evaluate.baselines=[]", "generate.intensity=[7.0]"]
    cfg = load_config(None, args)
    check_intensity(cfg)  # croppaste has no control value: nothing to check, nothing drawn


def test_an_empty_intensity_list_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="generate.intensity"):
        load_config(None, [f"data.root={tmp_path}", "generate.intensity=[]"])


def test_intensity_settings_draw_ranges_and_cycle_lists() -> None:
    rng = np.random.default_rng(0)
    drawn = [draw_from_setting(IntensityRange(low=0.5, high=1.5), i, rng) for i in range(50)]
    assert all(0.5 <= value <= 1.5 for value in drawn) and len(set(drawn)) > 10
    assert [draw_from_setting([0.5, 1.0, 1.5], i, rng) for i in range(5)] == [0.5, 1.0, 1.5, 0.5, 1.0]


def test_a_default_draw_outside_the_domain_is_refused() -> None:
    with pytest.raises(ValueError, match="default draw"):
        IntensityControl(meaning="w", low=-2.0, high=2.0, default=(1.0, 3.0))


# -- quality gates ------------------------------------------------------------------------------------------


def gated(image_change: float, background: float, mask: np.ndarray, foreground: np.ndarray | None, **gates: Any):
    source = np.full((16, 16, 3), 100, dtype=np.uint8)
    cond = np.zeros((16, 16), dtype=bool)
    cond[4:12, 4:12] = True
    image = source.astype(np.float32)
    image[mask] += 255 * image_change
    image[~cond & ~mask] += 255 * background
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    request = Request("p", "crack", 0, 0, 16, "train/good/000", "unused.png", "perlin")
    sample = measured_sample(request, method="m", source=source, image=image, mask=mask, cond_mask=cond, intensity=None)
    return judge(sample, source, foreground, QualityGates(**gates))


@pytest.mark.parametrize(
    ("change", "background", "area", "on_object", "gates", "reasons"),
    [
        (0.2, 0.0, 16, True, {}, ()),
        (0.2, 0.0, 4, True, {"min_mask_area": 5}, ("mask_too_small",)),
        (0.2, 0.0, 16, False, {"max_outside_foreground": 0.5}, ("outside_foreground",)),
        (0.01, 0.0, 16, True, {"min_in_mask_change": 0.05}, ("defect_missing",)),
        (0.2, 0.2, 16, True, {"max_out_of_mask_change": 0.1}, ("background_leaked",)),
        (0.0, 0.0, 0, True, {}, ("mask_too_small", "generator_qc")),
    ],
)
def test_each_gate_names_its_reason(change, background, area, on_object, gates, reasons) -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[5 : 5 + 4, 5 : 5 + area // 4] = True
    foreground = np.ones((16, 16), dtype=bool)
    if not on_object:
        foreground[:, :8] = False  # the mask lies mostly left of it
    verdict = gated(change, background, mask, foreground, **gates)
    assert verdict.reasons == reasons and verdict.accepted == (not reasons)


def test_retries_have_their_own_seeds_and_keys() -> None:
    request = Request("p", "crack", 0, 7, 16, "train/good/000", "unused.png", "perlin")
    attempts = [request]
    for _ in range(3):
        attempts.append(attempts[-1].retried())
    assert [a.attempt for a in attempts] == [0, 1, 2, 3]
    assert len({a.seed for a in attempts}) == len({a.key("m") for a in attempts}) == 4
    assert attempts[2] == request.retried().retried()  # derived, so a re-run finds the same keys
    assert Request.from_row(attempts[2].to_row()) == attempts[2]


def stamp_sample(request: Request, *, painted: bool) -> Any:
    source = np.full((16, 16, 3), 90, dtype=np.uint8)
    cond = np.zeros((16, 16), dtype=bool)
    cond[4:12, 4:12] = True
    image = source.copy()
    if painted:
        image[cond] = 200
    return measured_sample(
        request, method="stamp", source=source, image=image, mask=cond, cond_mask=cond, intensity=1.0
    )


def test_a_rerun_resumes_a_rejected_request_at_its_next_attempt(tmp_path: Path) -> None:
    request = Request("wood", "crack", 0, 11, 16, "train/good/000", "unused.png", "perlin")
    gates = QualityGates(min_in_mask_change=0.1)
    with DatasetWriter(tmp_path / "ds", preview_per_type=0) as writer:
        for attempt in (request, request.retried()):
            sample = stamp_sample(attempt, painted=False)
            verdict = judge(sample, np.full((16, 16, 3), 90, dtype=np.uint8), None, gates)
            writer.reject(gated_sample(sample, verdict, attempt.attempt), verdict.reasons)
    with DatasetWriter(tmp_path / "ds") as writer:
        assert writer.is_rejected(request.key("stamp")) and writer.is_rejected(request.retried().key("stamp"))
        assert resume_point(request, "stamp", writer, max_retries=3) == request.retried().retried()
        assert resume_point(request, "stamp", writer, max_retries=1) is None  # out of tries
        assert not accepted_in(request, "stamp", writer, max_retries=3)
        writer.write(gated_sample(stamp_sample(request.retried().retried(), painted=True), Verdict(None, ()), 2))
        assert resume_point(request, "stamp", writer, max_retries=3) is None
        assert accepted_in(request, "stamp", writer, max_retries=3)
    card = read_card(resolve(tmp_path / "ds"))
    assert card["samples"] == 1 and card["rejections"]["by_reason"] == {"defect_missing": 2}
    assert not any((tmp_path / "ds" / REJECTED_DIR).glob("*.png"))  # preview_per_type 0: the log only


def test_the_job_refuses_samples_that_break_the_declarations() -> None:
    generator = build_generator("stamp", {})
    request = Request("wood", "crack", 0, 11, 16, "train/good/000", "unused.png", "perlin", intensity=1.0)
    sample = stamp_sample(request, painted=True)
    check_sample(generator, request, sample)  # as declared
    normal = dataclasses.replace(request, label=0, defect_type="good")
    with pytest.raises(ValueError, match="has label 1, its request asked for 0"):
        check_sample(generator, normal, sample)
    relabelled = dataclasses.replace(sample, metadata=sample.metadata.model_copy(update={"label": 0}))
    with pytest.raises(ValueError, match="normal sample .* has a non-empty mask"):
        check_sample(generator, normal, relabelled)
    wild = dataclasses.replace(sample, metadata=sample.metadata.model_copy(update={"intensity": 5.0}))
    with pytest.raises(ValueError, match=r"intensity \(weight w\) 5.0 is outside its domain \[-2.0, 2.0\]"):
        check_sample(generator, request, wild)


# -- the generate job on a real Ray cluster -------------------------------------------------------------------


def register_stamp(cfg, prepared) -> None:
    """Fit stamp in-process and register it as ``defectsynth-wood-stamp@candidate``, as finetune would."""
    product, split = prepared.products[0], prepared.split.products["wood"]
    settings = cfg.generators["stamp"]
    with mlflow.start_run(experiment_id=experiment_id(cfg, "wood"), run_name="finetune-stamp"):
        context = FitContext(output_dir=cfg.workdir / "stamp-artifacts", max_steps=1)
        artifacts = build_generator("stamp", settings).fit(product, split, context)
        uri = log_generator(artifacts, "stamp", settings)
    register(uri, model_name("wood", "stamp"))


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("protocol") / "data"
    write_demo(root, size=64, train_good=6, test_good=2, per_defect=3, products=["wood"], progress=False)
    cfg = load_config(None, overrides(root, tmp_path_factory.mktemp("run")))
    with local_cluster("helpers.stamp_generator.register"):
        prepared = start(cfg)
        register_stamp(cfg, prepared)
        (first,) = generate(cfg, prepared)
        (again,) = generate(cfg, prepared)
        yield cfg, first, again


def shard_samples(uri: str) -> dict[str, dict[str, bytes]]:
    """Every sample in the dataset's complete shards: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((Path(uri) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_each_type_gets_exactly_per_type_accepted_and_the_normals(ran) -> None:
    _, first, _ = ran
    card = first.card
    assert card["counts"] == {"wood": {**{t: PER_TYPE for t in TYPES}, "good": NORMALS}}
    assert (card["normals"], card["anomalous"]) == (NORMALS, PER_TYPE * len(TYPES))
    assert first.written == card["samples"] == PER_TYPE * len(TYPES) + NORMALS and first.short == 0
    manifest = read_manifest(resolve(first.uri)).to_pylist()
    assert Counter(row["label"] for row in manifest) == {0: NORMALS, 1: PER_TYPE * len(TYPES)}
    assert all(row["qc_passed"] for row in manifest)


def test_normals_have_label_0_and_an_all_zero_mask(ran) -> None:
    _, first, _ = ran
    normals = {k: s for k, s in shard_samples(first.uri).items() if json.loads(s["json"])["label"] == 0}
    assert len(normals) == NORMALS
    for members in normals.values():
        meta = json.loads(members["json"])
        assert meta["defect_type"] == "good" and meta["mask_area"] == 0 and meta["bbox"] is None
        assert not png(members["mask.png"]).any() and "cond.png" not in members


def test_evaluation_keeps_generated_normals_out_of_the_defect_pairs_and_adds_them_on_request(ran) -> None:
    cfg, first, _ = ran
    task = eval_task(cfg, prepare_dataset(cfg), "wood")
    assert (task.segmenter.lr_milestones, task.segmenter.lr_gamma) == ((0.8, 0.9), 0.2)  # evaluate's, DRAEM's
    pairs = synthetic_pairs(task, DetectorRun(detector="classifier", method="stamp", max_steps=1, seed=0), 0, 1)
    seen = {next(pairs).defect_type for _ in range(3 * first.card["anomalous"])}
    assert seen == set(TYPES)  # every defect type, never "good"
    product, split = task.product_data()
    real = load_real(product, split.train_normals, task.resolution)
    assert training_normals(task, "stamp", real) is real  # evaluate.synthetic_normals is off by default
    task = task.model_copy(update={"synthetic_normals": True})
    assert training_normals(task, "none", real) is real
    normals = training_normals(task, "stamp", real)
    assert len(normals) == len(real) + NORMALS and not normals.labels.any() and not normals.masks.any()
    assert normals.defect_types[len(real) :] == ["good"] * NORMALS
    assert normals.images.shape[1:] == real.images.shape[1:]


def test_own_mask_is_mask_png_and_the_conditioning_mask_cond_png(ran) -> None:
    _, first, _ = ran
    for members in shard_samples(first.uri).values():
        meta = json.loads(members["json"])
        if meta["label"] == 0:
            continue
        mask, cond = png(members["mask.png"]) > 0, png(members["cond.png"]) > 0
        rows, cols = np.flatnonzero(cond.any(axis=1)), np.flatnonzero(cond.any(axis=0))
        expected = np.zeros_like(cond)
        expected[rows[0] + BORDER : rows[-1] + 1 - BORDER, cols[0] + BORDER : cols[-1] + 1 - BORDER] = True
        np.testing.assert_array_equal(mask, expected)  # the generator's own mask, not the changed region
        assert (cond & ~mask).any()
        scores = meta["qc"]["scores"]
        assert meta["strength"] == scores["in_mask_change"] > 0.03  # the measured change, for QC and metadata
        assert scores["out_of_mask_change"] <= 0.1 and scores["mask_area"] == mask.sum()


def test_intensity_used_is_in_metadata_and_manifest(ran) -> None:
    _, first, _ = ran
    rows = read_manifest(resolve(first.uri)).to_pylist()
    samples = shard_samples(first.uri)
    for row in rows:
        assert row["intensity"] == json.loads(samples[row["key"]]["json"])["intensity"] in LEVELS
    by_type = Counter((row["defect_type"], row["intensity"]) for row in rows)
    assert all(by_type[(t, level)] == 1 for t in TYPES for level in LEVELS)
    assert by_type[("good", LEVELS[0])] == 2 and by_type[("good", LEVELS[1])] == 1


def test_rejected_requests_are_retried_with_derived_seeds(ran) -> None:
    _, first, _ = ran
    rows = read_manifest(resolve(first.uri)).to_pylist()
    attempts = Counter((row["attempt"], row["label"]) for row in rows)
    # request 0 of each type: accepted on attempt 2; request 1: on attempt 1; normals: on attempt 0
    assert attempts == {(2, 1): len(TYPES), (1, 1): len(TYPES), (0, 0): NORMALS}
    assert first.rejected == sum(MISSING.values()) * len(TYPES) + sum(LEAKING.values()) * len(TYPES)


def test_rejections_are_counted_per_reason_and_type_and_previewed(ran) -> None:
    _, first, _ = ran
    card = read_card(resolve(first.uri))
    rejections = card["rejections"]
    per_type = sum(MISSING.values()) + sum(LEAKING.values())
    summary = shards_summary(first.uri, card, read_manifest(resolve(first.uri)))
    assert "rejected by the quality gates: 15 (background_leaked 5, defect_missing 10)" in summary
    assert rejections["total"] == card["qc_rejected"] == per_type * len(TYPES)
    assert rejections["by_reason"] == {"background_leaked": len(TYPES), "defect_missing": 2 * len(TYPES)}
    assert rejections["by_type"] == {"wood": dict.fromkeys(TYPES, per_type)}
    assert rejections["by_type_and_reason"]["wood"]["crack"] == {"background_leaked": 1, "defect_missing": 2}
    assert rejections["previewed"] == len(TYPES)
    preview = Path(first.uri) / REJECTED_DIR
    log = json.loads((preview / REJECTION_LOG).read_text())
    shown = [entry for entry in log if entry["previewed"]]
    assert len(log) == per_type * len(TYPES) and len(shown) == len(TYPES)
    written = set(shard_samples(first.uri))
    for entry in log:
        assert entry["key"] not in written  # rejected samples stay out of the dataset
    for entry in shown:
        meta = json.loads((preview / f"{entry['key']}.json").read_text())
        assert meta["rejected_for"] == entry["reasons"] and meta["qc"]["passed"] is False
        assert {p.name for p in preview.glob(f"{entry['key']}.*")} == {
            f"{entry['key']}.{ext}" for ext in ("png", "mask.png", "cond.png", "json")
        }


def test_mlflow_counts_rejections_per_reason_and_type(ran) -> None:
    cfg, _, _ = ran
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("defectsynth-wood")
    runs = client.search_runs([experiment.experiment_id], "tags.job = 'generate'", order_by=["start_time ASC"])
    metrics = runs[0].data.metrics
    assert metrics["qc_rejected"] == 3 * len(TYPES)
    assert metrics["qc_rejected.reason.defect_missing"] == 2 * len(TYPES)
    assert metrics["qc_rejected.reason.background_leaked"] == len(TYPES)
    assert all(metrics[f"qc_rejected.type.{t}"] == 3 for t in TYPES)
    assert metrics["samples"] == PER_TYPE * len(TYPES) + NORMALS and metrics["samples.good"] == NORMALS
    assert runs[0].data.params["intensity"] == str(list(LEVELS))


def test_mlflow_holds_a_sample_grid_per_defect_type_and_the_intensity_histogram(ran) -> None:
    cfg, _, _ = ran
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("defectsynth-wood")
    (run, *_) = client.search_runs([experiment.experiment_id], "tags.job = 'generate'", order_by=["start_time ASC"])
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples-stamp")}
    assert grids == {f"samples-stamp/{t}.png" for t in (*TYPES, "good")}
    assert "intensity-stamp.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_rerun_retries_nothing_and_writes_nothing(ran) -> None:
    _, first, again = ran
    assert (again.written, again.rejected, again.short) == (0, 0, 0)
    assert again.skipped == PER_TYPE * len(TYPES) + NORMALS
    assert again.card["rejections"] == first.card["rejections"] and again.card["digest"] == first.card["digest"]


def test_a_column_of_nones_turned_nan_by_ray_data_is_no_member() -> None:
    # Ray Data gives a batch column with no value in any row as NaN floats; they are not a cond.png
    request = Request("wood", "crack", 0, 11, 16, "train/good/000", "unused.png", "learned")
    image = np.full((16, 16, 3), 90, dtype=np.uint8)
    sample = measured_sample(
        request, method="seas", source=image, image=image + 9, mask=image[..., 0] > 0, cond_mask=None, intensity=None
    )
    encoded = encode_sample(sample)
    row = {"key": encoded.key} | {column: encoded.members.get(member) for column, member in COLUMNS.items()}
    row = {name: np.float32("nan") if value is None else value for name, value in row.items()}
    assert "cond.png" not in encoded.members and set(decode_row(row).members) == set(encoded.members)
