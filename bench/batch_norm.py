"""Eval-mode segmenter scores with BatchNorm's running averages against re-estimated statistics, paired.

Trains the evaluation's segmenter on one method's generated dataset exactly as ``jobs.evaluate`` does (its
settings, batches and synthetic stream) and, every ``--every`` steps, scores the same weights twice on the
validation and test splits: with the running averages the training left, and after
``TrainEngine.recompute_batch_norm`` over ``evaluate.batch_norm_batches`` training batches (on a copy, so the
training run itself is the same in both columns). Prints one line per checkpoint; the last line is one JSON
object ``{"runs": [{"seed", "checkpoints": [{"step", "val_running", "val_recomputed", "test_running",
"test_recomputed"}]}], "seconds"}`` (pixel AP).

Usage:
    .venv/bin/python bench/batch_norm.py --config configs/benchmark.yaml --product wood --method croppaste
    .venv/bin/python bench/batch_norm.py --quick   # a tiny demo product and perlin data generated here, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fidelity import DEMO_CONFIG, quick_datasets, quick_overrides

from defectsynth.core.train_engine import TrainEngine
from defectsynth.evaluation.data import RealImages, load_real
from defectsynth.jobs.evaluate import DetectorRun, EvalTask, eval_task, run_seed, synthetic_pairs, validation_score
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset


def paired_scores(task: EvalTask, engine: TrainEngine, batches: list, val: RealImages, test: RealImages) -> dict:
    """Validation and test pixel AP of the engine's weights with running and with re-estimated statistics."""
    detector = task.detector("segmenter")
    scores = {"val_running": validation_score(detector, engine.module, val)}
    scores["test_running"] = validation_score(detector, engine.module, test)
    copied = copy.deepcopy(engine.module)  # re-estimated on a copy: the training run goes on unchanged
    twin = TrainEngine(copied, torch.optim.SGD(copied.parameters()), task.strategy, micro_batch_size=task.batch_size)
    twin.recompute_batch_norm(batches)
    scores["val_recomputed"] = validation_score(detector, twin.module, val)
    scores["test_recomputed"] = validation_score(detector, twin.module, test)
    return scores


def one_seed(task: EvalTask, method: str, seed: int, steps: int, every: int) -> list[dict]:
    """Train one segmenter seed as the job does and score it, paired, every ``every`` steps."""
    detector = task.detector("segmenter")
    product, split = task.product_data()
    normals = load_real(product, split.train_normals, task.resolution)
    val, test = load_real(product, split.validation, task.resolution), load_real(product, split.test, task.resolution)
    run = DetectorRun(detector="segmenter", method=method, max_steps=steps, seed=seed)
    torch.manual_seed(run_seed(task.seed, seed))
    model = detector.build()
    engine = TrainEngine(model, detector.optimizer(model), task.strategy, micro_batch_size=task.batch_size)
    synthetic = synthetic_pairs(task, run, 0, 1)
    rng = np.random.default_rng(run_seed(task.seed, seed))
    checkpoints = []
    for step in range(1, steps + 1):
        engine.train()
        batch = detector.training_batch(normals, synthetic, rng)
        engine.step(detector.loss(engine(*batch.inputs), batch))
        if step % every == 0 or step == steps:
            batches = [detector.training_batch(normals, synthetic, rng).inputs for _ in range(task.batch_norm_batches)]
            row = {"step": step, **paired_scores(task, engine, batches, val, test)}
            print(json.dumps({"seed": seed, **{k: round(v, 3) for k, v in row.items()}}), flush=True)
            checkpoints.append(row)
    return checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--product", default="wood")
    parser.add_argument("--method", default="croppaste")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's segmenter steps")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny demo product and perlin data, seconds")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. evaluate.batch_norm_batches=8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"products=[{args.product}]", *args.overrides]
        if args.quick:
            root = Path(tmp)
            overrides += [*quick_overrides(root), "methods=[perlin]"]
            overrides += ["evaluate.batch_norm_batches=2", "evaluate.base_width=4"]
            args.method, args.steps, args.every = "perlin", 4, 2
        cfg = load_config(DEMO_CONFIG if args.quick else args.config, overrides)
        prepared = prepare_dataset(cfg)
        if args.quick:
            quick_datasets(cfg, prepared, root / "artifacts")
        task = eval_task(cfg, prepared, args.product)
        steps = args.steps or cfg.evaluate.steps.get("segmenter", cfg.evaluate.max_steps)
        runs = [{"seed": s, "checkpoints": one_seed(task, args.method, s, steps, args.every)} for s in args.seeds]
    print(json.dumps({"runs": runs, "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
