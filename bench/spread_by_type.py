"""Where a method's seed spread sits: each (run, product, method, defect type)'s segmenter spread beside its fidelity.

Per ``--workdir`` (a finished run; its MLflow store as ``bench/base_draws.py`` finds it), every (product, method,
defect type) gets the mean and sample std over the detector seeds of the segmenter's ``pixel_ap.<type>`` and the
generated dataset's ``appearance_distance.<type>`` (its distance to the real defects of the type). Prints the
``--top`` widest pairs, then per method the Spearman correlation of spread and appearance distance over its pairs,
and per method and type the spread's median where the appearance distance is at most ``--near`` and above it.
The last line is one JSON object.

Usage:
    .venv/bin/python bench/spread_by_type.py --workdir runs/tier4p-vaewhole --workdir runs/tier4p-vaewhole-seed1
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from base_draws import store
from scipy.stats import spearmanr

from defectsynth.evaluation.report import (
    GENERATION,
    ResultRow,
    Values,
    defect_types,
    method_spreads,
    metric_of,
    rows_from_mlflow,
    seed_spread,
    types_of,
)


def pairs(run: str, rows: list[ResultRow], detector: str) -> list[dict]:
    """One record per (product, method, type) of a run with several detector seeds and a fidelity measure."""
    seeds: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    appearance: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if row.detector == detector:
            seeds[row.product, row.method].append(row)
        elif row.detector == GENERATION:
            appearance[row.product, row.method] = row.metrics
    records = []
    for (product, method), runs in sorted(seeds.items()):
        for key, distance in sorted(appearance.get((product, method), {}).items()):
            if not key.startswith("appearance_distance."):
                continue
            defect_type = key.removeprefix("appearance_distance.")
            ap = seed_spread(runs, metric_of(f"pixel_ap.{defect_type}"))
            if ap is not None and ap.std is not None:
                records.append(
                    {
                        "run": run,
                        "product": product,
                        "method": method,
                        "type": defect_type,
                        "ap_mean": round(ap.mean, 4),
                        "ap_std": round(ap.std, 4),
                        "appearance": round(distance, 4),
                    }
                )
    return records


def by_method(records: list[dict], near: float) -> dict[str, dict]:
    """Per method: Spearman of spread against appearance distance, and per type the spread's median near and far."""
    summary = {}
    for method in sorted({r["method"] for r in records}):
        mine = [r for r in records if r["method"] == method]
        rho = spearmanr([r["appearance"] for r in mine], [r["ap_std"] for r in mine])
        types = {}
        for defect_type in sorted({r["type"] for r in mine}):
            of_type = [r for r in mine if r["type"] == defect_type]
            close = [r["ap_std"] for r in of_type if r["appearance"] <= near]
            far = [r["ap_std"] for r in of_type if r["appearance"] > near]
            types[defect_type] = {
                "near": {"pairs": len(close), "median_std": round(float(np.median(close)), 4) if close else None},
                "far": {"pairs": len(far), "median_std": round(float(np.median(far)), 4) if far else None},
            }
        summary[method] = {
            "pairs": len(mine),
            "spearman": round(float(rho.statistic), 3),
            "p": round(float(rho.pvalue), 4),
            "types": types,
        }
    return summary


def types_except(metric: str, left_out: str) -> Values:
    """The row's ``<metric>.<type>`` values as ``report.types_of`` gives them, without ``left_out``'s."""
    return lambda r: [r.metrics[f"{metric}.{t}"] for t in defect_types([r], metric) if t != left_out]


def type_mean_spreads(run: str, rows: list[ResultRow], detector: str, without: str) -> list[dict]:
    """Per method of a run: the report's type mean over the seeds, its std, and its std without one type's pairs."""
    mine = [r for r in rows if r.detector == detector]
    every = method_spreads(mine, types_of("pixel_ap"))
    rest = method_spreads(mine, types_except("pixel_ap", without))
    out = []
    for method, spread in every.items():
        left = rest[method]
        if spread is None or spread.std is None or left is None or left.std is None:
            continue  # one seed: no spread
        out.append(
            {
                "run": run,
                "method": method,
                "type_mean": round(spread.mean, 4),
                "std": round(spread.std, 4),
                "std_without": round(left.std, 4),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, action="append", required=True, help="a finished run (repeatable)")
    parser.add_argument("--detector", default="segmenter")
    parser.add_argument("--near", type=float, default=1.2, help="appearance distance up to which a type looks near")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--without", default="hole", help="the type the last table's second spread leaves out")
    args = parser.parse_args()
    runs = {w.name: rows_from_mlflow(store(w), "all") for w in args.workdir}
    records = [r for name, rows in runs.items() for r in pairs(name, rows, args.detector)]
    records.sort(key=lambda r: -r["ap_std"])
    print("run  product  method  type  pixel AP mean±std over seeds  appearance distance")
    for r in records[: args.top]:
        print(
            f"{r['run']}  {r['product']}  {r['method']}  {r['type']}  {r['ap_mean']:.3f}±{r['ap_std']:.3f}  "
            f"{r['appearance']:.3f}"
        )
    summary = by_method(records, args.near)
    for method, s in summary.items():
        print(f"{method}: {s['pairs']} pairs, Spearman(appearance distance, spread) {s['spearman']} (p {s['p']})")
        for defect_type, t in s["types"].items():
            print(
                f"  {defect_type}: median std {t['near']['median_std']} over {t['near']['pairs']} pairs at "
                f"appearance <= {args.near}, {t['far']['median_std']} over {t['far']['pairs']} above"
            )
    spreads = [t for name, rows in runs.items() for t in type_mean_spreads(name, rows, args.detector, args.without)]
    print(f"type mean over the seeds, mean±std, then its std without the {args.without} pairs:")
    for t in spreads:
        print(f"  {t['run']}  {t['method']}  {t['type_mean']:.3f}±{t['std']:.3f}  {t['std_without']:.3f}")
    result = {"workdirs": [str(w) for w in args.workdir], "near": args.near, "without": args.without}
    print(json.dumps({**result, "by_method": summary, "type_mean_spreads": spreads, "pairs": records}))


if __name__ == "__main__":
    main()
