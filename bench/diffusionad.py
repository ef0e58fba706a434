"""DiffusionAD on CPU: how its test scores grow with training steps, against the demo's 60 steps.

Trains the DiffusionAD detector (``evaluation.detectors``, method ``none``: its own Perlin + foreground
anomalies, no platform data) on one demo product and scores it on the held-out test split every
``--every`` steps, with the selection-free test protocol of ``jobs.evaluate`` (no checkpoint is chosen
here: this measures learning, not a result to report as the detector's score). The baseline of the
ratios is the same run's score at the demo's 60 steps. Also prints the seconds per training step and
the milliseconds per test image of one-step inference. One torch thread. The last line is one JSON object.

Usage:
    .venv/bin/python bench/diffusionad.py                      # wood, 1200 steps, widths 16,32,32 (~20 min)
    .venv/bin/python bench/diffusionad.py --quick              # seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectsynth.evaluation.data import load_real
from defectsynth.evaluation.detectors import DetectorContext, DiffusionADDetector
from defectsynth.evaluation.settings import DiffusionADConfig
from defectsynth.storage.demo import write_demo
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.split import SplitSettings, split_product

DEMO_STEPS = 60  # what configs/demo.yaml trains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--product", default="wood")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--widths", default="16,32,32")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a few steps at 32 px (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.widths, args.resolution = 4, 2, "8,16", 32
    torch.set_num_threads(1)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        size = max(args.resolution, 64)
        write_demo(
            Path(tmp), size=size, train_good=48, test_good=16, per_defect=9, products=[args.product], progress=False
        )
        product = read_dataset(Path(tmp), "mvtec", [args.product])[0]
        split = split_product(product, SplitSettings())
        normals = load_real(product, split.train_normals, args.resolution)
        test = load_real(product, split.test, args.resolution)

        widths = tuple(int(w) for w in args.widths.split(","))
        settings = DiffusionADConfig(block_out_channels=widths, seg_base_width=8, attention_head_dim=8)
        context = DetectorContext(args.resolution, sorted(split.generator_train), 8, 0.5)
        detector = DiffusionADDetector(settings, context)
        model = detector.build()
        optimizer = detector.optimizer(model)
        rng = np.random.default_rng(0)

        curve, train_seconds = {}, 0.0
        checkpoints = sorted({DEMO_STEPS if not args.quick else 2, *range(args.every, args.steps + 1, args.every)})
        for step in range(1, args.steps + 1):
            started = time.perf_counter()
            model.train()
            batch = detector.training_batch(normals, None, rng)
            loss = detector.loss(model(*batch.inputs), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_seconds += time.perf_counter() - started
            if step in checkpoints:
                started = time.perf_counter()
                scores = detector.predict(model, test).score(test, per_type=False)
                ms_per_image = 1000 * (time.perf_counter() - started) / len(test)
                curve[step] = {k: round(scores[k], 4) for k in ("pixel_auroc", "pixel_ap", "image_auroc")}
                print(f"step {step}: loss {loss.item():.4f} {curve[step]}", flush=True)

    baseline, last = curve[min(curve)], curve[max(curve)]
    result = {
        "product": args.product,
        "resolution": args.resolution,
        "widths": list(widths),
        "steps": args.steps,
        "curve": curve,
        "pixel_auroc_last": last["pixel_auroc"],
        "pixel_ap_last": last["pixel_ap"],
        "image_auroc_last": last["image_auroc"],
        "pixel_ap_ratio_vs_demo_steps": round(last["pixel_ap"] / max(baseline["pixel_ap"], 1e-9), 3),
        "s_per_train_step": round(train_seconds / args.steps, 3),
        "ms_per_test_image": round(ms_per_image, 1),
        "test_images": len(test),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
