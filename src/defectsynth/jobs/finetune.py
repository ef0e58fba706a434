"""``jobs.finetune``: fit each configured generator on each product in Ray Train, register it in MLflow.

One ``TorchTrainer`` per product, several at once; its workers fit each method in turn on the
split's training side, once per fit unit the method's class asks for (``fit_units``: the product, or
each defect type on that type's defects alone). A method whose settings ask for a joint fit
(``fits_jointly``) gets one trainer of its own over every product instead, and its one set of artifacts
is registered for each. Rank 0's artifacts come back in the final checkpoint; a product's units are
assembled into one artifact directory (``assemble_units``), logged and registered as
``defectsynth-<product>-<method>`` with alias ``candidate``. A restarted worker group skips the units it
finished and resumes the running one from its last checkpoint. A version registered from the same fit digest
(``fit_digest``: settings, products, split, base, steps, workers, seed) is reused instead of fitted again, so a
re-run resumes its datasets instead of meeting a new model version.

    python -m defectsynth.jobs.finetune --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict

from defectsynth.core.plots import line_plot
from defectsynth.core.strategy import StrategyConfig
from defectsynth.generators.base import FitContext, build_generator, fits_jointly, uses_diffusion_base
from defectsynth.generators.fit_units import FitUnit, assemble_units, fit_units, unit_view
from defectsynth.jobs.common import run_main, start
from defectsynth.jobs.progress_board import without_board
from defectsynth.jobs.training import MethodCheckpoints, fit_products, worker_rank
from defectsynth.platform.config import Config
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import (
    CANDIDATE,
    check_registered_generator,
    experiment_id,
    log_generator,
    model_name,
    newest_tagged_version,
    register,
    settings_digest,
)
from defectsynth.storage.keys import short_digest
from defectsynth.storage.layouts import LayoutOptions, read_product
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import ProductSplit, load_split

logger = logging.getLogger(__name__)

ARTIFACTS, CURVES, ASSEMBLED = "artifacts", "curves.json", "assembled"


class FitTask(BaseModel):
    """Everything one product's fits need, as plain data: the worker fits each method in turn."""

    model_config = ConfigDict(extra="forbid")

    product: str
    companions: list[str] = []  # products fitted together with ``product`` (joint methods)
    methods: list[str]
    settings: dict[str, dict[str, Any]]
    data_root: str
    layout: str
    layout_options: dict[str, Any]
    split_path: str
    max_steps: int
    seed: int
    threads: int
    checkpoint_every: int
    strategy: StrategyConfig
    tracking_uri: str
    base_model: str | None = None


def unit_key(method: str, unit: FitUnit) -> str:
    """A fit's key in the checkpoint and its directory: ``<method>``, or ``<method>/units/<type>``."""
    return str(Path(method) / unit.subdir)


def fit_method(
    task: FitTask,
    method: str,
    unit: FitUnit,
    products: list[tuple[ProductData, ProductSplit]],
    checkpoints: MethodCheckpoints,
) -> None:
    """Fit one unit of one generator on its view of the data; artifacts and curves go to ``<checkpoint>/<key>/``."""
    rank, world_size = worker_rank()
    key = unit_key(method, unit)
    out = checkpoints.method_dir(key)
    shutil.rmtree(out / ARTIFACTS, ignore_errors=True)
    (out / ARTIFACTS).mkdir()
    curves: list[dict[str, float]] = []
    context = FitContext(
        output_dir=out / ARTIFACTS,
        max_steps=task.max_steps,
        base_model=task.base_model,
        seed=task.seed,
        rank=rank,
        world_size=world_size,
        threads=task.threads,
        strategy=task.strategy,
        checkpoint_every=task.checkpoint_every,
        resume_from=checkpoints.progress(key),
        report=curves.append,
        save_checkpoint=lambda directory, metrics: checkpoints.report(key, metrics, progress=directory),
        companions=products[1:],
    )
    build_generator(method, task.settings.get(method)).fit(*unit_view(*products[0], unit), context)
    (out / CURVES).write_text(json.dumps(curves))
    checkpoints.report(key, {"fit_steps": float(len(curves)), **(curves[-1] if curves else {})}, done=True)


def fit_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: fit each unit of each method of one product (and companions), skipping done ones.

    Rank 0 advances the progress board's count of the method after each unit, done now or before a restart.
    """
    config, board = without_board(config)
    task = FitTask.model_validate(config)
    torch.set_num_threads(task.threads)
    mlflow.set_tracking_uri(task.tracking_uri)
    rank, _ = worker_rank()
    options, manifest = LayoutOptions(**task.layout_options), load_split(Path(task.split_path))
    products = [
        (read_product(Path(task.data_root), name, task.layout, options), manifest.products[name])
        for name in [task.product, *task.companions]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = MethodCheckpoints(Path(tmp), rank)
        for method in task.methods:
            for unit in fit_units(method, products[0][1]):
                if not checkpoints.finished(unit_key(method, unit)):
                    fit_method(task, method, unit, products, checkpoints)
                if board is not None and rank == 0:
                    board.advance.remote(method)


@dataclass(frozen=True)
class FitOutcome:
    """A registered generator."""

    product: str
    method: str
    model_name: str
    version: str
    run_id: str


def fit_task(
    cfg: Config,
    prepared: PreparedData,
    products: list[str],
    methods: list[str],
    base_model: str | None,
) -> FitTask:
    """The worker config of ``methods`` fitted on the first of ``products``, the others its companions."""
    return FitTask(
        product=products[0],
        companions=products[1:],
        methods=methods,
        settings={m: cfg.generators.get(m, {}) for m in methods},
        data_root=str(cfg.data.root),
        layout=cfg.data.layout,
        layout_options=cfg.data.layout_options.model_dump(),
        split_path=str(prepared.split_path),
        max_steps=cfg.finetune.max_steps,
        seed=cfg.seed,
        threads=cfg.finetune.cpus_per_worker,
        checkpoint_every=cfg.finetune.checkpoint_every,
        strategy=cfg.finetune.distributed,
        tracking_uri=cfg.tracking_uri,
        base_model=base_model,
    )


def fit_digest(cfg: Config, prepared: PreparedData, products: list[str], method: str, base_model: str | None) -> str:
    """Digest of everything a fit of ``method`` on ``products`` is made from: a version tagged with it is reused.

    The settings are the method's whole section, generation settings included, so a changed setting never
    reuses a fit; like the base's digest, it covers the split's image ids, not the pixels.
    """
    return short_digest(
        {
            "method": method,
            "settings": cfg.generators.get(method, {}),
            "products": products,
            "split": prepared.split.digest(),
            "base_model": base_model if uses_diffusion_base(method) else None,
            "max_steps": cfg.finetune.max_steps,
            "workers": cfg.finetune.workers,
            "seed": cfg.seed,
        }
    )


def registered_fit(products: list[str], method: str, digest: str) -> list[FitOutcome] | None:
    """The versions fitted from ``digest`` for each of ``products``, now ``@candidate``; None where one is missing.

    A version whose artifacts are gone does not count, so it is fitted again.
    """
    found = {p: newest_tagged_version(model_name(p, method), "fit_digest", digest) for p in products}
    if any(version is None for version in found.values()):
        return None
    try:
        for version in found.values():
            check_registered_generator(version, method)
    except ValueError as err:
        logger.warning("fitting %s again: %s", method, err)
        return None
    client = MlflowClient()
    for version in found.values():
        client.set_registered_model_alias(version.name, CANDIDATE, version.version)
    return [FitOutcome(p, method, v.name, str(v.version), v.run_id) for p, v in found.items()]


def directory_bytes(directory: Path) -> int:
    """The size of every file under ``directory``, in bytes."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def loss_plot(method: str, unit: FitUnit, curves: list[dict[str, float]]) -> np.ndarray:
    """The fit's losses over its steps as one plot (every reported value but the step counters)."""
    names = [k for k in curves[0] if k not in ("step", "mask_step")]
    series = {}
    for name in names:
        points = [(p.get("step", p.get("mask_step", i + 1)), p[name]) for i, p in enumerate(curves) if name in p]
        series[name] = ([x for x, _ in points], [y for _, y in points])
    title = f"{method} fit" + (f" ({unit.defect_type})" if unit.defect_type else "")
    return line_plot(series, title, "step", "loss")


def registry_entry(
    product: str,
    method: str,
    settings: dict[str, Any],
    base: dict[str, str],
    split_digest: str,
    units: list[FitUnit],
    steps: int,
) -> tuple[dict[str, str], str]:
    """The tags (product, method, data and settings digests, base) and description of a fitted model version."""
    tags = {
        "product": product,
        "method": method,
        "data_digest": split_digest,
        "settings_digest": settings_digest(settings),
        **base,
    }
    on_base = f" on the base {base['base_model']}" if base else ""
    names = ", ".join(unit.defect_type or "product" for unit in units)
    return tags, f"{method} fitted for {product}{on_base}: {steps} steps over {names}; split {split_digest}"


def log_fit(cfg: Config, prepared: PreparedData, task: FitTask, method: str, result: Path, product: str) -> FitOutcome:
    """Log params, curves, the split and the model of one method's fit for ``product``; register it as ``candidate``.

    A method fitted per defect type logs each unit's curves as ``<metric>.<type>`` and registers its units
    as one model (``assemble_units``). Where the method builds on the diffusion base, the base's URI is a
    parameter of the run and a tag of the version: the artifacts refer to it and never hold a copy.
    """
    name = model_name(product, method)
    settings = task.settings.get(method, {})
    units = fit_units(method, prepared.split.products[task.product])
    base = {"base_model": task.base_model} if task.base_model and uses_diffusion_base(method) else {}
    tags = {"product": product, "method": method, "job": "finetune"}
    run_name = f"finetune-{method}"
    with mlflow.start_run(experiment_id=experiment_id(cfg, product), run_name=run_name, tags=tags) as run:
        mlflow.log_params(
            {
                "method": method,
                "fitted_with": ",".join([task.product, *task.companions]),
                "fit_units": ",".join(unit.defect_type or "product" for unit in units),
                "max_steps": task.max_steps,
                "workers": cfg.finetune.workers,
                "strategy": task.strategy.strategy,
                "zero_stage": task.strategy.zero_stage,
                "split_digest": prepared.split.digest(),
                **base,
                **{f"settings.{k}": v for k, v in settings.items()},
            }
        )
        steps = 0
        for unit in units:
            curves = json.loads((result / unit_key(method, unit) / CURVES).read_text())
            for index, point in enumerate(curves):  # after a restart the curve starts at the resumed step
                step = int(point.get("step", index + 1)) - 1
                mlflow.log_metrics({unit.metric(k): float(v) for k, v in point.items()}, step=step)
            if curves:
                mlflow.log_image(loss_plot(method, unit, curves), artifact_file=f"curves/{unit_key(method, unit)}.png")
            steps += len(curves)
        mlflow.log_metric("fit_steps", float(steps))
        mlflow.log_artifact(str(prepared.split_path))
        fitted = {unit: result / unit_key(method, unit) / ARTIFACTS for unit in units}
        artifacts = assemble_units(result / method / ASSEMBLED, method, product, settings, fitted)
        mlflow.log_metric("artifact_bytes", float(directory_bytes(artifacts)))
        model_uri = log_generator(artifacts, method, settings)
        tags, description = registry_entry(product, method, settings, base, prepared.split.digest(), units, steps)
        tags["fit_digest"] = fit_digest(cfg, prepared, [task.product, *task.companions], method, task.base_model)
        version = register(model_uri, name, tags=tags, description=description)
    return FitOutcome(product, method, name, str(version.version), run.info.run_id)


def units_per_method(tasks: dict[str, FitTask], prepared: PreparedData) -> dict[str, int]:
    """How many fit units each method runs over all fits: the totals of the finetune job's bars."""
    totals: dict[str, int] = {}
    for task in tasks.values():
        for method in task.methods:
            units = fit_units(method, prepared.split.products[task.product])
            totals[method] = totals.get(method, 0) + len(units)
    return totals


def plan_fits(
    cfg: Config, prepared: PreparedData, joint: list[str], base_uri: str | None
) -> tuple[dict[str, FitTask], list[FitOutcome]]:
    """The trainers' tasks (one per product, one per ``joint`` method) and the fits reused from the registry."""
    separate = [m for m in cfg.methods if m not in joint]
    names = [p.name for p in prepared.products]
    planned = {p: ([p], separate) for p in names} if separate else {}
    planned |= {f"joint-{m}": (names, [m]) for m in joint}
    tasks: dict[str, FitTask] = {}
    reused: list[FitOutcome] = []
    for key, (products, methods) in planned.items():
        to_fit = []
        for method in methods:
            found = registered_fit(products, method, fit_digest(cfg, prepared, products, method, base_uri))
            reused += found or []
            to_fit += [] if found else [method]
        if to_fit:
            tasks[key] = fit_task(cfg, prepared, products, to_fit, base_uri)
    for outcome in reused:
        logger.info(
            "reusing %s version %s (@candidate), fitted from the same digest", outcome.model_name, outcome.version
        )
    return tasks, reused


def finetune(cfg: Config, prepared: PreparedData | None = None) -> list[FitOutcome]:
    """Fit every configured (product, method) pair not already registered from the same digest; returns the versions."""
    # imported here, not by the fit workers that import this module: it loads diffusers, which no baseline uses
    from defectsynth.jobs.pretrain import ensure_base_model

    prepared = prepared or start(cfg)
    if not cfg.methods:
        msg = "nothing to fine-tune: set methods (e.g. --set methods=[perlin,croppaste])"
        raise ValueError(msg)
    # builds every generator once: bad settings fail here, before any cluster time is spent
    joint = [m for m in cfg.methods if fits_jointly(m, cfg.generators.get(m))]
    base = ensure_base_model(cfg, prepared) if any(uses_diffusion_base(m) for m in cfg.methods) else None
    tasks, reused = plan_fits(cfg, prepared, joint, base.uri if base else None)
    if not tasks:
        return reused
    fits = fit_products(
        fit_worker,
        {key: t.model_dump() for key, t in tasks.items()},
        cfg.finetune,
        job="finetune",
        workdir=cfg.workdir,
        results="fits",
        stages=units_per_method(tasks, prepared),
    )
    outcomes = [
        log_fit(cfg, prepared, task, method, fits[key], product)
        for key, task in tasks.items()
        for method in task.methods
        for product in [task.product, *task.companions]
    ]
    for outcome in outcomes:
        logger.info("registered %s version %s (@candidate)", outcome.model_name, outcome.version)
    return reused + outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("finetune", __doc__.splitlines()[0], finetune, argv)


if __name__ == "__main__":
    raise SystemExit(main())
