"""Errors raised when a dataset on disk is malformed: each names the offending file."""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A dataset tree or file is malformed; ``path`` names the file or directory at fault."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
