"""Which cross-attention layers and sampling steps BADG's refined mask (Eq. 13) should aggregate, measured.

Loads a finished run's fitted badg model of ``--product`` (``<workdir>/fits/<product>/badg/assembled``) and
generates the generate job's real-mask requests (``--per-type`` per type) once per choice of
``refine_resolutions`` x ``refine_steps`` (``--choices``); the images do not depend on the choice, only the
masks do. Per choice and type it prints:

- ``alignment``: the share of the sample's change against its source normal that lies inside the refined mask
  (``evaluation.mask_checks.mask_alignment``; 1 = the mask holds all that was painted);
- ``iou`` and ``cover``: the refined mask against the conditioning mask (IoU, and the share of it kept);
- ``dropped_change_ratio``: the mean change of the pixels the refinement dropped from the conditioning mask over
  that of the pixels it kept (below 1: it dropped what was painted less; 1: it dropped at random);
- ``empty``: the share of samples whose refined mask is empty.

The last line is one JSON object.

Usage:
    .venv/bin/python bench/badg_refine.py --run runs/tier-wp-all --product wood --per-type 6 \\
        --choices "all:all;all:late;32:all;16:all;8:all;16,32:late"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from defectsynth.evaluation.mask_checks import mask_alignment, mask_iou
from defectsynth.evaluation.metrics import UndefinedMetricError
from defectsynth.generators.base import generator_class
from defectsynth.generators.fit_units import product_generator
from defectsynth.generators.masks import load_source
from defectsynth.jobs.generate import product_requests
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset


def parse_choice(text: str) -> dict:
    """``"16,32:late"`` -> badg settings ``refine_resolutions=(16, 32)``, ``refine_steps="late"``; ``all`` is None."""
    sides, steps = text.split(":")
    resolutions = None if sides == "all" else tuple(int(s) for s in sides.split(","))
    return {"refine_resolutions": resolutions, "refine_steps": steps}


def change_ratio(image: np.ndarray, source: np.ndarray, kept: np.ndarray, dropped: np.ndarray) -> float | None:
    """Mean change per pixel where the refinement dropped the conditioning mask, over the mean where it kept it."""
    change = np.abs(image.astype(np.float64) - source.astype(np.float64)).sum(axis=-1)
    if not dropped.any() or not kept.any() or change[kept].mean() == 0:
        return None
    return float(change[dropped].mean() / change[kept].mean())


def measure(samples: list, requests: list) -> dict:
    """Alignment of the change with the refined mask, and the refined mask against the conditioning mask."""
    aligned, ious, covers, ratios, empty = [], [], [], [], 0
    for sample, request in zip(samples, requests, strict=True):
        if not sample.mask.any():
            empty += 1
            continue
        source = load_source(request)
        try:
            aligned.append(mask_alignment(sample.image, source, sample.mask))
        except UndefinedMetricError:  # nothing changed
            pass
        ious.append(mask_iou(sample.mask, sample.cond_mask))
        covers.append(float((sample.mask & sample.cond_mask).sum() / max(sample.cond_mask.sum(), 1)))
        ratio = change_ratio(sample.image, source, sample.mask & sample.cond_mask, sample.cond_mask & ~sample.mask)
        if ratio is not None:
            ratios.append(ratio)
    mean = lambda values: round(float(np.mean(values)), 3) if values else None  # noqa: E731
    return {
        "alignment": mean(aligned),
        "iou": mean(ious),
        "cover": mean(covers),
        "dropped_change_ratio": mean(ratios),
        "empty": empty / len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run's workdir with badg fitted")
    parser.add_argument("--product", required=True)
    parser.add_argument("--per-type", type=int, default=6)
    parser.add_argument("--choices", default="all:all;all:late;16:all;32:all", help="sides:steps, ;-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(
        args.run / "config.resolved.yaml", [f"products=[{args.product}]", f"generate.per_type={args.per_type}"]
    )
    prepared = prepare_dataset(cfg)
    product, split = prepared.products[0], prepared.split.products[args.product]
    requests = product_requests(cfg, product, split, "real", generator_class("badg"))
    fitted = args.run / "fits" / args.product / "badg" / "assembled"
    generator = product_generator("badg")
    generator.load(fitted)
    results = {}
    for text in args.choices.split(";"):
        for unit in generator.units.values():  # a loaded model generates with its fitted settings: set the choice
            unit.settings = unit.settings.model_copy(update=parse_choice(text))
        samples = generator.generate(requests)
        pairs = list(zip(samples, requests, strict=True))
        by_type = {
            t: measure(*zip(*[p for p in pairs if p[1].defect_type == t], strict=True)) for t in product.defect_types
        }
        everything = measure(samples, requests)
        results[text] = {"all": everything, **by_type}
        print(text, everything, flush=True)
    print(json.dumps({"product": args.product, "per_type": args.per_type, "choices": results}))


if __name__ == "__main__":
    main()
