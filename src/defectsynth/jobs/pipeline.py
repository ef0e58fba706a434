"""``jobs.pipeline``: finetune -> generate -> evaluate for the configured products and methods.

Ends with the comparison report of ``jobs.evaluate``, printed and saved as ``<workdir>/report/scores.md``.

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
from defectsynth.jobs.generate import check_intensity, generate
from defectsynth.platform.config import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineResult:
    """Where a pipeline run left its outputs."""

    outcomes: list[EvalOutcome]
    datasets: list[str]
    report: Path


def pipeline(cfg: Config) -> PipelineResult:
    """Run the three jobs on one cluster and MLflow store; print the comparison report.

    ``generate.intensity`` is checked against the methods' domains first, so a bad value costs no fine-tuning.
    """
    check_intensity(cfg)
    prepared = start(cfg)
    finetune(cfg, prepared)
    datasets = [outcome.uri for outcome in generate(cfg, prepared)]
    evaluation = evaluate(cfg, prepared)
    print(f"\n{evaluation.report.read_text()}\n")
    return PipelineResult(evaluation.outcomes, datasets, evaluation.report)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return run_main("pipeline", __doc__.splitlines()[0], pipeline, argv)


if __name__ == "__main__":
    raise SystemExit(main())
