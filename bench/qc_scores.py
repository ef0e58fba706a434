"""Means of every QC score of a written dataset, per product and overall (BADG's background PSNR and SSIM, ...).

The scores sit in each sample's metadata (``qc.scores``), not in the manifest; this streams the shards once.
The last line is one JSON object: ``{product: {score: mean}}`` plus ``"all"``.

Usage:
    .venv/bin/python bench/qc_scores.py runs/tier-wp-badg/datasets/badg
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from defectsynth.storage import stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="a dataset directory or URI written by the generate job")
    args = parser.parse_args()
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for sample in stream(args.dataset):
        meta = sample["metadata"]
        for key, value in meta["qc"]["scores"].items():
            scores[meta["product"]][key].append(value)
            scores["all"][key].append(value)
    means = {group: {k: round(float(np.mean(v)), 4) for k, v in found.items()} for group, found in scores.items()}
    for group, found in means.items():
        print(group, found)
    print(json.dumps(means))


if __name__ == "__main__":
    main()
