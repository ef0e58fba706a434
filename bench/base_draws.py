"""One configuration over several draws: each run's per-method scores, then mean ± std over the runs.

A draw is a whole run of the same configuration under another ``seed`` (its base, fits, datasets and detector
seeds). Per ``--workdir`` the segmenter's ``--metric`` (pooled over products), its type mean (over product and
defect-type pairs) and, per defect type of ``--types``, its mean over the products having it come from the run's
MLflow store (its resolved config's ``tracking_uri``), as its report computes them (mean ± std over the detector
seeds); the last column is the mean ± std over the draws of those seed means, and the separation lines rank two
methods only beyond the draws' spread. ``--same-draw``, once per ``--workdir`` and in its order, names another run
of the same draw (same ``seed``, same base) whose methods the workdir lacks join that draw: a run of one method on
the bases of earlier runs, beside the baselines those runs scored. The last line is one JSON object.

Usage:
    .venv/bin/python bench/base_draws.py --workdir runs/tier4p-vaewhole --workdir runs/tier4p-vaewhole-seed1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from defectsynth.evaluation.report import (
    TYPE_MEAN,
    ResultRow,
    draw_spreads,
    draws_table,
    metric_of,
    rows_from_mlflow,
    separation_lines,
    types_of,
)
from defectsynth.platform.config import RESOLVED_NAME, load_config


def store(workdir: Path) -> str:
    """The MLflow store of a finished run, by its resolved config (a configured ``tracking.uri`` or the workdir's)."""
    return load_config(workdir / RESOLVED_NAME, [f"workdir={workdir.resolve()}"]).tracking_uri


def joined(rows: Sequence[ResultRow], other: Sequence[ResultRow]) -> list[ResultRow]:
    """``rows``, plus the rows of ``other`` whose method ``rows`` lacks (one draw scored in two runs)."""
    have = {r.method for r in rows}
    return [*rows, *(r for r in other if r.method not in have)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, action="append", required=True, help="a finished run (repeatable)")
    parser.add_argument("--detector", default="segmenter")
    parser.add_argument("--metric", default="pixel_ap")
    parser.add_argument("--types", default="", help="comma-separated defect types to score one by one too")
    parser.add_argument(
        "--same-draw", type=Path, action="append", default=[], help="per --workdir: a run of the same draw (repeatable)"
    )
    args = parser.parse_args()
    if args.same_draw and len(args.same_draw) != len(args.workdir):
        parser.error(f"--same-draw given {len(args.same_draw)} times for {len(args.workdir)} --workdir")
    draws = [rows_from_mlflow(store(w), "all") for w in args.workdir]
    if args.same_draw:
        others = [rows_from_mlflow(store(w), "all") for w in args.same_draw]
        draws = [joined(rows, other) for rows, other in zip(draws, others, strict=True)]
    names = [w.name for w in args.workdir]
    summary = {}
    scored = [(args.metric, metric_of(args.metric)), (TYPE_MEAN, types_of(args.metric))]
    scored += [(t, metric_of(f"{args.metric}.{t}")) for t in args.types.split(",") if t]
    for label, values in scored:
        spreads = draw_spreads(draws, values, args.detector)
        print(f"{args.detector} {label}: per draw mean±std over detector seeds; over draws mean±std of those means")
        print(draws_table(spreads, names))
        print(*separation_lines({m: over for m, (_, over) in spreads.items()}, over="draw"), sep="\n")
        print()
        summary[label] = {
            m: {"draws": [s.mean if s else None for s in per_draw], "mean": over.mean, "std": over.std}
            for m, (per_draw, over) in spreads.items()
            if over is not None
        }
    runs = {"workdirs": [str(w) for w in args.workdir], "same_draw": [str(w) for w in args.same_draw]}
    print(json.dumps(runs | summary))


if __name__ == "__main__":
    main()
