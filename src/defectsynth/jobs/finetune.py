"""``jobs.finetune``: fit each configured generator on each product in Ray Train, register it in MLflow.

One ``TorchTrainer`` per (product, method), several at once. Each worker runs the generator's
``fit`` on the split's training side; rank 0's artifacts come back as the final checkpoint and are
logged and registered as ``defectsynth-<product>-<method>`` with alias ``candidate``.

    python -m defectsynth.jobs.finetune --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import ray.train
import torch
from pydantic import BaseModel, ConfigDict
from ray.train import Checkpoint

from defectsynth.generators.base import FitContext, build_generator
from defectsynth.jobs.common import run_main, start
from defectsynth.jobs.training import fit_all, latest_checkpoint_dir, make_trainer, worker_rank
from defectsynth.platform.config import Config
from defectsynth.platform.distributed import StrategyConfig
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import experiment_id, log_generator, model_name, register
from defectsynth.storage.layouts import LayoutOptions, read_product
from defectsynth.storage.split import load_split

logger = logging.getLogger(__name__)

ARTIFACTS, CURVES = "artifacts", "curves.json"


class FitTask(BaseModel):
    """Everything one fit's workers need, as plain data."""

    model_config = ConfigDict(extra="forbid")

    product: str
    method: str
    settings: dict[str, Any]
    data_root: str
    layout: str
    layout_options: dict[str, Any]
    split_path: str
    max_steps: int
    seed: int
    threads: int
    checkpoint_every: int
    strategy: StrategyConfig


def fit_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: fit the generator, report its artifacts from rank 0."""
    task = FitTask.model_validate(config)
    torch.set_num_threads(task.threads)
    rank, world_size = worker_rank()
    product = read_product(Path(task.data_root), task.product, task.layout, LayoutOptions(**task.layout_options))
    split = load_split(Path(task.split_path)).products[task.product]
    generator = build_generator(task.method, task.settings)
    curves: list[dict[str, float]] = []

    def save_checkpoint(directory: Path, metrics: dict[str, float]) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / ARTIFACTS).mkdir()
        context = FitContext(
            output_dir=root / ARTIFACTS,
            max_steps=task.max_steps,
            seed=task.seed,
            rank=rank,
            world_size=world_size,
            threads=task.threads,
            strategy=task.strategy,
            checkpoint_every=task.checkpoint_every,
            resume_from=latest_checkpoint_dir(),
            report=curves.append,
            save_checkpoint=save_checkpoint,
        )
        generator.fit(product, split, context)
        (root / CURVES).write_text(json.dumps(curves))
        final = {"fit_steps": float(len(curves)), **(curves[-1] if curves else {})}
        ray.train.report(final, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


@dataclass(frozen=True)
class FitOutcome:
    """A registered generator."""

    product: str
    method: str
    model_name: str
    version: str
    run_id: str


def fit_task(cfg: Config, prepared: PreparedData, product: str, method: str) -> FitTask:
    """The worker config of one fit."""
    return FitTask(
        product=product,
        method=method,
        settings=cfg.generators.get(method, {}),
        data_root=str(cfg.data.root),
        layout=cfg.data.layout,
        layout_options=cfg.data.layout_options.model_dump(),
        split_path=str(prepared.split_path),
        max_steps=cfg.finetune.max_steps,
        seed=cfg.seed,
        threads=cfg.finetune.cpus_per_worker,
        checkpoint_every=cfg.finetune.checkpoint_every,
        strategy=cfg.finetune.distributed,
    )


def log_fit(cfg: Config, prepared: PreparedData, task: FitTask, metrics: dict[str, Any], result: Path) -> FitOutcome:
    """Log params, curves, the split and the model of one fit; register it with alias ``candidate``."""
    name = model_name(task.product, task.method)
    tags = {"product": task.product, "method": task.method, "job": "finetune"}
    with mlflow.start_run(
        experiment_id=experiment_id(cfg, task.product), run_name=f"finetune-{task.method}", tags=tags
    ) as run:
        mlflow.log_params(
            {
                "method": task.method,
                "max_steps": task.max_steps,
                "workers": cfg.finetune.workers,
                "strategy": task.strategy.strategy,
                "zero_stage": task.strategy.zero_stage,
                "split_digest": prepared.split.digest(),
                **{f"settings.{k}": v for k, v in task.settings.items()},
            }
        )
        for step, point in enumerate(json.loads((result / CURVES).read_text())):
            mlflow.log_metrics({k: float(v) for k, v in point.items()}, step=step)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.log_artifact(str(prepared.split_path))
        model_uri = log_generator(result / ARTIFACTS, task.method, task.settings)
        version = register(model_uri, name, tags={"product": task.product, "method": task.method})
    return FitOutcome(task.product, task.method, name, version.version, run.info.run_id)


def finetune(cfg: Config, prepared: PreparedData | None = None) -> list[FitOutcome]:
    """Fit every configured (product, method) pair; returns the registered versions."""
    prepared = prepared or start(cfg)
    tasks = [fit_task(cfg, prepared, p.name, m) for p in prepared.products for m in cfg.methods]
    if not tasks:
        msg = "nothing to fine-tune: set methods (e.g. --set methods=[perlin,croppaste])"
        raise ValueError(msg)
    for task in tasks:  # fail on bad settings before any cluster time is spent
        build_generator(task.method, task.settings)
    runs = cfg.workdir / "ray_results"
    trainers = [
        (
            make_trainer(
                fit_worker, t.model_dump(), cfg.finetune, name=f"finetune-{t.product}-{t.method}", storage=runs
            ),
            cfg.workdir / "fits" / f"{t.product}-{t.method}",
        )
        for t in tasks
    ]
    results = fit_all(trainers, cfg.finetune.concurrent_fits)
    outcomes = [log_fit(cfg, prepared, t, metrics, path) for t, (metrics, path) in zip(tasks, results, strict=True)]
    for outcome in outcomes:
        logger.info("registered %s version %s (@candidate)", outcome.model_name, outcome.version)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("finetune", __doc__.splitlines()[0], finetune, argv)


if __name__ == "__main__":
    raise SystemExit(main())
