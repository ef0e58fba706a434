"""``jobs.pretrain``: train the tiny diffusion base on the run's normal images, register ``defectsynth-base-tiny``.

Diffusion generators fine-tune a base model. With ``diffusion.base_model: tiny`` none exists until
this job trains one from scratch in a Ray Train fit (the VAE first, then the U-Net; DeepSpeed or
DDP as configured in ``pretrain``) on the training normals of every configured product (the VAE
also on the training-side defects, see ``load_training_images``), logs a grid of previews and
registers it. A version is tagged with the digest of everything it was trained from (settings,
resolution, products, split, seed): a later run with the same digest reuses it instead of
training again. A local Stable Diffusion path needs no pretraining and is returned as is.

    python -m defectsynth.jobs.pretrain --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray.train
import torch
from pydantic import BaseModel, ConfigDict
from ray.train import Checkpoint

from defectsynth.core.figures import grid
from defectsynth.core.strategy import StrategyConfig
from defectsynth.core.train_engine import TrainEngine
from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.generic_prior import PriorBatch, apply_generic_prior
from defectsynth.diffusion.grounding import GroundingTargets, grounded_denoising_loss
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import (
    augment,
    denoising_loss,
    generic_prompt,
    latent_scaling_factor,
    mark_loss_weights,
    random_square_crop,
    rotate_hue,
    training_prompts,
    vae_crop_at,
    vae_loss,
)
from defectsynth.diffusion.preview import sample_prompts
from defectsynth.diffusion.settings import TINY_BASE_MARKER, TinyModelSettings
from defectsynth.diffusion.tracking import BASE_TINY, log_base_model
from defectsynth.evaluation.data import load_real
from defectsynth.jobs.common import run_main, start
from defectsynth.jobs.progress_board import stage_bars, with_board, without_board
from defectsynth.jobs.training import fit_all, make_trainer, worker_rank
from defectsynth.platform.config import Config
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import experiment_id, newest_tagged_version, register
from defectsynth.storage.layouts import LayoutOptions, read_product
from defectsynth.storage.split import load_split

logger = logging.getLogger(__name__)

BASE_EXPERIMENT = "base"  # experiment_id names it defectsynth-base
MODEL_DIR, PROGRESS, CURVES, RESUMED = "model", "progress.pt", "curves.json", "resumed_at.json"
PHASES = ("vae", "unet")
# Raised whenever the training code changes what a base learns from the same settings, so that a base
# registered before is not reused: 2, the VAE's KL weighed per pixel value (pretrain.vae_loss).
TRAINING_RECIPE = 2
PREVIEWS = 8

LossFn = Callable[[torch.Tensor, list[str], torch.Generator, int], torch.Tensor]  # images, products, rng, step


class PretrainTask(BaseModel):
    """Everything the pretraining workers need, as plain data."""

    model_config = ConfigDict(extra="forbid")

    products: list[str]
    data_root: str
    layout: str
    layout_options: dict[str, Any]
    split_path: str
    resolution: int
    settings: TinyModelSettings
    seed: int
    threads: int
    checkpoint_every: int
    strategy: StrategyConfig


@dataclass(frozen=True)
class BaseModelRef:
    """Where a run's diffusion base model is: a registry URI (tiny) or a local path (Stable Diffusion)."""

    uri: str
    version: str | None
    reused: bool


TrainingImages = tuple[torch.Tensor, list[str]]  # images in [-1, 1] and the product of each


def load_training_images(task: PretrainTask) -> tuple[TrainingImages, TrainingImages]:
    """(VAE images, U-Net images) of every configured product, from the split's training side only.

    The U-Net learns normal products: the training normals. The VAE sees those plus the training-side
    defects when ``vae_sees_defects`` is set: a VAE that never saw a thin dark crack cannot encode
    one (measured in ENVIRONMENT.md), and no method could then generate it. Test images are never read.
    """
    split = load_split(Path(task.split_path))
    vae: list[torch.Tensor] = []
    unet: list[torch.Tensor] = []
    vae_names: list[str] = []
    unet_names: list[str] = []
    for name in task.products:
        product = read_product(Path(task.data_root), name, task.layout, LayoutOptions(**task.layout_options))
        part = split.products[name]
        normals = load_real(product, part.train_normals, task.resolution).images * 2 - 1
        unet.append(normals)
        unet_names += [name] * len(normals)
        defect_ids = [i for ids in part.generator_train.values() for i in ids] if task.settings.vae_sees_defects else []
        defects = load_real(product, defect_ids, task.resolution).images * 2 - 1
        vae += [normals, defects]
        vae_names += [name] * (len(normals) + len(defects))
    return (torch.cat(vae), vae_names), (torch.cat(unet), unet_names)


def step_generator(seed: int, rank: int, phase: str, step: int) -> torch.Generator:
    """The random source of one training step: the same after a restart, different per rank."""
    digest = hashlib.sha256(f"{seed}/{rank}/{phase}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class Progress:
    """Pretraining progress in Ray Train checkpoints: phase, step, weights, scaling factor, loss curve."""

    def __init__(self, root: Path, rank: int) -> None:
        self.root, self.rank = root, rank
        self.state: dict[str, Any] = {"phase": PHASES[0], "step": 0, "curves": [], "resumed_at": []}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(root))
            self.state = torch.load(root / PROGRESS, map_location="cpu", weights_only=True)
            self.state["resumed_at"].append(f"{self.state['phase']}:{self.state['step']}")
            logger.info("resuming pretraining at %s step %d", self.state["phase"], self.state["step"])

    def restore(self, model: DiffusionModel) -> None:
        """Load the saved weights and scaling factor into ``model`` (after a restart)."""
        if "vae" in self.state:
            model.vae.load_state_dict(self.state["vae"])
            model.unet.load_state_dict(self.state["unet"])
            model.vae.register_to_config(scaling_factor=self.state["scaling_factor"])

    def report(self, model: DiffusionModel, phase: str, step: int, metrics: dict[str, float]) -> None:
        """Save progress and report it; every rank reports, rank 0 attaches the checkpoint."""
        self.state.update(
            phase=phase,
            step=step,
            vae=model.vae.state_dict(),
            unet=model.unet.state_dict(),
            scaling_factor=model.vae.config.scaling_factor,
        )
        torch.save(self.state, self.root / PROGRESS)
        checkpoint = Checkpoint.from_directory(str(self.root)) if self.rank == 0 else None
        ray.train.report({"phase": phase, "step": step, **metrics}, checkpoint=checkpoint)


class PhaseLoss(torch.nn.Module):
    """A phase's loss as a module around the trained network, so DDP and DeepSpeed see the forward pass."""

    def __init__(self, trained: torch.nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.trained, self.loss_fn = trained, loss_fn

    def forward(self, images: torch.Tensor, products: list[str], generator: torch.Generator, step: int) -> torch.Tensor:
        """The loss of one augmented batch at one step of the phase."""
        return self.loss_fn(images, products, generator, step)


def train_phase(
    progress: Progress,
    model: DiffusionModel,
    phase: str,
    steps: int,
    loss_fn: LossFn,
    data: TrainingImages,
    task: PretrainTask,
    board: ray.actor.ActorHandle | None = None,
) -> None:
    """Run one phase's optimiser steps from where the progress left off, checkpointing as configured.

    Rank 0 moves ``board``'s count of the phase to each finished step.
    """
    module = model.vae if phase == "vae" else model.unet
    rate = task.settings.vae_learning_rate if phase == "vae" else task.settings.unet_learning_rate
    module.requires_grad_(True).train()
    engine = TrainEngine(
        PhaseLoss(module, loss_fn),
        torch.optim.AdamW(module.parameters(), lr=rate, weight_decay=0.0),
        task.strategy,
        micro_batch_size=task.settings.batch_size,
    )
    first = progress.state["step"] if progress.state["phase"] == phase else 0
    images, products = data
    rank, _ = worker_rank()
    board = board if rank == 0 else None
    for step in range(first, steps):
        generator = step_generator(task.seed, rank, phase, step)
        pick = torch.randint(0, len(images), (task.settings.batch_size,), generator=generator)
        batch = engine.to_device(augment(images[pick], generator))
        loss = engine(batch, [products[i] for i in pick.tolist()], generator, step)
        engine.step(loss)
        progress.state["curves"].append({f"{phase}_loss": float(loss.detach())})
        if board is not None:
            board.reach.remote(phase, step + 1)
        if (step + 1) % task.checkpoint_every == 0 and step + 1 < steps:
            progress.report(model, phase, step + 1, {"loss": float(loss.detach())})
    module.requires_grad_(False).eval().float()  # DeepSpeed bf16 casts in place; later phases expect float32


def pretrain_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: VAE phase, scaling factor, U-Net phase; rank 0 saves the model."""
    config, board = without_board(config)
    task = PretrainTask.model_validate(config)
    torch.set_num_threads(task.threads)
    rank, _ = worker_rank()
    vae_data, unet_data = load_training_images(task)
    model = build_tiny(task.settings, resolution=task.resolution, words=task.products, seed=task.seed)
    if torch.cuda.is_available():
        model.to(ray.train.torch.get_device())
    settings = task.settings

    def with_prior(images: torch.Tensor, products: list[str], generator: torch.Generator) -> PriorBatch:
        """The batch with the generic prior's marks and shapes drawn in, its captions and the marks' regions."""
        marks, shapes, described = settings.prior_marks, settings.prior_shapes, settings.prior_captions == "appearance"
        return apply_generic_prior(
            images, products, generator, marks=marks, shapes=shapes, described=described, kinds=settings.prior_kinds
        )

    with tempfile.TemporaryDirectory() as tmp:
        progress = Progress(Path(tmp), rank)
        progress.restore(model)
        if progress.state["phase"] == "vae":
            train_phase(
                progress,
                model,
                "vae",
                settings.vae_steps,
                lambda x, names, g, step: vae_loss(
                    model,
                    random_square_crop(
                        rotate_hue(with_prior(x, names, g).images, settings.vae_hue_rotation, g),
                        vae_crop_at(settings, step),
                        g,
                    ),
                    g,
                    settings.kl_weight,
                    settings.vae_edge_weight,
                    settings.vae_chroma_weight,
                ),
                vae_data,
                task,
                board,
            )
            model.vae.register_to_config(scaling_factor=latent_scaling_factor(model, unet_data[0][:64]))
            progress.report(model, "unet", 0, {"scaling_factor": model.vae.config.scaling_factor})
        elif board is not None and rank == 0:
            board.reach.remote("vae", settings.vae_steps)  # resumed past the VAE phase

        def unet_loss(images: torch.Tensor, products: list[str], generator: torch.Generator, _: int) -> torch.Tensor:
            prior = with_prior(images, products, generator)
            with torch.no_grad():
                latents = model.encode_images(prior.images, generator)
                prompts = training_prompts(prior.captions, generator)
                context = model.encode_prompt(prompts)
            weights = mark_loss_weights(prior.marks, latents.shape[-2:], settings.prior_mark_weight)
            if not settings.prior_grounding_weight:
                return denoising_loss(model, latents, context, generator, loss_mask=weights)
            grounding = GroundingTargets(prompts, prior.marks, settings.prior_grounding_weight)
            return grounded_denoising_loss(model, latents, context, generator, grounding, loss_mask=weights)

        train_phase(progress, model, "unet", settings.unet_steps, unet_loss, unet_data, task, board)
        if rank == 0:
            model.save(Path(tmp) / MODEL_DIR)
            (Path(tmp) / MODEL_DIR / TINY_BASE_MARKER).write_text(json.dumps(task.settings.model_dump(mode="json")))
            (Path(tmp) / CURVES).write_text(json.dumps(progress.state["curves"]))
            (Path(tmp) / RESUMED).write_text(json.dumps(progress.state["resumed_at"]))
        progress.report(model, "done", settings.unet_steps, {})


# Settings added since the recipe last rose, left out of the digest at their defaults: the bases registered before
# them keep their digests.
LATER_SETTINGS = {"prior_grounding_weight": 0.0}


def tiny_settings_spec(settings: TinyModelSettings) -> dict[str, Any]:
    """The tiny base's settings as they enter the digest (``LATER_SETTINGS`` at their defaults left out)."""
    spec = settings.model_dump(mode="json")
    return {key: value for key, value in spec.items() if LATER_SETTINGS.get(key, object()) != value}


def base_digest(cfg: Config, prepared: PreparedData) -> str:
    """Digest of everything the tiny base is trained from: a registered version with it is reused."""
    spec = {
        "recipe": TRAINING_RECIPE,
        "settings": tiny_settings_spec(cfg.diffusion.tiny),
        "resolution": cfg.data.resolution,
        "products": sorted(p.name for p in prepared.products),
        "split": prepared.split.digest(),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def find_registered(digest: str) -> str | None:
    """The newest version of ``defectsynth-base-tiny`` trained from ``digest``, or None."""
    version = newest_tagged_version(BASE_TINY, "digest", digest)
    return str(version.version) if version else None


def pretrain_task(cfg: Config, prepared: PreparedData) -> PretrainTask:
    """The worker config of the base's pretraining."""
    return PretrainTask(
        products=[p.name for p in prepared.products],
        data_root=str(cfg.data.root),
        layout=cfg.data.layout,
        layout_options=cfg.data.layout_options.model_dump(),
        split_path=str(prepared.split_path),
        resolution=cfg.data.resolution,
        settings=cfg.diffusion.tiny,
        seed=cfg.seed,
        threads=cfg.pretrain.cpus_per_worker,
        checkpoint_every=cfg.pretrain.checkpoint_every,
        strategy=cfg.pretrain.distributed,
    )


def train_and_register(cfg: Config, prepared: PreparedData, digest: str) -> str:
    """Run the pretraining fit, log it and register the model; returns the new version."""
    task = pretrain_task(cfg, prepared)
    phases = {"vae": task.settings.vae_steps, "unet": task.settings.unet_steps}
    with stage_bars(phases, "pretrain", unit="step") as board:
        trainer = make_trainer(
            pretrain_worker,
            with_board(task.model_dump(), board),
            cfg.pretrain,
            name="pretrain-base",
            storage=cfg.workdir / "ray_results",
        )
        ((_, result),) = fit_all([(trainer, cfg.workdir / "pretrain" / digest)], 1, "pretrain", bar=False)
    experiment = experiment_id(cfg, BASE_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment, run_name="pretrain-tiny", tags={"job": "pretrain"}):
        mlflow.log_params(
            {
                "digest": digest,
                "resolution": task.resolution,
                "products": ",".join(task.products),
                "strategy": task.strategy.strategy,
                "resumed_at": (result / RESUMED).read_text(),
                **{f"tiny.{k}": v for k, v in task.settings.model_dump(mode="json").items()},
            }
        )
        for step, point in enumerate(json.loads((result / CURVES).read_text())):
            mlflow.log_metrics(point, step=step)
        mlflow.log_image(preview_grid(result / MODEL_DIR, task.products), "previews.png")
        model_uri = log_base_model(result / MODEL_DIR, digest=digest)
        version = register(model_uri, BASE_TINY, tags={"digest": digest})
    return str(version.version)


def preview_grid(model_dir: Path, products: Sequence[str], per_product: int = PREVIEWS) -> np.ndarray:
    """One row per product: ``per_product`` samples of its generic prompt, for a look at what the base learned."""
    model = DiffusionModel.load(model_dir)
    rows = [sample_prompts(model, [generic_prompt(name)] * per_product, seeds=range(per_product)) for name in products]
    return grid(rows)


def ensure_base_model(cfg: Config, prepared: PreparedData) -> BaseModelRef:
    """The run's base model: a local path, the registered tiny base for this digest, or a new one."""
    if not cfg.diffusion.is_tiny:
        return BaseModelRef(uri=cfg.diffusion.base_model, version=None, reused=True)
    digest = base_digest(cfg, prepared)
    version = find_registered(digest)
    reused = version is not None
    if version is None:
        version = train_and_register(cfg, prepared, digest)
    logger.info("%s %s version %s (digest %s)", "reusing" if reused else "trained", BASE_TINY, version, digest)
    return BaseModelRef(uri=f"models:/{BASE_TINY}/{version}", version=version, reused=reused)


def pretrain(cfg: Config, prepared: PreparedData | None = None) -> BaseModelRef:
    """Job entry: make sure the configured base model exists; returns where it is."""
    return ensure_base_model(cfg, prepared or start(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("pretrain", __doc__.splitlines()[0], pretrain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
