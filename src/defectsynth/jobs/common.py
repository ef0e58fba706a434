"""What every job does first: parse ``--config``/``--set``, log, save the config, join Ray and MLflow."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from defectsynth.core.tracking_errors import TrackingStoreError, is_mlflow_error
from defectsynth.platform.cluster import init_ray, leave_ray
from defectsynth.platform.config import Config, ConfigError, load_config, save_resolved, verbose_overrides
from defectsynth.platform.logs import setup_logging
from defectsynth.platform.prepare import PreparedData, prepare_dataset
from defectsynth.platform.tracking import setup_tracking
from defectsynth.storage.errors import DatasetError

logger = logging.getLogger(__name__)


def parse_args(name: str, description: str, argv: Sequence[str] | None) -> Config:
    """Parse a job's command line into its resolved config."""
    parser = argparse.ArgumentParser(prog=f"python -m defectsynth.jobs.{name}", description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's own output")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return load_config(args.config, verbose_overrides(args.set, args.verbose))


def start(cfg: Config) -> PreparedData:
    """Save the resolved config (printed with --verbose), join Ray and MLflow, and prepare the data and split."""
    path = save_resolved(cfg)  # logs where; the whole config only with --verbose
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("resolved config:\n%s", path.read_text())
    init_ray(cfg.ray)
    setup_tracking(cfg)
    return prepare_dataset(cfg)


def run_main(name: str, description: str, job: Callable[[Config], object], argv: Sequence[str] | None = None) -> int:
    """Entry point of a job module: user errors and a failing MLflow store print one line and exit 2, no traceback."""
    try:
        cfg = parse_args(name, description, argv)
        job(cfg)
    except (ConfigError, DatasetError, ValueError, TrackingStoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_mlflow_error(err):
            raise
        print(f"error: {TrackingStoreError(f'running jobs.{name}', err)}", file=sys.stderr)
        return 2
    finally:
        leave_ray()
    return 0
