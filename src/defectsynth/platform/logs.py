"""Logging set-up for the command line: one handler on stderr, library modules only call getLogger."""

from __future__ import annotations

import logging
import os

from defectsynth.storage.redact import redact


class RedactingFormatter(logging.Formatter):
    """A formatter that masks credentials in URIs (``storage.redact``) in every line it writes, whoever logged it."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted line, redacted."""
        return redact(super().format(record))


def setup_logging(verbose: bool = False) -> None:
    """Send defectsynth's log records to stderr, INFO by default, DEBUG when ``verbose``; credentials masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # MLflow's table migrations and its artifact-copy bars say nothing a person acts on
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
