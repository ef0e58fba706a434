"""``jobs.generate``: requests -> generator actors (Ray Data) -> quality gates -> WebDataset shards, in MLflow.

For each method, request rows (product x defect type x ``generate.per_type``, plus
``generate.normals_per_product`` normal requests per product when the method declares ``makes_normals``)
flow through ``map_batches`` with ``GenerationActor`` (an ``ActorPoolStrategy`` pool); each actor loads the
product's generator from the MLflow registry, judges every sample by the quality gates
(``generate.quality``) and re-tries a rejected request with a derived seed, up to ``generate.max_retries``
times, so each type reaches ``per_type`` accepted samples. It returns accepted and rejected samples alike,
encoded; the driver streams the accepted ones into shards (it never holds the dataset) and logs the
rejected ones (a few previewed) under ``rejected/``. Keys already in the dataset are not generated
again, and an attempt rejected in an earlier run is not re-tried: its request resumes at the next attempt.
The job reads what a method can do from its class (``makes_normals``, ``intensity``), never its name.

    python -m defectsynth.jobs.generate --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import ray.data
import torch
from mlflow.entities.model_registry import ModelVersion
from tqdm import tqdm

from defectsynth.core.figures import sample_grid
from defectsynth.core.plots import histogram
from defectsynth.diffusion.settings import is_tiny_base
from defectsynth.generators.base import Generator, MaskSource, Request, auto_mask_source, generator_class
from defectsynth.generators.intensity import IntensityRange, IntensitySetting, draw_from_setting
from defectsynth.generators.masks import load_foreground, load_source
from defectsynth.generators.quality_gates import QualityGates, gated_sample, judge
from defectsynth.jobs.common import run_main, start
from defectsynth.platform.cluster import cpus_per_task
from defectsynth.platform.config import Config
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import (
    check_registered_generator,
    dataset_input,
    experiment_id,
    load_generator,
    model_name,
    registry_uri,
    resolve_version,
    settings_digest,
)
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.fs import resolve
from defectsynth.storage.manifest import read_manifest
from defectsynth.storage.records import NORMAL, ProductData
from defectsynth.storage.redact import redact
from defectsynth.storage.sample import (
    COND,
    IMAGE,
    MASK,
    META,
    EncodedSample,
    Sample,
    SampleMetadata,
    decode_png,
    encode_sample,
)
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

COLUMNS = {"png": IMAGE, "mask_png": MASK, "cond_png": COND, "json": META}  # batch column -> tar member
GRID_PER_TYPE = 8  # samples per defect type in the MLflow grids


def request_seed(seed: int, product: str, defect_type: str, index: int) -> int:
    """A per-request seed, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{product}/{defect_type}/{index}".encode()).hexdigest()
    return int(digest[:12], 16)


def run_intensity(cfg: Config, cls: type[Generator]) -> IntensitySetting | None:
    """The ``generate.intensity`` that applies to ``cls``: None for a method without a control value."""
    return cfg.generate.intensity if cls.intensity is not None else None


def check_intensity(cfg: Config) -> None:
    """Check ``generate.intensity`` against every method's declared domain before anything is generated."""
    setting = cfg.generate.intensity
    if setting is None:
        return
    for method in cfg.methods:
        control = generator_class(method).intensity
        if control is None:
            logger.info("%s has no intensity control; generate.intensity does not apply to it", method)
        else:
            control.check(setting, method=method)


def product_requests(
    cfg: Config, product: ProductData, split: ProductSplit, mask_source: MaskSource, cls: type[Generator]
) -> list[Request]:
    """``per_type`` requests per defect type, then the normal requests when ``cls`` makes normals.

    Each draws a normal from the training pool, a training defect's mask (mask source "real"), an intensity
    (``generate.intensity``, when the method has a control value; otherwise the method draws its default),
    all from its own seed. Normal requests have label 0 and defect type ``good``.
    """
    normals = [product.record(i) for i in split.train_normals]
    setting = run_intensity(cfg, cls)
    slots = [(defect_type, cfg.generate.per_type) for defect_type in product.defect_types]
    if cls.makes_normals and cfg.generate.normals_per_product:
        slots.append((NORMAL, cfg.generate.normals_per_product))
    requests = []
    for defect_type, count in slots:
        masks = [product.record(i) for i in split.generator_train.get(defect_type, ())]
        for index in range(count):
            seed = request_seed(cfg.seed, product.name, defect_type, index)
            rng = np.random.default_rng(seed)
            source = normals[rng.integers(len(normals))]
            mask = masks[rng.integers(len(masks))] if mask_source == "real" and defect_type != NORMAL else None
            requests.append(
                Request(
                    product=product.name,
                    defect_type=defect_type,
                    sample_index=index,
                    seed=seed,
                    resolution=cfg.data.resolution,
                    source_image=source.image_id,
                    source_path=str(source.path),
                    mask_source=mask_source,
                    mask_image=mask.image_id if mask else None,
                    mask_paths=tuple(str(p) for p in mask.mask_paths) if mask else (),
                    foreground_path=str(source.foreground_path) if source.foreground_path else None,
                    intensity=draw_from_setting(setting, index, rng) if setting is not None else None,
                    label=0 if defect_type == NORMAL else 1,
                )
            )
    return requests


def check_sample(generator: Generator, request: Request, sample: Sample) -> None:
    """Raise ValueError when ``sample`` breaks the contract for ``request``: label, normal mask, intensity."""
    name, meta = generator.name, sample.metadata
    if meta.label != request.label:
        msg = f"{name}: sample {sample.key} has label {meta.label}, its request asked for {request.label}"
        raise ValueError(msg)
    if request.label == 0 and sample.mask.any():
        msg = f"{name}: normal sample {sample.key} has a non-empty mask ({int(sample.mask.sum())} pixels)"
        raise ValueError(msg)
    if generator.intensity is not None:
        if meta.intensity is None:
            msg = f"{name}: sample {sample.key} records no intensity, though {name} declares a control value"
            raise ValueError(msg)
        generator.intensity.check_value(meta.intensity, method=name)


def resume_point(request: Request, method: str, writer: DatasetWriter, max_retries: int) -> Request | None:
    """The attempt at ``request`` still to run, or None when one is in the dataset or all were rejected before.

    Attempts rejected in an earlier run are skipped (their seeds are derived in order), so a re-run never
    generates a rejected key again.
    """
    attempt = request
    while True:
        key = attempt.key(method)
        if key in writer:
            return None
        if not writer.is_rejected(key):
            return attempt
        if attempt.attempt >= max_retries:
            return None
        attempt = attempt.retried()


def attempt_keys(request: Request, method: str, max_retries: int) -> list[str]:
    """The keys of the request's attempts 0 .. ``max_retries``: every sample the request may own in a dataset."""
    keys, attempt = [], request
    for _ in range(max_retries + 1):
        keys.append(attempt.key(method))
        attempt = attempt.retried()
    return keys


def accepted_in(request: Request, method: str, writer: DatasetWriter, max_retries: int) -> bool:
    """Whether one of the request's attempts (0 .. ``max_retries``) is in the dataset."""
    return any(key in writer for key in attempt_keys(request, method, max_retries))


def dataset_identity(versions: dict[str, ModelVersion]) -> dict[str, dict[str, str]]:
    """Per product, the model version that generates and the digest of the settings it was fitted with (its tag)."""
    return {
        product: {
            "model_version": str(version.version),
            "settings_digest": (version.tags or {}).get("settings_digest", "unrecorded"),
        }
        for product, version in versions.items()
    }


def warn_on_unfitted_settings(cfg: Config, method: str, versions: dict[str, ModelVersion]) -> None:
    """Warn where the config's settings of ``method`` are not those its registered versions were fitted with.

    A registered generator carries its settings, generation settings included, and generates with them.
    """
    wanted = settings_digest(cfg.generators.get(method, {}))
    other = sorted(p for p, v in versions.items() if (v.tags or {}).get("settings_digest", wanted) != wanted)
    if other:
        logger.warning(
            "%s: the config's generators.%s differ from the settings its %s version(s) were fitted with; generation "
            "uses the versions' own (run jobs.finetune to fit the config's)",
            method,
            method,
            ", ".join(other),
        )


class GenerationActor:
    """Ray Data callable class: loads each product's registered generator once, encodes its samples."""

    def __init__(
        self,
        tracking_uri: str,
        model_uris: dict[str, str],
        versions: dict[str, str],
        threads: int,
        gates: dict[str, Any] | None = None,
        max_retries: int = 0,
    ) -> None:
        torch.set_num_threads(threads)
        mlflow.set_tracking_uri(tracking_uri)
        self.model_uris, self.versions = model_uris, versions
        self.gates = QualityGates.model_validate(gates or {})
        self.max_retries = max_retries
        self.generators: dict[str, Generator] = {}

    def _generator(self, product: str) -> Generator:
        """The product's generator, loaded from the registry on first use."""
        if product not in self.generators:
            self.generators[product] = load_generator(self.model_uris[product])
        return self.generators[product]

    def _encode(self, sample: Any, product: str) -> EncodedSample:
        generator = sample.metadata.generator.model_copy(
            update={"model_uri": self.model_uris[product], "model_version": self.versions[product]}
        )
        sample.metadata.generator = generator
        return encode_sample(sample)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        """Request columns in, encoded sample columns out (key, png, mask_png, cond_png, json)."""
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        requests = [Request.from_row(row) for row in rows]
        out: dict[str, list[Any]] = {"key": [], **{column: [] for column in COLUMNS}}
        for product in dict.fromkeys(r.product for r in requests):
            for sample in self._attempts(product, [r for r in requests if r.product == product]):
                encoded = self._encode(sample, product)
                out["key"].append(encoded.key)
                for column, member in COLUMNS.items():
                    out[column].append(encoded.members.get(member))
        return out

    def _attempts(self, product: str, requests: list[Request]) -> list[Sample]:
        """Generate and judge; re-try each rejected request with its next seed until accepted or out of tries.

        Returns every attempt's sample, accepted (``qc.passed``) or rejected (with ``rejected_for``).
        """
        generator = self._generator(product)
        samples, pending = [], requests
        while pending:
            retry = []
            for request, sample in zip(pending, generator.generate(pending), strict=True):
                check_sample(generator, request, sample)
                verdict = judge(sample, load_source(request), load_foreground(request), self.gates)
                samples.append(gated_sample(sample, verdict, request.attempt))
                if not verdict.accepted and request.attempt < self.max_retries:
                    retry.append(request.retried())
            pending = retry
        return samples


def is_present(value: Any) -> bool:
    """Whether an output column holds a member: neither None nor the NaN that Ray Data makes of a column of Nones.

    A batch in which no sample has a conditioning mask (SeaS's) would otherwise write NaN's bytes as ``cond.png``.
    """
    return value is not None and not (isinstance(value, float | np.floating) and math.isnan(value))


def decode_row(row: dict[str, Any]) -> EncodedSample:
    """An EncodedSample from one output row of the actors."""
    members = {member: bytes(row[column]) for column, member in COLUMNS.items() if is_present(row[column])}
    metadata = SampleMetadata.model_validate_json(members[META])
    return EncodedSample(key=str(row["key"]), members=members, metadata=metadata)


@dataclass(frozen=True)
class GenerateOutcome:
    """One method's dataset after a generate run."""

    method: str
    mask_source: str
    uri: str
    card: dict[str, Any]
    written: int
    skipped: int
    seconds: float
    rejected: int = 0  # attempts the quality gates kept out in this run
    short: int = 0  # requests with no accepted attempt after max_retries re-tries


def run_method(cfg: Config, prepared: PreparedData, method: str) -> tuple[GenerateOutcome, dict[str, dict[str, list]]]:
    """Generate one method's missing samples into its dataset; returns the outcome and grid samples."""
    cls = generator_class(method)
    mask_source = cfg.generate.mask_source
    if mask_source == "auto":
        mask_source = auto_mask_source(method, tiny_base=is_tiny_base(cfg.diffusion.base_model))
    if mask_source not in cls.mask_sources:
        msg = f"generator {method!r} takes mask sources {cls.mask_sources}, not {mask_source!r}"
        raise ValueError(msg)
    versions = {
        p.name: resolve_version(model_name(p.name, method), cfg.generate.model_alias) for p in prepared.products
    }
    for version in versions.values():
        check_registered_generator(version, method)
    warn_on_unfitted_settings(cfg, method, versions)
    uris = {p: registry_uri(model_name(p, method), v.version) for p, v in versions.items()}
    uri = cfg.generate.dataset_uri(cfg.workdir, method)
    requests = [
        r
        for p in prepared.products
        for r in product_requests(cfg, p, prepared.split.products[p.name], mask_source, cls)
    ]
    retries = cfg.generate.max_retries
    grid: dict[str, dict[str, list]] = {}
    started = time.perf_counter()
    split_info = {"path": str(prepared.split_path), "digest": prepared.split.digest()}
    with DatasetWriter(
        uri,
        maxcount=cfg.generate.shard_maxcount,
        maxsize=cfg.generate.shard_maxsize,
        config=cfg.public_dump(),
        split=split_info,
        preview_per_type=cfg.generate.quality.preview_per_type,
        identity=dataset_identity(versions),
    ) as writer:
        writer.retain({key for r in requests for key in attempt_keys(r, method, retries)}, list(versions))
        present = sum(accepted_in(r, method, writer, retries) for r in requests)
        todo = [a.to_row() for r in requests if (a := resume_point(r, method, writer, retries)) is not None]
        logger.info("%s: %d request(s), %d already in %s", method, len(requests), present, redact(uri))
        rejected = 0
        if todo:
            results = ray.data.from_items(todo).map_batches(
                GenerationActor,
                fn_constructor_kwargs={
                    "tracking_uri": cfg.tracking_uri,
                    "model_uris": uris,
                    "versions": {p: str(v.version) for p, v in versions.items()},
                    "threads": cpus_per_task(cfg.generate.cpus_per_actor),
                    "gates": cfg.generate.quality.model_dump(),
                    "max_retries": retries,
                },
                compute=ray.data.ActorPoolStrategy(size=cfg.generate.actors),
                num_cpus=cfg.generate.cpus_per_actor,
                num_gpus=cfg.generate.gpus_per_actor or None,
                batch_size=cfg.generate.batch_size,
                batch_format="numpy",
            )
            rejected = write_results(results, writer, grid, method, len(todo), cfg.generate.batch_size)
        short = len(requests) - sum(accepted_in(r, method, writer, retries) for r in requests)
    if short:
        logger.warning("%s: %d request(s) had no accepted sample after %d re-tries each", method, short, retries)
    seconds = time.perf_counter() - started
    assert writer.card is not None
    outcome = GenerateOutcome(
        method, mask_source, uri, writer.card, writer.written, present + writer.skipped, seconds, rejected, short
    )
    return outcome, grid


def write_results(
    results: ray.data.Dataset,
    writer: DatasetWriter,
    grid: dict[str, dict[str, list]],
    method: str,
    total: int,
    batch: int,
) -> int:
    """Stream the actors' samples into ``writer`` under a progress bar: accepted ones written, rejected ones recorded.

    Returns how many were rejected.
    """
    rejected = 0
    with tqdm(total=total, desc=f"generate {method}", unit="sample", mininterval=2) as bar:
        for rows in results.iter_batches(batch_size=batch, batch_format="numpy"):
            for values in zip(*rows.values(), strict=True):
                encoded = decode_row(dict(zip(rows, values, strict=True)))
                if encoded.metadata.qc.passed:
                    writer.write(encoded)
                    _keep_for_grid(grid, encoded)
                    bar.update()
                else:
                    rejected += writer.reject(encoded, tuple(encoded.metadata.model_extra["rejected_for"]))
                    bar.set_postfix(rejected=rejected, refresh=False)
    return rejected


def _keep_for_grid(grid: dict[str, dict[str, list]], sample: EncodedSample) -> None:
    """Keep the first few samples of each product and defect type for the MLflow sample grids."""
    kept = grid.setdefault(sample.metadata.product, {}).setdefault(sample.metadata.defect_type, [])
    if len(kept) < GRID_PER_TYPE:
        kept.append((decode_png(sample.members[IMAGE]), decode_png(sample.members[MASK]) > 0))


def intensities_by_product(uri: str) -> dict[str, list[float]]:
    """The recorded intensity of every sample in the dataset, per product (read from the manifest once)."""
    by_product: dict[str, list[float]] = {}
    for row in read_manifest(resolve(uri), ["product", "intensity"]).to_pylist():
        if row["intensity"] is not None:
            by_product.setdefault(row["product"], []).append(row["intensity"])
    return by_product


def log_figures(outcome: GenerateOutcome, product: str, grid: dict[str, list], intensities: list[float]) -> None:
    """Into the active run: a sample grid with mask overlays per defect type, and the intensity histogram."""
    for defect_type, kept in sorted(grid.items()):
        images, masks = zip(*kept, strict=True)
        mlflow.log_image(sample_grid(images, masks), artifact_file=f"samples-{outcome.method}/{defect_type}.png")
    if intensities:
        title = f"{outcome.method} on {product}: the intensity of each sample"
        mlflow.log_image(histogram(intensities, title, "intensity"), artifact_file=f"intensity-{outcome.method}.png")


def rejection_metrics(card: dict[str, Any], product: str) -> dict[str, float]:
    """The product's gate rejections as metrics: ``qc_rejected.reason.<reason>`` and ``qc_rejected.type.<type>``."""
    per_type = card["rejections"]["by_type_and_reason"].get(product, {})
    reasons: Counter[str] = Counter()
    for counts in per_type.values():
        reasons.update(counts)
    return {
        **{f"qc_rejected.reason.{reason}": float(n) for reason, n in sorted(reasons.items())},
        **{f"qc_rejected.type.{t}": float(n) for t, n in card["rejections"]["by_type"].get(product, {}).items()},
    }


def intensity_param(cfg: Config, method: str) -> str:
    """How ``method``'s intensity was chosen: the run's setting, the method's default draw, or none."""
    control = generator_class(method).intensity
    if control is None:
        return "none"
    setting = cfg.generate.intensity
    if setting is None:
        return f"default U{list(control.default)} in {control.describe()}"
    return str(setting.model_dump() if isinstance(setting, IntensityRange) else setting)


def log_generate(cfg: Config, outcome: GenerateOutcome, grid: dict[str, dict[str, list]]) -> list[str]:
    """One MLflow run per product: the dataset as input, counts, throughput, sample grids, the intensity histogram."""
    dataset = dataset_input(outcome.uri, outcome.method, outcome.card["digest"])
    intensities = intensities_by_product(outcome.uri)
    run_ids = []
    for product, counts in outcome.card["counts"].items():
        tags = {"product": product, "method": outcome.method, "job": "generate"}
        with mlflow.start_run(
            experiment_id=experiment_id(cfg, product), run_name=f"generate-{outcome.method}", tags=tags
        ) as run:
            mlflow.log_input(dataset, context="generated")
            mlflow.log_params(
                {
                    "method": outcome.method,
                    "dataset_uri": redact(outcome.uri),
                    "digest": outcome.card["digest"],
                    "per_type": cfg.generate.per_type,
                    "mask_source": outcome.mask_source,
                    "model_alias": cfg.generate.model_alias,
                    "intensity": intensity_param(cfg, outcome.method),
                    "max_retries": cfg.generate.max_retries,
                    "normals_per_product": cfg.generate.normals_per_product,
                }
            )
            mlflow.log_metrics(
                {
                    "samples": float(sum(counts.values())),
                    "samples_per_s": outcome.written / outcome.seconds if outcome.written else 0.0,
                    "qc_rejected": float(outcome.card["qc_rejected_by_product"].get(product, 0)),
                    **{f"samples.{t}": float(n) for t, n in counts.items()},
                    **rejection_metrics(outcome.card, product),
                }
            )
            log_figures(outcome, product, grid.get(product, {}), intensities.get(product, []))
            run_ids.append(run.info.run_id)
    return run_ids


def generate(cfg: Config, prepared: PreparedData | None = None) -> list[GenerateOutcome]:
    """Generate every configured method's dataset; returns one outcome per method.

    ``generate.intensity`` is checked against every method's domain first, so a bad value fails the run
    before any cluster work.
    """
    check_intensity(cfg)
    prepared = prepared or start(cfg)
    if not cfg.methods:
        msg = "nothing to generate: set methods (e.g. --set methods=[perlin,croppaste])"
        raise ValueError(msg)
    outcomes = []
    for method in cfg.methods:
        outcome, grid = run_method(cfg, prepared, method)
        log_generate(cfg, outcome, grid)
        logger.info(
            "%s: wrote %d, skipped %d, rejected %d, %d samples in %s (%.1f samples/s)",
            method,
            outcome.written,
            outcome.skipped,
            outcome.rejected,
            outcome.card["samples"],
            redact(outcome.uri),
            outcome.written / outcome.seconds if outcome.written else 0.0,
        )
        outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("generate", __doc__.splitlines()[0], generate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
