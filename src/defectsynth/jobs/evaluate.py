"""``jobs.evaluate``: does a method's synthetic data teach detectors to find the real defects?

Per product, one Ray Train fit trains every (detector, method) pair in turn, once per ``evaluate.seeds``
entry: the segmentation U-Net, the defect-type classifier and DiffusionAD (see ``evaluation.detectors``) on
real training normals plus the method's streamed synthetic pairs, and DiffusionAD once more on normals alone
(method ``none``). Each keeps the weights that score best on the validation split (training side only); Ray
tasks then score them on the held-out test split and measure each generated dataset itself (mask alignment
and sanity, fidelity with a sheet of real and generated defects per type, and IS / IC-LPIPS / KID when local
feature-network weights are given). Every result is an MLflow run tagged with product, method, detector and
``detector_seed``; a method's champion alias moves on its mean over seeds; the comparison report (mean±std over
seeds) and the figures land in ``<workdir>/report`` and in MLflow.

    python -m defectsynth.jobs.evaluate --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch
from mlflow.data.meta_dataset import MetaDataset
from pydantic import BaseModel, ConfigDict

from defectsynth.core.strategy import StrategyConfig
from defectsynth.core.train_engine import TrainEngine
from defectsynth.core.weight_average import WeightAverage
from defectsynth.evaluation.data import RealImages, load_real, with_normals
from defectsynth.evaluation.dataset_quality import DatasetQuality, measure_dataset
from defectsynth.evaluation.detectors import (
    DETECTORS,
    NO_SYNTHETIC,
    Detector,
    DetectorContext,
    Predictions,
    SyntheticPair,
    detector_methods,
)
from defectsynth.evaluation.report import (
    FOLD_TAG,
    GENERATION,
    NOT_COMPUTED_TAG,
    ResultRow,
    markdown_report,
    prediction_figures,
    save_png,
)
from defectsynth.evaluation.segmenter import SegmenterConfig
from defectsynth.evaluation.settings import ClassifierConfig, DiffusionADConfig, QualitySettings
from defectsynth.jobs.common import run_main, start
from defectsynth.jobs.progress_board import without_board
from defectsynth.jobs.training import MethodCheckpoints, fit_products, worker_rank
from defectsynth.platform.config import Config
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import dataset_input, experiment_id, model_name, record_scores, resolve_version
from defectsynth.storage import stream
from defectsynth.storage.fs import resolve
from defectsynth.storage.layouts import LayoutOptions, read_product
from defectsynth.storage.manifest import read_card
from defectsynth.storage.records import NORMAL, ProductData
from defectsynth.storage.split import ProductSplit, load_split

logger = logging.getLogger(__name__)

BEST, CURRENT, STATE, AVERAGE = "best.pt", "current.pt", "state.json", "average.pt"


class DetectorRun(BaseModel):
    """One detector trained on one method's data (``none``: no platform data) from one seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str
    method: str
    max_steps: int
    seed: int

    @property
    def key(self) -> str:
        """Directory and checkpoint name of this run, e.g. ``segmenter/perlin/seed0``."""
        return f"{self.detector}/{self.method}/seed{self.seed}"


def run_seed(base: int, seed: int) -> int:
    """The seed of one detector run: both the config's ``seed`` and the run's ``evaluate.seeds`` entry, mixed.

    ``numpy.random.SeedSequence([base, seed])`` reduced to 31 bits, so distinct pairs give unrelated seeds.
    """
    return int(np.random.SeedSequence([base, seed]).generate_state(1)[0] >> 1)


class EvalTask(BaseModel):
    """Everything one product's detector fits need, as plain data."""

    model_config = ConfigDict(extra="forbid")

    product: str
    runs: list[DetectorRun]
    defect_types: list[str]
    dataset_uris: dict[str, str]
    data_root: str
    layout: str
    layout_options: dict[str, Any]
    split_path: str
    resolution: int
    batch_size: int
    synthetic_fraction: float
    synthetic_normals: bool
    validate_every: int
    batch_norm_batches: int
    weight_average: float
    checkpoint_every: int
    seed: int
    threads: int
    segmenter: SegmenterConfig
    classifier: ClassifierConfig
    diffusionad: DiffusionADConfig
    strategy: StrategyConfig

    def context(self) -> DetectorContext:
        """What the detectors of this product share."""
        return DetectorContext(self.resolution, self.defect_types, self.batch_size, self.synthetic_fraction)

    def detector(self, name: str) -> Detector:
        """The named detector with this task's settings for it."""
        return DETECTORS[name](getattr(self, name), self.context())

    def product_data(self) -> tuple[ProductData, ProductSplit]:
        """The product's records and its split."""
        options = LayoutOptions(**self.layout_options)
        product = read_product(Path(self.data_root), self.product, self.layout, options)
        return product, load_split(Path(self.split_path)).products[self.product]


def synthetic_pairs(task: EvalTask, run: DetectorRun, rank: int, world_size: int) -> Iterator[SyntheticPair]:
    """Endless QC-passed samples of the run's method for this product, reshuffled each pass from its seed."""
    method, seed = run.method, run_seed(task.seed, run.seed)
    for epoch in range(1 << 30):
        count = 0
        samples = stream(
            task.dataset_uris[method],
            products=[task.product],
            methods=[method],
            defect_types=task.defect_types,  # never the method's generated normals
            qc_passed=True,
            shuffle=256,
            seed=seed + epoch,
            rank=rank,
            world_size=world_size,
        )
        for sample in samples:
            count += 1
            yield SyntheticPair(sample["image"], sample["mask"], sample["metadata"]["defect_type"])
        if count == 0:
            msg = f"{task.dataset_uris[method]}: no QC-passed {method} samples of {task.product} for rank {rank}"
            raise ValueError(msg)


def generated_normals(task: EvalTask, method: str) -> tuple[list[str], torch.Tensor]:
    """The QC-passed normals (label 0) ``method`` generated for this product: keys and N x 3 x H x W images."""
    samples = list(
        stream(
            task.dataset_uris[method],
            products=[task.product],
            methods=[method],
            defect_types=[NORMAL],
            qc_passed=True,
            rank=0,
            world_size=1,
        )
    )
    empty = torch.zeros(0, 3, task.resolution, task.resolution)
    return [s["key"] for s in samples], torch.stack([s["image"] for s in samples]) if samples else empty


def training_normals(task: EvalTask, method: str, real: RealImages) -> RealImages:
    """The real training normals, and the method's generated ones too when ``synthetic_normals`` asks for them."""
    if not task.synthetic_normals or method == NO_SYNTHETIC:
        return real
    keys, images = generated_normals(task, method)
    logger.info("%s/%s: %d generated normals join %d real ones", task.product, method, len(keys), len(real))
    return with_normals(real, keys, images)


def _save(
    directory: Path,
    engine: TrainEngine,
    best: dict[str, torch.Tensor],
    state: dict[str, Any],
    average: WeightAverage | None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(engine.state_dict(), directory / CURRENT)
    torch.save(best, directory / BEST)
    if average is not None:
        torch.save(average.state_dict(), directory / AVERAGE)
    (directory / STATE).write_text(json.dumps(state))


def validated_weights(engine: TrainEngine, average: WeightAverage | None) -> AbstractContextManager[None]:
    """The weights validation reads and selection keeps: the moving average when there is one, else the live ones."""
    return nullcontext() if average is None else average.swapped_in()


def validation_score(detector: Detector, model: torch.nn.Module, validation: RealImages) -> float:
    """The detector's selection metric on the validation split (0 when undefined there)."""
    scores = detector.predict(model, validation).score(validation, per_type=False)
    return scores.get(detector.selection_metric, 0.0)


def train_detector(
    task: EvalTask, run: DetectorRun, data: tuple[RealImages, RealImages], checkpoints: MethodCheckpoints
) -> None:
    """Train one detector on one method's data, keep the best weights on validation, checkpoint as it goes.

    Model init, the batch sampling and the synthetic stream's shuffle all follow ``run_seed(task.seed, run.seed)``.
    """
    normals, validation = data
    rank, world_size = worker_rank()
    detector = task.detector(run.detector)
    seed = run_seed(task.seed, run.seed)
    torch.manual_seed(seed)
    model = detector.build()
    state: dict[str, Any] = {"step": 0, "best_score": -1.0, "best_step": 0, "resumed_at": []}
    resume = checkpoints.progress(run.key)
    if resume is not None:
        model.load_state_dict(torch.load(resume / CURRENT, weights_only=True))
        state = json.loads((resume / STATE).read_text())
        state["resumed_at"].append(state["step"])
        logger.info("resuming %s/%s at step %d", task.product, run.key, state["step"])
    best = (
        torch.load(resume / BEST, weights_only=True)
        if resume
        else {k: v.clone() for k, v in model.state_dict().items()}
    )
    engine = TrainEngine(model, detector.optimizer(model), task.strategy, micro_batch_size=task.batch_size)
    average = WeightAverage(engine.module, task.weight_average) if task.weight_average else None
    if resume is not None and average is not None:
        average.load_state_dict(torch.load(resume / AVERAGE, weights_only=True))
    synthetic = None if run.method == NO_SYNTHETIC else synthetic_pairs(task, run, rank, world_size)
    rng = np.random.default_rng([seed, rank, state["step"]])
    for step in range(state["step"] + 1, run.max_steps + 1):
        engine.train()
        batch = detector.training_batch(normals, synthetic, rng)
        engine.scale_learning_rate(detector.learning_rate_factor(step, run.max_steps))
        loss = detector.loss(engine(*(engine.to_device(t) for t in batch.inputs)), batch)
        engine.step(loss)
        if average is not None:
            average.update()
        metrics: dict[str, Any] = {"loss": float(loss.detach()), "step": step}
        if step % task.validate_every == 0 or step == run.max_steps:
            batches = (detector.training_batch(normals, synthetic, rng).inputs for _ in range(task.batch_norm_batches))
            with validated_weights(engine, average):  # the batches are drawn lazily, at the weights validated
                engine.recompute_batch_norm(batches)
                score = validation_score(detector, engine.module, validation)
                if score > state["best_score"]:
                    state.update(best_score=score, best_step=step)
                    best = engine.state_dict()
            metrics[f"val_{detector.selection_metric}"] = score
        state["step"] = step
        if step % task.checkpoint_every == 0 and step < run.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                _save(Path(tmp), engine, best, state, average)
                checkpoints.report(run.key, metrics, progress=Path(tmp))
    _save(checkpoints.method_dir(run.key), engine, best, state, average)
    checkpoints.report(run.key, state, done=True)


def evaluate_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: every (detector, method, seed) run of one product, each selected on validation."""
    config, board = without_board(config)
    task = EvalTask.model_validate(config)
    torch.set_num_threads(task.threads)
    rank, _ = worker_rank()
    product, split = task.product_data()
    real = load_real(product, split.train_normals, task.resolution)
    validation = load_real(product, split.validation, task.resolution)
    normals: dict[str, RealImages] = {}  # per method, read for its first unfinished run only
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = MethodCheckpoints(Path(tmp), rank)
        for run in task.runs:
            if not checkpoints.finished(run.key):
                if run.method not in normals:
                    normals[run.method] = training_normals(task, run.method, real)
                train_detector(task, run, (normals[run.method], validation), checkpoints)
            if board is not None and rank == 0:  # a run finished before a restart counts too, as in finetune
                board.advance.remote(run.detector)


@dataclass(frozen=True)
class TestResult:
    """Test scores of one (product, detector, method, seed) and the figures drawn from its predictions."""

    metrics: dict[str, float]
    figures: dict[str, np.ndarray]


@ray.remote(num_cpus=1)
def score_on_test(task: dict[str, Any], run: dict[str, Any], weights: str) -> TestResult:
    """Score the selected weights on the held-out test split (the only place test images are read)."""
    parsed, detector_run = EvalTask.model_validate(task), DetectorRun.model_validate(run)
    torch.set_num_threads(parsed.threads)
    product, split = parsed.product_data()
    detector = parsed.detector(detector_run.detector)
    model = detector.build()
    model.load_state_dict(torch.load(Path(weights), weights_only=True))
    real = load_real(product, split.test, parsed.resolution)
    predictions: Predictions = detector.predict(model, real)
    return TestResult(predictions.score(real), prediction_figures(predictions, real))


@ray.remote(num_cpus=1)
def dataset_quality(task: dict[str, Any], method: str, settings: dict[str, Any]) -> DatasetQuality:
    """Measure one method's generated samples of one product (no detector involved)."""
    parsed = EvalTask.model_validate(task)
    torch.set_num_threads(parsed.threads)
    product, split = parsed.product_data()
    return measure_dataset(
        parsed.dataset_uris[method],
        product,
        method=method,
        resolution=parsed.resolution,
        reference_ids=[i for ids in split.generator_train.values() for i in ids],
        settings=QualitySettings.model_validate(settings),
    )


@dataclass(frozen=True)
class EvalOutcome:
    """Test scores of one (product, method, detector, seed); ``champion``: the method's seed mean moved the alias."""

    product: str
    method: str
    detector: str
    seed: int
    metrics: dict[str, float]
    champion: bool
    run_id: str


def plan_runs(cfg: Config, defect_types: list[str]) -> list[DetectorRun]:
    """Every (detector, method, seed) of a product; a detector that cannot run there is skipped with a warning."""
    ev = cfg.evaluate
    runs = []
    for name in ev.detectors:
        reason = DETECTORS[name].unavailable(defect_types)  # type: ignore[attr-defined]
        if reason:
            logger.warning("skipping the %s: %s", name, reason)
            continue
        steps = ev.steps.get(name, ev.max_steps)
        runs += [
            DetectorRun(detector=name, method=m, max_steps=steps, seed=seed)
            for m in detector_methods(name, cfg.methods)
            for seed in ev.seeds_of(name)
        ]
    return runs


def eval_task(cfg: Config, prepared: PreparedData, product: str) -> EvalTask:
    """The worker config of one product's detector fits."""
    ev = cfg.evaluate
    defect_types = sorted(prepared.split.products[product].generator_train)
    return EvalTask(
        product=product,
        runs=plan_runs(cfg, defect_types),
        defect_types=defect_types,
        dataset_uris={m: cfg.generate.dataset_uri(cfg.workdir, m) for m in cfg.methods},
        data_root=str(cfg.data.root),
        layout=cfg.data.layout,
        layout_options=cfg.data.layout_options.model_dump(),
        split_path=str(prepared.split_path),
        resolution=cfg.data.resolution,
        batch_size=ev.batch_size,
        synthetic_fraction=ev.synthetic_fraction,
        synthetic_normals=ev.synthetic_normals,
        validate_every=ev.validate_every,
        batch_norm_batches=ev.batch_norm_batches,
        weight_average=ev.weight_average,
        checkpoint_every=ev.checkpoint_every,
        seed=cfg.seed,
        threads=ev.cpus_per_worker,
        segmenter=SegmenterConfig(
            base_width=ev.base_width,
            lr=ev.learning_rate,
            lr_milestones=tuple(ev.learning_rate_milestones),
            lr_gamma=ev.learning_rate_decay,
            batch_size=ev.batch_size,
        ),
        classifier=ev.classifier,
        diffusionad=ev.diffusionad,
        strategy=ev.distributed,
    )


def _dataset_input(uri: str, method: str) -> tuple[MetaDataset, str]:
    card = read_card(resolve(uri))
    return dataset_input(uri, method, card["digest"]), card["digest"]


MethodLink = tuple[dict[str, str], MetaDataset | None]  # tags naming the model version and dataset, the dataset


def method_link(cfg: Config, task: EvalTask, method: str) -> MethodLink:
    """Tags linking a run to the method's registered model and dataset (none for method "none")."""
    if method == NO_SYNTHETIC:
        return {}, None
    name = model_name(task.product, method)
    version = resolve_version(name, cfg.generate.model_alias)
    dataset, digest = _dataset_input(task.dataset_uris[method], method)
    return {"model_name": name, "model_version": str(version.version), "dataset_digest": digest}, dataset


def log_detector_run(
    cfg: Config,
    prepared: PreparedData,
    task: EvalTask,
    run: DetectorRun,
    link: MethodLink,
    fit: Path,
    result: TestResult,
) -> EvalOutcome:
    """One MLflow run: test metrics under the stable names and the figures, linked to the model and dataset.

    The champion alias is left alone here: :func:`crown_champions` moves it once per method, on the seeds' mean.
    """
    links, dataset = link
    tags = {
        "product": task.product,
        "method": run.method,
        "detector": run.detector,
        "detector_seed": str(run.seed),
        "job": "evaluate",
        **links,
    }
    if cfg.split.fold is not None:  # the two-fold protocol: the report averages the folds' scores
        tags[FOLD_TAG] = str(cfg.split.fold)
    state = json.loads((fit / run.key / STATE).read_text())
    detector = task.detector(run.detector)
    name = f"evaluate-{run.method}-{run.detector}-seed{run.seed}"
    with mlflow.start_run(experiment_id=experiment_id(cfg, task.product), run_name=name, tags=tags) as mlflow_run:
        if dataset is not None:
            mlflow.log_input(dataset, context="training")
        mlflow.log_params(
            {
                "max_steps": run.max_steps,
                "seed": run.seed,
                "base_seed": task.seed,
                "batch_size": task.batch_size,
                "synthetic_fraction": task.synthetic_fraction,
                "resolution": task.resolution,
                "strategy": task.strategy.strategy,
                "split_digest": prepared.split.digest(),
                "selection_metric": detector.selection_metric,
                "selected_step": state["best_step"],
                "detector_settings": json.dumps(getattr(task, run.detector).model_dump(mode="json")),
            }
        )
        mlflow.log_metric(f"val_{detector.selection_metric}", state["best_score"])
        mlflow.log_metrics(result.metrics)
        for figure, image in result.figures.items():
            mlflow.log_image(image, artifact_file=f"{figure}.png")
            out = cfg.workdir / "report" / task.product / f"{run.method}-{run.detector}-seed{run.seed}-{figure}.png"
            save_png(image, out)
    metrics, run_id = result.metrics, mlflow_run.info.run_id
    return EvalOutcome(task.product, run.method, run.detector, run.seed, metrics, False, run_id)


def seed_mean(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the seeds' runs that have it."""
    keys = dict.fromkeys(k for m in metrics for k in m)
    return {k: float(np.mean([m[k] for m in metrics if k in m])) for k in keys}


def crown_champions(
    cfg: Config, outcomes: list[EvalOutcome], links: dict[tuple[str, str], MethodLink]
) -> list[EvalOutcome]:
    """Move each (product, method)'s champion alias once, on the champion detector's mean over seeds.

    The model version is tagged with the seed-mean metrics, every seed's run with ``champion`` true or false.

    Returns:
        ``outcomes`` with ``champion`` set on the runs of the methods whose mean became champion.
    """
    ev = cfg.evaluate
    groups: dict[tuple[str, str], list[EvalOutcome]] = {}
    for o in outcomes:
        if o.detector == ev.champion_detector and links[o.product, o.method][0]:
            groups.setdefault((o.product, o.method), []).append(o)
    crowned = set()
    client = mlflow.MlflowClient()
    for (product, method), group in groups.items():
        tags = links[product, method][0]
        scores = seed_mean([o.metrics for o in group])
        won = record_scores(tags["model_name"], tags["model_version"], scores, ev.champion_metric)
        for o in group:
            client.set_tag(o.run_id, "champion", str(won).lower())
        crowned |= {o.run_id for o in group} if won else set()
    return [replace(o, champion=o.run_id in crowned) for o in outcomes]


def generation_ms_per_image(cfg: Config, product: str, method: str) -> float | None:
    """Milliseconds per generated image of the latest generate run that wrote samples (its wall time)."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id(cfg, product)],
        filter_string=f"tags.job = 'generate' and tags.method = '{method}' and metrics.samples_per_s > 0",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return 1000.0 / runs[0].data.metrics["samples_per_s"] if runs else None


def log_quality_run(cfg: Config, task: EvalTask, method: str, link: MethodLink, quality: DatasetQuality) -> ResultRow:
    """One MLflow run per (product, method) with the dataset's own measurements, generation speed and fidelity sheet.

    The sheet is logged as ``fidelity_sheet.png`` and saved as
    ``<workdir>/report/<product>/<method>-fidelity-sheet.png``.
    """
    metrics = dict(quality.metrics)
    ms_per_image = generation_ms_per_image(cfg, task.product, method)
    if ms_per_image is not None:
        metrics["ms_per_image"] = ms_per_image
    links, dataset = link
    tags = {"product": task.product, "method": method, "detector": GENERATION, "job": "evaluate", **links}
    tags.update({NOT_COMPUTED_TAG: quality.not_computed} if quality.not_computed else {})
    with mlflow.start_run(
        experiment_id=experiment_id(cfg, task.product), run_name=f"evaluate-{method}-{GENERATION}", tags=tags
    ) as run:
        if dataset is not None:
            mlflow.log_input(dataset, context="evaluated")
        mlflow.log_metrics(metrics)
        if quality.sheet is not None:
            mlflow.log_image(quality.sheet, artifact_file="fidelity_sheet.png")
            save_png(quality.sheet, cfg.workdir / "report" / task.product / f"{method}-fidelity-sheet.png")
    notes = {NOT_COMPUTED_TAG: quality.not_computed} if quality.not_computed else {}
    return ResultRow(task.product, method, GENERATION, metrics, run.info.run_id, notes=notes)


def write_report(cfg: Config, rows: list[ResultRow]) -> Path:
    """The comparison report as ``<workdir>/report/scores.md``, also logged as an MLflow run."""
    text = markdown_report(rows)
    out = cfg.workdir / "report" / "scores.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    run_ids = ",".join(r.run_id for r in rows if r.run_id)
    with mlflow.start_run(
        experiment_id=experiment_id(cfg, "report"), run_name="report", tags={"job": "report", "evaluate_runs": run_ids}
    ):
        mlflow.log_artifact(str(out))
    return out


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` returns: every detector outcome, the dataset measurements and the report."""

    outcomes: list[EvalOutcome]
    rows: list[ResultRow]
    report: Path


def train_and_select(cfg: Config, tasks: list[EvalTask]) -> dict[str, Path]:
    """The training phase: fit and select every run of every product; returns product -> selected weights."""
    return fit_products(
        evaluate_worker,
        {t.product: t.model_dump() for t in tasks},
        cfg.evaluate,
        job="evaluate",
        workdir=cfg.workdir,
        results="detectors",
        stages=Counter(r.detector for t in tasks for r in t.runs),
    )


def evaluate(cfg: Config, prepared: PreparedData | None = None) -> Evaluation:
    """Train, select and test every (product, method, detector, seed); measure the datasets; write the report."""
    prepared = prepared or start(cfg)
    if not cfg.methods:
        msg = "nothing to evaluate: set methods (e.g. --set methods=[perlin,croppaste])"
        raise ValueError(msg)
    tasks = [eval_task(cfg, prepared, p.name) for p in prepared.products]
    fits = train_and_select(cfg, tasks)
    runs = [(t, r) for t in tasks for r in t.runs]
    tested = [
        score_on_test.remote(t.model_dump(), r.model_dump(), str(fits[t.product] / r.key / BEST)) for t, r in runs
    ]
    settings = cfg.evaluate.quality.model_dump(mode="json")
    measured = [(t, m, dataset_quality.remote(t.model_dump(), m, settings)) for t in tasks for m in cfg.methods]
    methods = [NO_SYNTHETIC, *cfg.methods]  # read each model version and dataset card once per product
    links = {(t.product, m): method_link(cfg, t, m) for t in tasks for m in methods}
    logged = [
        log_detector_run(cfg, prepared, t, r, links[t.product, r.method], fits[t.product], result)
        for (t, r), result in zip(runs, ray.get(tested), strict=True)
    ]
    outcomes = crown_champions(cfg, logged, links)
    rows = [ResultRow(o.product, o.method, o.detector, o.metrics, o.run_id, seed=o.seed) for o in outcomes]
    rows += [log_quality_run(cfg, t, m, links[t.product, m], ray.get(ref)) for t, m, ref in measured]
    return Evaluation(outcomes, rows, write_report(cfg, rows))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("evaluate", __doc__.splitlines()[0], evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
