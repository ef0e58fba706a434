"""One evaluation detector on one product and one method's dataset: validation and test scores against steps.

Trains one (detector, method, seed) run exactly as ``jobs.evaluate.train_detector`` does (its settings, batches,
synthetic stream, BatchNorm re-estimation and validation every ``evaluate.validate_every`` steps), in one
process: ``TrainEngine`` without a process group, float32, the strategy's gradient clipping, and the weights'
moving average when ``evaluate.weight_average`` asks for one. At each validation it also scores the test split
(with the type mean over its defect types), to show learning (the job reads test images only after selection).
Method ``none`` is DiffusionAD on its own anomalies. Prints one line per validation; the last line is one JSON
object ``{"runs": [{"seed", "selected_step", "selected", "curve": {step: {loss, [noise_loss, mask_loss,] val_*,
test_*}}}], "seconds"}``.

Usage:
    .venv/bin/python bench/tier_detector.py --config configs/benchmark.yaml --product wood --method croppaste \
        --detector diffusionad [evaluate.diffusionad.lr=1e-4 ...] --seeds 0 1 2   # overrides before --seeds
    .venv/bin/python bench/tier_detector.py --quick   # a tiny demo product and perlin data generated here, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fidelity import DEMO_CONFIG, quick_datasets, quick_overrides

from defectsynth.core.train_engine import TrainEngine
from defectsynth.core.weight_average import WeightAverage
from defectsynth.evaluation.data import load_real
from defectsynth.evaluation.detectors import NO_SYNTHETIC
from defectsynth.jobs.evaluate import DetectorRun, EvalTask, eval_task, run_seed, synthetic_pairs, validated_weights
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset

METRICS = ("pixel_ap", "pixel_auroc", "image_auroc")


def _losses(output: Any, loss: torch.Tensor) -> dict[str, float]:
    """The loss, and DiffusionAD's two terms when the output has them."""
    parts = {"loss": loss, **{k: getattr(output, k) for k in ("noise_loss", "mask_loss") if hasattr(output, k)}}
    return {k: round(float(v.detach()), 4) for k, v in parts.items()}


def type_mean(scores: dict[str, float], metric: str = "pixel_ap") -> float:
    """The mean of ``<metric>.<type>`` over the product's defect types (the headline's type mean, one product)."""
    values = [v for k, v in scores.items() if k.startswith(f"{metric}.")]
    return round(float(np.mean(values)), 4) if values else 0.0


def one_seed(task: EvalTask, run: DetectorRun) -> dict[str, Any]:
    """Train one run as the job does; validation and test scores at every validation step."""
    product, split = task.product_data()
    normals = load_real(product, split.train_normals, task.resolution)
    real = {"val": load_real(product, split.validation, task.resolution)}
    real["test"] = load_real(product, split.test, task.resolution)
    detector = task.detector(run.detector)
    seed = run_seed(task.seed, run.seed)
    torch.manual_seed(seed)
    model = detector.build()
    engine = TrainEngine(model, detector.optimizer(model), task.strategy, micro_batch_size=task.batch_size)
    average = WeightAverage(engine.module, task.weight_average) if task.weight_average else None
    synthetic = None if run.method == NO_SYNTHETIC else synthetic_pairs(task, run, 0, 1)
    rng = np.random.default_rng([seed, 0, 0])  # train_detector's draw on rank 0, from step 0
    curve: dict[int, dict[str, float]] = {}
    for step in range(1, run.max_steps + 1):
        engine.train()
        batch = detector.training_batch(normals, synthetic, rng)
        engine.scale_learning_rate(detector.learning_rate_factor(step, run.max_steps))
        output = engine(*(engine.to_device(t) for t in batch.inputs))
        loss = detector.loss(output, batch)
        engine.step(loss)
        if average is not None:
            average.update()
        if step % task.validate_every == 0 or step == run.max_steps:
            batches = (detector.training_batch(normals, synthetic, rng).inputs for _ in range(task.batch_norm_batches))
            row = _losses(output, loss)
            with validated_weights(engine, average):
                engine.recompute_batch_norm(batches)
                for name, images in real.items():
                    scores = detector.predict(engine.module, images).score(images, per_type=name == "test")
                    row |= {f"{name}_{k}": round(scores.get(k, 0.0), 4) for k in METRICS}
                    row |= {f"{name}_type_mean": type_mean(scores)} if name == "test" else {}
            curve[step] = row
            print(json.dumps({"seed": run.seed, "step": step, **row}), flush=True)
    best = max(curve, key=lambda s: curve[s][f"val_{detector.selection_metric}"])  # the job's selection
    return {"seed": run.seed, "selected_step": best, "selected": curve[best], "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--product", default="wood")
    parser.add_argument("--method", default="croppaste", help="a method of the run, or none (DiffusionAD only)")
    parser.add_argument("--detector", default="diffusionad")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's steps for the detector")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny demo product and perlin data, seconds")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. evaluate.diffusionad.lr=1e-4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"products=[{args.product}]", *args.overrides]
        if args.quick:
            root = Path(tmp)
            overrides += [*quick_overrides(root), "methods=[perlin]"]
            overrides += ["evaluate.batch_norm_batches=2", "evaluate.validate_every=2"]
            args.product, args.method, args.steps = "wood", "perlin", 4
        cfg = load_config(DEMO_CONFIG if args.quick else args.config, overrides)
        prepared = prepare_dataset(cfg)
        if args.quick:
            quick_datasets(cfg, prepared, root / "artifacts")
        task = eval_task(cfg, prepared, args.product)
        steps = args.steps or cfg.evaluate.steps.get(args.detector, cfg.evaluate.max_steps)
        runs = [
            one_seed(task, DetectorRun(detector=args.detector, method=args.method, max_steps=steps, seed=seed))
            for seed in args.seeds
        ]
    print(json.dumps({"runs": runs, "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
