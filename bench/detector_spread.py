"""The segmenter's seed spread on one method's data over products, close to how the quality tier's headline computes it.

Trains the (detector, method) run of every product of ``--products`` under each seed, exactly as the evaluate
job does (``tier_detector.one_seed``), then averages the selected run's test scores over products per seed and
reports mean and sample std over the seeds of the pixel AP and of the type mean. The type mean here is the mean
over products of each product's type mean; the headline pools the (product, type) pairs instead, which weighs a
product by its number of types. Overrides (``key=value``) compare settings, e.g. ``evaluate.weight_average=0.9``.
The last line is one JSON object.

Usage:
    .venv/bin/python bench/detector_spread.py --config configs/benchmark.yaml --method anomalydiffusion \
        workdir=<a tier run> seed=<its seed> --products fabric pill washer wood --seeds 0 1 2 3 4  # overrides first
    .venv/bin/python bench/detector_spread.py --quick   # a tiny demo product and perlin data generated here
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
from tier_detector import one_seed

from defectsynth.jobs.evaluate import DetectorRun, eval_task
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset

SCORES = ("test_pixel_ap", "test_type_mean")


def spread(per_seed: list[float]) -> dict[str, Any]:
    """Mean and sample std (0 for one seed) of per-seed values, and the values."""
    values = np.asarray(per_seed)
    return {
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4),
        "per_seed": [round(float(v), 4) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--method", default="croppaste")
    parser.add_argument("--detector", default="segmenter")
    parser.add_argument("--products", nargs="+", default=["wood"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny demo product and perlin data, seconds")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. evaluate.weight_average=0.9")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        if args.quick:
            root = Path(tmp)
            overrides += [*quick_overrides(root), "methods=[perlin]"]
            overrides += ["evaluate.batch_norm_batches=2", "evaluate.validate_every=2", "evaluate.max_steps=4"]
            args.products, args.method = ["wood"], "perlin"
        cfg = load_config(
            DEMO_CONFIG if args.quick else args.config, [f"products=[{','.join(args.products)}]", *overrides]
        )
        prepared = prepare_dataset(cfg)
        if args.quick:
            quick_datasets(cfg, prepared, root / "artifacts")
        steps = cfg.evaluate.steps.get(args.detector, cfg.evaluate.max_steps)
        selected: dict[str, dict[int, dict[str, float]]] = {}
        for product in args.products:
            task = eval_task(cfg, prepared, product)
            runs = [
                DetectorRun(detector=args.detector, method=args.method, max_steps=steps, seed=s) for s in args.seeds
            ]
            selected[product] = {run.seed: one_seed(task, run)["selected"] for run in runs}
        over_products = {
            score: spread([float(np.mean([selected[p][s][score] for p in args.products])) for s in args.seeds])
            for score in SCORES
        }
        per_product = {
            p: {score: spread([selected[p][s][score] for s in args.seeds]) for score in SCORES} for p in args.products
        }
    result = {"method": args.method, "overrides": args.overrides, "seeds": args.seeds, "over_products": over_products}
    print(json.dumps({**result, "per_product": per_product, "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
