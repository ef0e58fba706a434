"""Logging set-up for the command line: one handler on stderr, library modules only call getLogger."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool = False) -> None:
    """Send defectsynth's log records to stderr, INFO by default, DEBUG when ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
