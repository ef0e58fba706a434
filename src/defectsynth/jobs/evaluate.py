"""``jobs.evaluate``: does a method's synthetic data teach a detector to find the real defects?

Per product, a Ray Train fit trains, for each method in turn, DRAEM's segmentation U-Net (focal loss) on real
training normals plus synthetic pairs streamed from the method's shards, keeps the weights that
score best on the validation split (training side only), and a Ray task scores them on the held-out
test split. Metrics land in MLflow under the stable names, tagged with product, method and
detector, linked to the model version and dataset digest; ``champion`` moves only on improvement.

    python -m defectsynth.jobs.evaluate --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from pydantic import BaseModel, ConfigDict

from defectsynth.evaluation.data import RealImages, batches, load_real
from defectsynth.evaluation.metrics import score_detection
from defectsynth.evaluation.segmenter import SegmenterConfig, build_segmenter, focal_loss, predict
from defectsynth.jobs.common import run_main, start
from defectsynth.jobs.training import MethodCheckpoints, fit_products, worker_rank
from defectsynth.platform.config import Config, StrategyConfig
from defectsynth.platform.distributed import TrainEngine
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import experiment_id, model_name, record_scores, resolve_version
from defectsynth.storage import stream
from defectsynth.storage.fs import resolve
from defectsynth.storage.layouts import LayoutOptions, read_product
from defectsynth.storage.manifest import read_card
from defectsynth.storage.split import load_split

logger = logging.getLogger(__name__)

DETECTOR = "segmenter"
BEST, CURRENT, STATE = "best.pt", "current.pt", "state.json"


class EvalTask(BaseModel):
    """Everything one detector fit needs, as plain data."""

    model_config = ConfigDict(extra="forbid")

    product: str
    methods: list[str]
    dataset_uris: dict[str, str]
    data_root: str
    layout: str
    layout_options: dict[str, Any]
    split_path: str
    resolution: int
    max_steps: int
    batch_size: int
    synthetic_fraction: float
    validate_every: int
    checkpoint_every: int
    seed: int
    threads: int
    segmenter: SegmenterConfig
    strategy: StrategyConfig


def synthetic_pairs(
    task: EvalTask, method: str, rank: int, world_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (image, mask) pairs of the method's QC-passed samples for this product, reshuffled each pass."""
    for epoch in range(1 << 30):
        count = 0
        samples = stream(
            task.dataset_uris[method],
            products=[task.product],
            methods=[method],
            qc_passed=True,
            shuffle=256,
            seed=task.seed + epoch,
            rank=rank,
            world_size=world_size,
        )
        for sample in samples:
            count += 1
            yield sample["image"], sample["mask"]
        if count == 0:
            msg = f"{task.dataset_uris[method]}: no QC-passed {method} samples of {task.product} for rank {rank}"
            raise ValueError(msg)


def training_batch(
    normals: RealImages,
    synthetic: Iterator[tuple[torch.Tensor, torch.Tensor]],
    task: EvalTask,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of real normals (empty masks) and synthetic defects, ``synthetic_fraction`` of it synthetic."""
    n_synthetic = max(1, round(task.batch_size * task.synthetic_fraction))
    picks = rng.integers(len(normals), size=task.batch_size - n_synthetic)
    pairs = [next(synthetic) for _ in range(n_synthetic)]
    images = torch.cat([normals.images[picks], torch.stack([p[0] for p in pairs])])
    masks = torch.cat(
        [torch.zeros(len(picks), 1, task.resolution, task.resolution), torch.stack([p[1] for p in pairs])]
    )
    return images, masks


def score_images(model: torch.nn.Module, real: RealImages, batch_size: int = 16) -> dict[str, float]:
    """Run the segmenter on real images and compute the detection metrics against their ground truth."""
    maps, scores = [], []
    for images, _ in batches(real, batch_size):
        out = predict(model, images)
        maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
        scores.append(out.pred_score.float().cpu().numpy())
    return score_detection(
        anomaly_maps=np.concatenate(maps),
        gt_masks=real.masks[:, 0].numpy() > 0.5,
        image_scores=np.concatenate(scores),
        labels=real.labels,
        defect_types=real.defect_types,
    )


def _save(directory: Path, engine: TrainEngine, best: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(engine.state_dict(), directory / CURRENT)
    torch.save(best, directory / BEST)
    (directory / STATE).write_text(json.dumps(state))


def train_detector(
    task: EvalTask, method: str, data: tuple[RealImages, RealImages], checkpoints: MethodCheckpoints
) -> None:
    """Train one method's segmenter, keep the best weights on validation, checkpoint as it goes."""
    normals, validation = data
    rank, world_size = worker_rank()
    model = build_segmenter(task.segmenter)
    state: dict[str, Any] = {"step": 0, "best_score": -1.0, "best_step": 0, "resumed_at": []}
    resume = checkpoints.progress(method)
    if resume is not None:
        model.load_state_dict(torch.load(resume / CURRENT))
        state = json.loads((resume / STATE).read_text())
        state["resumed_at"].append(state["step"])
        logger.info("resuming %s/%s at step %d", task.product, method, state["step"])
    best = torch.load(resume / BEST) if resume else {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=task.segmenter.lr)
    engine = TrainEngine(model, optimizer, task.strategy, micro_batch_size=task.batch_size)
    synthetic = synthetic_pairs(task, method, rank, world_size)
    rng = np.random.default_rng([task.seed, rank, state["step"]])
    for step in range(state["step"] + 1, task.max_steps + 1):
        engine.train()
        images, masks = training_batch(normals, synthetic, task, rng)
        out = engine(engine.to_device(images))
        loss = focal_loss(out.logits.float(), masks.to(out.logits.device), gamma=task.segmenter.focal_gamma)
        engine.step(loss)
        metrics: dict[str, Any] = {"loss": float(loss.detach()), "step": step}
        if step % task.validate_every == 0 or step == task.max_steps:
            score = score_images(engine.module, validation).get("pixel_ap", 0.0)
            metrics["val_pixel_ap"] = score
            if score > state["best_score"]:
                state.update(best_score=score, best_step=step)
                best = engine.state_dict()
        state["step"] = step
        if step % task.checkpoint_every == 0 and step < task.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                _save(Path(tmp), engine, best, state)
                checkpoints.report(method, metrics, progress=Path(tmp))
    _save(checkpoints.method_dir(method), engine, best, state)
    checkpoints.report(method, state, done=True)


def evaluate_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: a segmenter per method of one product, selected on validation."""
    task = EvalTask.model_validate(config)
    torch.set_num_threads(task.threads)
    rank, _ = worker_rank()
    product = read_product(Path(task.data_root), task.product, task.layout, LayoutOptions(**task.layout_options))
    split = load_split(Path(task.split_path)).products[task.product]
    data = (
        load_real(product, split.train_normals, task.resolution),
        load_real(product, split.validation, task.resolution),
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = MethodCheckpoints(Path(tmp), rank)
        for method in task.methods:
            if not checkpoints.finished(method):
                train_detector(task, method, data, checkpoints)


@ray.remote(num_cpus=1)
def test_checkpoint(task: dict[str, Any], weights: str) -> dict[str, float]:
    """Score the selected weights on the held-out test split (the only place test images are read)."""
    parsed = EvalTask.model_validate(task)
    product = read_product(
        Path(parsed.data_root), parsed.product, parsed.layout, LayoutOptions(**parsed.layout_options)
    )
    split = load_split(Path(parsed.split_path)).products[parsed.product]
    model = build_segmenter(parsed.segmenter)
    model.load_state_dict(torch.load(Path(weights)))
    return score_images(model, load_real(product, split.test, parsed.resolution))


@dataclass(frozen=True)
class EvalOutcome:
    """Test scores of one (product, method)."""

    product: str
    method: str
    metrics: dict[str, float]
    champion: bool
    run_id: str


def eval_task(cfg: Config, prepared: PreparedData, product: str) -> EvalTask:
    """The worker config of one product's detector fits, one per method."""
    ev = cfg.evaluate
    return EvalTask(
        product=product,
        methods=list(cfg.methods),
        dataset_uris={m: cfg.generate.dataset_uri(cfg.workdir, m) for m in cfg.methods},
        data_root=str(cfg.data.root),
        layout=cfg.data.layout,
        layout_options=cfg.data.layout_options.model_dump(),
        split_path=str(prepared.split_path),
        resolution=cfg.data.resolution,
        max_steps=ev.max_steps,
        batch_size=ev.batch_size,
        synthetic_fraction=ev.synthetic_fraction,
        validate_every=ev.validate_every,
        checkpoint_every=ev.checkpoint_every,
        seed=cfg.seed,
        threads=ev.cpus_per_worker,
        segmenter=SegmenterConfig(base_width=ev.base_width, lr=ev.learning_rate, batch_size=ev.batch_size),
        strategy=ev.distributed,
    )


def log_evaluation(
    cfg: Config, prepared: PreparedData, task: EvalTask, method: str, fit: Path, scores: dict[str, float]
) -> EvalOutcome:
    """One MLflow run: test metrics under the stable names, linked to the model version and the dataset."""
    name = model_name(task.product, method)
    version = resolve_version(name, cfg.generate.model_alias)
    uri = task.dataset_uris[method]
    card = read_card(resolve(uri))
    dataset = MetaDataset(source=resolve_dataset_source(uri), name=f"defectsynth-{method}", digest=card["digest"][:32])
    state = json.loads((fit / method / STATE).read_text())
    tags = {
        "product": task.product,
        "method": method,
        "detector": DETECTOR,
        "job": "evaluate",
        "model_name": name,
        "model_version": str(version.version),
        "dataset_digest": card["digest"],
    }
    run_name = f"evaluate-{method}-{DETECTOR}"
    with mlflow.start_run(experiment_id=experiment_id(cfg, task.product), run_name=run_name, tags=tags) as run:
        mlflow.log_input(dataset, context="training")
        mlflow.log_params(
            {
                "max_steps": task.max_steps,
                "batch_size": task.batch_size,
                "synthetic_fraction": task.synthetic_fraction,
                "base_width": task.segmenter.base_width,
                "resolution": task.resolution,
                "strategy": task.strategy.strategy,
                "split_digest": prepared.split.digest(),
                "selected_step": state["best_step"],
                "val_pixel_ap": state["best_score"],
            }
        )
        mlflow.log_metrics(scores)
        champion = record_scores(name, str(version.version), scores, cfg.evaluate.champion_metric)
        mlflow.set_tag("champion", str(champion).lower())
    return EvalOutcome(task.product, method, scores, champion, run.info.run_id)


def evaluate(cfg: Config, prepared: PreparedData | None = None) -> list[EvalOutcome]:
    """Train, select and test the segmenter for every configured (product, method)."""
    prepared = prepared or start(cfg)
    if not cfg.methods:
        msg = "nothing to evaluate: set methods (e.g. --set methods=[perlin,croppaste])"
        raise ValueError(msg)
    tasks = [eval_task(cfg, prepared, p.name) for p in prepared.products]
    fits = fit_products(
        evaluate_worker,
        {t.product: t.model_dump() for t in tasks},
        cfg.evaluate,
        job="evaluate",
        workdir=cfg.workdir,
        results="detectors",
    )
    pairs = [(t, fits[t.product], m) for t in tasks for m in t.methods]
    scores = ray.get([test_checkpoint.remote(t.model_dump(), str(fit / m / BEST)) for t, fit, m in pairs])
    return [log_evaluation(cfg, prepared, t, m, fit, s) for (t, fit, m), s in zip(pairs, scores, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("evaluate", __doc__.splitlines()[0], evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
