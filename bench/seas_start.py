"""SeaS's start step: the fidelity of a fitted SeaS model's samples for several ``start_noise_step`` values.

The paper noises the source normal "at t = 1500" (the authors: the beta schedule stretched to 1500 steps, so
almost nothing of the normal is left) and relies on the fine-tuned Stable Diffusion to draw the whole
product. A base that draws products poorly may do better from a normal noised inside the schedule (SDEdit:
forward-noised to timestep t, denoised from there). For each value this loads the run's registered SeaS model
of ``--product`` (``make benchmark`` or any run with ``seas`` in its methods, so ``--config`` and the
overrides name that run), generates ``per_type`` samples per defect type with the run's requests, measures
them as ``jobs.evaluate`` does (``mask_shape_distance``, ``appearance_distance`` against the real training
defects of each type; 0 = the real ones, lower is closer), and writes a contact sheet per value to ``--out``.
The last line is one JSON object: ``{"starts": {value: {metric: mean over types}}, "seconds": ...}``.

Usage:
    .venv/bin/python bench/seas_start.py --config configs/benchmark.yaml --product wood --starts 1500,900,600 \\
        products=[wood] workdir=runs/benchmark
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from defectsynth.evaluation.dataset_quality import measure_dataset
from defectsynth.evaluation.settings import QualitySettings
from defectsynth.generators.base import generator_class
from defectsynth.jobs.generate import product_requests
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import load_generator, model_name, setup_tracking
from defectsynth.storage.dataset_writer import DatasetWriter

KEYS = ("mask_shape_distance", "appearance_distance")


def contact_sheet(samples: list, path: Path, per_type: int = 6) -> None:
    """Rows of defect types: each sample above its mask overlaid in red."""
    by_type: dict[str, list] = {}
    for sample in samples:
        by_type.setdefault(sample.metadata.defect_type, []).append(sample)
    rows = []
    for defect_type in sorted(by_type):
        tiles = []
        for sample in by_type[defect_type][:per_type]:
            overlay = sample.image.copy()
            overlay[sample.mask] = (0.5 * overlay[sample.mask] + [127, 0, 0]).astype(np.uint8)
            tiles.append(np.concatenate([sample.image, overlay]))
        tiles += [np.zeros_like(tiles[0])] * (per_type - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    Image.fromarray(np.concatenate(rows)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--product", required=True)
    parser.add_argument("--starts", default="1500,900,600", help="start_noise_step values, comma-separated")
    parser.add_argument("--per-type", type=int, default=12)
    parser.add_argument("--out", default="runs/seas_start")
    parser.add_argument("overrides", nargs="*", help="config overrides naming the run, e.g. workdir=runs/benchmark")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = load_config(args.config, [*args.overrides, f"generate.per_type={args.per_type}"])
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    product = next(p for p in prepared.products if p.name == args.product)
    split = prepared.split.products[product.name]
    requests = [r for r in product_requests(cfg, product, split, "learned", generator_class("seas")) if r.label == 1]
    references = [i for ids in split.generator_train.values() for i in ids]
    generator = load_generator(f"models:/{model_name(product.name, 'seas')}/latest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for start in (int(value) for value in args.starts.split(",")):
        generator.settings = generator.settings.model_copy(update={"start_noise_step": start})
        samples = generator.generate(requests)
        contact_sheet(samples, out / f"{product.name}-start{start}.png")
        with tempfile.TemporaryDirectory() as tmp:
            with DatasetWriter(Path(tmp) / "seas") as writer:
                for sample in samples:
                    writer.write(sample)
            metrics = measure_dataset(
                Path(tmp) / "seas", product, method="seas", resolution=cfg.data.resolution,
                reference_ids=references, settings=QualitySettings(),
            ).metrics  # fmt: skip
        results[start] = {key: round(metrics[key], 3) for key in KEYS if key in metrics}
        print(start, results[start], flush=True)
    print(json.dumps({"starts": results, "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
