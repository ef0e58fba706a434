"""Errors raised when a dataset on disk is malformed: each names the offending file."""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A dataset tree or file is malformed; ``path`` names the file or directory at fault."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple:
        """Pickle by the constructor's arguments, so the error crosses Ray's process boundaries intact."""
        return type(self), (self.path, self.problem)


class MissingFileError(DatasetError, FileNotFoundError):
    """A file every dataset holds (its manifest, its card) is not there."""


class ShardError(ValueError):
    """A shard cannot be read as a complete tar of well-named samples."""

    def __init__(self, shard: str, problem: str) -> None:
        self.shard, self.problem = shard, problem
        super().__init__(f"{shard}: {problem}")

    def __reduce__(self) -> tuple:
        """Pickle by the constructor's arguments, so the error crosses Ray's process boundaries intact."""
        return type(self), (self.shard, self.problem)
