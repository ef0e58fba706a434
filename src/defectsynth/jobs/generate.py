"""``jobs.generate``: requests -> generator actors (Ray Data) -> WebDataset shards, tracked in MLflow.

For each method, request rows (product x defect type x ``generate.per_type``) flow through
``map_batches`` with ``GenerationActor`` (an ``ActorPoolStrategy`` pool); each actor loads the
product's generator from the MLflow registry and returns encoded samples, which the driver streams
into shards (it never holds the dataset). Keys already in the dataset are not generated again.

    python -m defectsynth.jobs.generate --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import ray.data
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from defectsynth.core.figures import sample_grid
from defectsynth.generators.base import Generator, MaskSource, Request, auto_mask_source, generator_class
from defectsynth.jobs.common import run_main, start
from defectsynth.platform.cluster import cpus_per_task
from defectsynth.platform.config import Config
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import experiment_id, load_generator, model_name, registry_uri, resolve_version
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import COND, IMAGE, MASK, META, EncodedSample, SampleMetadata, decode_png, encode_sample
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

COLUMNS = {"png": IMAGE, "mask_png": MASK, "cond_png": COND, "json": META}  # batch column -> tar member
GRID_SAMPLES = 16


def request_seed(seed: int, product: str, defect_type: str, index: int) -> int:
    """A per-request seed, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{product}/{defect_type}/{index}".encode()).hexdigest()
    return int(digest[:12], 16)


def product_requests(cfg: Config, product: ProductData, split: ProductSplit, mask_source: MaskSource) -> list[Request]:
    """``per_type`` requests per defect type: a normal from the training pool, a mask source, a seed."""
    normals = [product.record(i) for i in split.train_normals]
    requests = []
    for defect_type in product.defect_types:
        masks = [product.record(i) for i in split.generator_train[defect_type]]
        for index in range(cfg.generate.per_type):
            seed = request_seed(cfg.seed, product.name, defect_type, index)
            rng = np.random.default_rng(seed)
            source = normals[rng.integers(len(normals))]
            mask = masks[rng.integers(len(masks))] if mask_source == "real" else None
            low_high = cfg.generate.intensity_range
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
                    intensity=round(float(rng.uniform(*low_high)), 4) if low_high else None,
                )
            )
    return requests


class GenerationActor:
    """Ray Data callable class: loads each product's registered generator once, encodes its samples."""

    def __init__(self, tracking_uri: str, model_uris: dict[str, str], versions: dict[str, str], threads: int) -> None:
        torch.set_num_threads(threads)
        mlflow.set_tracking_uri(tracking_uri)
        self.model_uris, self.versions = model_uris, versions
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
            group = [r for r in requests if r.product == product]
            for sample in self._generator(product).generate(group):
                encoded = self._encode(sample, product)
                out["key"].append(encoded.key)
                for column, member in COLUMNS.items():
                    out[column].append(encoded.members.get(member))
        return out


def decode_row(row: dict[str, Any]) -> EncodedSample:
    """An EncodedSample from one output row of the actors."""
    members = {member: bytes(row[column]) for column, member in COLUMNS.items() if row[column] is not None}
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


def run_method(cfg: Config, prepared: PreparedData, method: str) -> tuple[GenerateOutcome, dict[str, list]]:
    """Generate one method's missing samples into its dataset; returns the outcome and grid samples."""
    cls = generator_class(method)
    mask_source = cfg.generate.mask_source
    if mask_source == "auto":
        mask_source = auto_mask_source(method, tiny_base=cfg.diffusion.is_tiny)
    if mask_source not in cls.mask_sources:
        msg = f"generator {method!r} takes mask sources {cls.mask_sources}, not {mask_source!r}"
        raise ValueError(msg)
    versions = {
        p.name: resolve_version(model_name(p.name, method), cfg.generate.model_alias) for p in prepared.products
    }
    uris = {p: registry_uri(model_name(p, method), v.version) for p, v in versions.items()}
    uri = cfg.generate.dataset_uri(cfg.workdir, method)
    requests = [
        r for p in prepared.products for r in product_requests(cfg, p, prepared.split.products[p.name], mask_source)
    ]
    grid: dict[str, list] = {}
    started = time.perf_counter()
    split_info = {"path": str(prepared.split_path), "digest": prepared.split.digest()}
    with DatasetWriter(
        uri,
        maxcount=cfg.generate.shard_maxcount,
        maxsize=cfg.generate.shard_maxsize,
        config=cfg.model_dump(mode="json"),
        split=split_info,
    ) as writer:
        todo = [r.to_row() for r in requests if r.key(method) not in writer]
        logger.info("%s: %d request(s), %d already in %s", method, len(requests), len(requests) - len(todo), uri)
        if todo:
            results = ray.data.from_items(todo).map_batches(
                GenerationActor,
                fn_constructor_kwargs={
                    "tracking_uri": cfg.tracking_uri,
                    "model_uris": uris,
                    "versions": {p: str(v.version) for p, v in versions.items()},
                    "threads": cpus_per_task(cfg.generate.cpus_per_actor),
                },
                compute=ray.data.ActorPoolStrategy(size=cfg.generate.actors),
                num_cpus=cfg.generate.cpus_per_actor,
                num_gpus=cfg.generate.gpus_per_actor or None,
                batch_size=cfg.generate.batch_size,
                batch_format="numpy",
            )
            for batch in results.iter_batches(batch_size=cfg.generate.batch_size, batch_format="numpy"):
                for values in zip(*batch.values(), strict=True):
                    encoded = decode_row(dict(zip(batch, values, strict=True)))
                    writer.write(encoded)
                    _keep_for_grid(grid, encoded)
    seconds = time.perf_counter() - started
    assert writer.card is not None
    present = len(requests) - len(todo) + writer.skipped
    return GenerateOutcome(method, mask_source, uri, writer.card, writer.written, present, seconds), grid


def _keep_for_grid(grid: dict[str, list], sample: EncodedSample) -> None:
    """Keep the first few samples of each product for the MLflow sample grid."""
    kept = grid.setdefault(sample.metadata.product, [])
    if len(kept) < GRID_SAMPLES:
        kept.append((decode_png(sample.members[IMAGE]), decode_png(sample.members[MASK]) > 0))


def log_generate(cfg: Config, outcome: GenerateOutcome, grid: dict[str, list]) -> list[str]:
    """One MLflow run per product: the dataset as input, counts, throughput, the sample grid."""
    source = resolve_dataset_source(outcome.uri)
    dataset = MetaDataset(source=source, name=f"defectsynth-{outcome.method}", digest=outcome.card["digest"][:32])
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
                    "dataset_uri": outcome.uri,
                    "digest": outcome.card["digest"],
                    "per_type": cfg.generate.per_type,
                    "mask_source": outcome.mask_source,
                    "model_alias": cfg.generate.model_alias,
                }
            )
            mlflow.log_metrics(
                {
                    "samples": float(sum(counts.values())),
                    "samples_per_s": outcome.written / outcome.seconds if outcome.written else 0.0,
                    "qc_rejected": float(outcome.card["qc_rejected_by_product"].get(product, 0)),
                    **{f"samples.{t}": float(n) for t, n in counts.items()},
                }
            )
            if grid.get(product):
                images, masks = zip(*grid[product], strict=True)
                mlflow.log_image(sample_grid(images, masks), artifact_file=f"samples-{outcome.method}.png")
            run_ids.append(run.info.run_id)
    return run_ids


def generate(cfg: Config, prepared: PreparedData | None = None) -> list[GenerateOutcome]:
    """Generate every configured method's dataset; returns one outcome per method."""
    prepared = prepared or start(cfg)
    if not cfg.methods:
        msg = "nothing to generate: set methods (e.g. --set methods=[perlin,croppaste])"
        raise ValueError(msg)
    outcomes = []
    for method in cfg.methods:
        outcome, grid = run_method(cfg, prepared, method)
        log_generate(cfg, outcome, grid)
        logger.info(
            "%s: wrote %d, skipped %d, %d samples in %s (%.1f samples/s)",
            method,
            outcome.written,
            outcome.skipped,
            outcome.card["samples"],
            outcome.uri,
            outcome.written / outcome.seconds if outcome.written else 0.0,
        )
        outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("generate", __doc__.splitlines()[0], generate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
