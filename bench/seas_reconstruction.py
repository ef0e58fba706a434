"""Does a fitted SeaS model draw its training defects back? Each one noised to the start step, denoised twice.

Loads a fitted seas artifact directory (``bench/method_probe.py --method seas`` writes one under ``<out>/product``)
and the run's product, noises every generator-training defect image to the model's ``start_noise_step`` and denoises
it as generation does, once under its type's abnormal prompt and once under the normal prompt. Per type it prints the
mean absolute change from the training image (0-255, over channels) inside the defect's mask and outside it, for
both prompts: where the abnormal prompt keeps the defect, its in-mask change is well below the normal prompt's.
The sheet shows per image: the training defect, the abnormal-prompt result, the normal-prompt result.
``--variant`` (JSON) changes generation settings first (``guidance_scale``, ``eta``, ``negative_prompt``).

Usage:
    .venv/bin/python bench/seas_reconstruction.py --config runs/<run>/config.resolved.yaml --product wood \\
        --artifacts /tmp/seas-wood/product --out /tmp/seas-wood/reconstruction.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from defectsynth.generators.base import build_generator
from defectsynth.generators.refine import measured_strength
from defectsynth.generators.training_pairs import load_training_defects
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.storage.records import NORMAL

IMAGES_PER_ROW = 4


def change(made: np.ndarray, source: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean absolute change (0-255) inside and outside ``mask``: the samples' ``strength``, in pixel levels."""
    return 255 * measured_strength(source, made, mask), 255 * measured_strength(source, made, ~mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a run's config.resolved.yaml (the data)")
    parser.add_argument("--product", required=True)
    parser.add_argument("--artifacts", type=Path, required=True, help="a fitted seas artifact directory")
    parser.add_argument("--variant", default="{}", help="JSON of generation settings changed before generating")
    parser.add_argument("--out", type=Path, required=True, help="the sheet (png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"products=[{args.product}]"])
    prepared = prepare_dataset(cfg)
    product, split = prepared.products[0], prepared.split.products[args.product]
    generator = build_generator("seas", {})
    generator.load(args.artifacts)
    generator.settings = generator.settings.model_copy(update=json.loads(args.variant))
    defects = load_training_defects([(product, split)], generator.model.resolution)
    rows, changes = [], {}
    for index, (image, mask, (_, defect_type)) in enumerate(
        zip(defects.images, defects.masks, defects.keys, strict=True)
    ):
        requests = [
            SimpleNamespace(label=1, defect_type=defect_type, seed=index),
            SimpleNamespace(label=0, defect_type=NORMAL, seed=index),
        ]
        made, _ = generator.synthesize([image, image], requests)
        changes.setdefault(defect_type, []).append([*change(made[0], image, mask), *change(made[1], image, mask)])
        rows.append(np.concatenate([image, *made], axis=1))
    summary = {}
    for defect_type, values in changes.items():
        inside, outside, normal_inside, normal_outside = np.mean(values, axis=0)
        summary[defect_type] = {
            "abnormal": {"inside": round(inside, 1), "outside": round(outside, 1)},
            "normal": {"inside": round(normal_inside, 1), "outside": round(normal_outside, 1)},
        }
        print(
            f"{defect_type:14s} change inside / outside the mask: abnormal prompt {inside:5.1f} / {outside:4.1f}, "
            f"normal prompt {normal_inside:5.1f} / {normal_outside:4.1f}"
        )
    grid = [np.concatenate(rows[i : i + IMAGES_PER_ROW], axis=1) for i in range(0, len(rows), IMAGES_PER_ROW)]
    width = max(row.shape[1] for row in grid)
    grid = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in grid]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(grid, axis=0)).save(args.out)
    print(json.dumps({"product": args.product, "variant": json.loads(args.variant), "change": summary}))


if __name__ == "__main__":
    main()
