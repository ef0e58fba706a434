"""Where a dataset lives: a local path or any URI pyarrow's filesystems understand (``s3://``, ``gs://``).

S3 options ride on the URI as pyarrow reads them, e.g. an S3-compatible server on a custom endpoint:
``s3://bucket/data?endpoint_override=http://127.0.0.1:9000&scheme=http&region=us-east-1``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from defectsynth.storage.redact import redact


@dataclass(frozen=True)
class Location:
    """A filesystem and a base path on it; ``uri`` is how the user named it, credentials masked (for messages)."""

    fs: pafs.FileSystem
    base: str
    uri: str

    def path(self, *parts: str) -> str:
        """A path under the base."""
        return posixpath.join(self.base, *parts)

    def exists(self, path: str) -> bool:
        """True when ``path`` is a file or directory."""
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, directory: str) -> list[str]:
        """File paths directly inside ``directory`` (none if it does not exist), sorted."""
        selector = pafs.FileSelector(directory, allow_not_found=True, recursive=False)
        return sorted(info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File)

    def read_bytes(self, path: str) -> bytes:
        """The whole content of a file."""
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def write_atomically(self, path: str, data: bytes) -> None:
        """Write under a temporary name, then move into place: readers never see half a file."""
        partial = f"{path}.partial"
        with self.fs.open_output_stream(partial) as stream:
            stream.write(data)
        self.fs.move(partial, path)


def local_path(uri: str) -> str | None:
    """The absolute path of a local dataset location (against this process's directory); None for a URI."""
    return None if "://" in uri else str(Path(uri).expanduser().resolve())


def resolve(uri: str | Path, filesystem: pafs.FileSystem | None = None) -> Location:
    """Resolve a dataset URI or local path (made absolute) to a ``Location``."""
    text = str(uri)
    if filesystem is not None:
        return Location(filesystem, text.rstrip("/"), redact(text))
    if (path := local_path(text)) is not None:
        return Location(pafs.LocalFileSystem(), path, text)
    fs, base = pafs.FileSystem.from_uri(text)
    return Location(fs, base.rstrip("/"), redact(text))
