"""``jobs.pipeline``: finetune -> generate -> evaluate for the configured products and methods.

Ends with a table of the test scores, printed and saved as ``<workdir>/report/scores.md``.

    python -m defectsynth.jobs.pipeline --config configs/demo.yaml [--set key=value ...]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from defectsynth.jobs.common import run_main, start
from defectsynth.jobs.evaluate import EvalOutcome, evaluate
from defectsynth.jobs.finetune import finetune
from defectsynth.jobs.generate import generate
from defectsynth.platform.config import Config
from defectsynth.platform.summary import table

logger = logging.getLogger(__name__)

TABLE_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "image_auroc", "image_ap", "image_f1max")


@dataclass(frozen=True)
class PipelineResult:
    """Where a pipeline run left its outputs."""

    outcomes: list[EvalOutcome]
    datasets: list[str]
    report: Path


def scores_table(outcomes: list[EvalOutcome]) -> str:
    """Products x methods rows of the main metrics, then the per-method mean over products."""
    rows = []
    for o in sorted(outcomes, key=lambda o: (o.product, o.method)):
        rows.append([o.product, o.method, *(f"{o.metrics[m]:.3f}" if m in o.metrics else "-" for m in TABLE_METRICS)])
    for method in sorted({o.method for o in outcomes}):
        mine = [o for o in outcomes if o.method == method]
        means = []
        for metric in TABLE_METRICS:
            values = [o.metrics[metric] for o in mine if metric in o.metrics]
            means.append(f"{sum(values) / len(values):.3f}" if values else "-")
        rows.append(["mean", method, *means])
    return table(["product", "method", *TABLE_METRICS], rows)


def pipeline(cfg: Config) -> PipelineResult:
    """Run the three jobs on one cluster and MLflow store; print and save the score table."""
    prepared = start(cfg)
    finetune(cfg, prepared)
    datasets = [outcome.uri for outcome in generate(cfg, prepared)]
    outcomes = evaluate(cfg, prepared)
    text = scores_table(outcomes)
    report = cfg.workdir / "report" / "scores.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"# Test scores (segmenter)\n\n```\n{text}\n```\n")
    print(f"\n{text}\n")
    return PipelineResult(outcomes, datasets, report)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("pipeline", __doc__.splitlines()[0], pipeline, argv)


if __name__ == "__main__":
    raise SystemExit(main())
