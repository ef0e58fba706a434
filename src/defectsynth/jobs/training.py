"""Running a per-worker loop on Ray Train: one ``TorchTrainer`` per fit, several fits at once.

Shared by ``jobs.finetune`` (generators) and ``jobs.evaluate`` (detectors). The loop gets a plain
dict config; the trainer restarts a failed worker group from the last reported checkpoint
(``FailureConfig``), and results come back as the final checkpoint directory.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from defectsynth.jobs.progress_board import stage_bars, with_board
from defectsynth.platform.config import TrainerConfig

logger = logging.getLogger(__name__)


def run_name(prefix: str) -> str:
    """A Ray Train run name unique to this invocation: a later job never restores an earlier job's run."""
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S-%f')}"


def make_trainer(
    loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], cfg: TrainerConfig, *, name: str, storage: Path
) -> TorchTrainer:
    """A TorchTrainer for ``loop`` with the resources, checkpointing and restarts of ``cfg``.

    Restarts after a worker failure resume from the run's last checkpoint; only the newest
    ``cfg.keep_checkpoints`` checkpoints stay on storage. The run name gets a timestamp so that
    re-running a job starts fresh instead of restoring the previous run.
    """
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name(name),
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )


def fit_one(trainer: TorchTrainer, out: Path) -> tuple[dict[str, Any], Path]:
    """Run a trainer; copy its final checkpoint to ``out``; return (final metrics, out)."""
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        msg = f"training run {result.path} reported no checkpoint"
        raise RuntimeError(msg)
    if out.exists():
        shutil.rmtree(out)
    result.checkpoint.to_directory(str(out))
    return dict(result.metrics or {}), out


def fit_all(
    trainers: Sequence[tuple[TorchTrainer, Path]], concurrency: int, job: str = "fit", *, bar: bool = True
) -> list[tuple[dict[str, Any], Path]]:
    """Run several trainers, ``concurrency`` at a time (Ray queues the rest), behind a progress bar named ``job``."""
    with (
        ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool,
        tqdm(total=len(trainers), desc=job, unit="fit", mininterval=2, disable=not bar) as fits,
    ):
        futures = [pool.submit(fit_one, *pair) for pair in trainers]
        for _ in as_completed(futures):
            fits.update()
        return [future.result() for future in futures]


def fit_products(
    loop: Callable[[dict[str, Any]], None],
    configs: dict[str, dict[str, Any]],
    cfg: TrainerConfig,
    *,
    job: str,
    workdir: Path,
    results: str,
    stages: Mapping[str, int] | None = None,
) -> dict[str, Path]:
    """One trainer per key (a product, or e.g. ``joint-<method>``) running ``loop`` on its config.

    Returns key -> the final checkpoint's copy under ``<workdir>/<results>/<key>``; Ray Train runs live in
    ``<workdir>/ray_results``. With ``stages`` (items per stage over all fits), the configs carry a progress
    board the loops advance (``progress_board``), and one bar per stage replaces the bar of fits.
    """
    with stage_bars(stages, job) if stages else nullcontext() as board:
        trainers = [
            (
                make_trainer(
                    loop, with_board(config, board), cfg, name=f"{job}-{product}", storage=workdir / "ray_results"
                ),
                workdir / results / product,
            )
            for product, config in configs.items()
        ]
        finished = fit_all(trainers, cfg.concurrent_fits, job, bar=not stages)
    return {product: path for product, (_, path) in zip(configs, finished, strict=True)}


def worker_rank() -> tuple[int, int]:
    """(rank, world size) of the calling Ray Train worker."""
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


class MethodCheckpoints:
    """Several methods fitted in one product's trainer, checkpointed together.

    The checkpoint holds every finished method (``<method>/`` with ``DONE``) and the progress of the
    running one (``<method>/progress/``). A restarted worker group starts from the last report:
    finished methods are not fitted again and the running one resumes from its progress. Every rank
    calls ``report`` equally often; only rank 0 attaches the checkpoint.
    """

    def __init__(self, root: Path, rank: int) -> None:
        self.root, self.rank = root, rank
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(root))
            logger.info("resuming from checkpoint %s", checkpoint.path)

    def method_dir(self, method: str) -> Path:
        """Where a method's outputs go (created on demand)."""
        path = self.root / method
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finished(self, method: str) -> bool:
        """True when an earlier attempt already finished ``method``."""
        return (self.root / method / "DONE").exists()

    def progress(self, method: str) -> Path | None:
        """The running method's last saved progress, or None."""
        path = self.root / method / "progress"
        return path if path.is_dir() else None

    def report(self, method: str, metrics: dict[str, Any], *, progress: Path | None = None, done: bool = False) -> None:
        """Record progress or completion of ``method`` and report it to Ray Train with the checkpoint."""
        if progress is not None and progress != self.progress(method):
            target = self.method_dir(method) / "progress"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(progress, target)
        if done:
            (self.method_dir(method) / "DONE").touch()
            shutil.rmtree(self.root / method / "progress", ignore_errors=True)
        checkpoint = Checkpoint.from_directory(str(self.root)) if self.rank == 0 else None
        ray.train.report({"method": method, **metrics}, checkpoint=checkpoint)
