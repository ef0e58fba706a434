"""Reading what complete shards hold: per sample, its members and its JSON metadata.

Only the small ``.json`` members are read; image data is skipped by seeking, so indexing a dataset
costs its headers, not its pixels. A truncated or unreadable tar raises ``ShardError`` naming it.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

from defectsynth.storage.fs import Location
from defectsynth.storage.keys import check_member_name
from defectsynth.storage.sample import META

SHARDS_DIR = "shards"


class ShardError(ValueError):
    """A shard cannot be read as a complete tar of well-named samples."""

    def __init__(self, shard: str, problem: str) -> None:
        self.shard, self.problem = shard, problem
        super().__init__(f"{shard}: {problem}")


@dataclass
class IndexedSample:
    """One sample found in a shard."""

    key: str
    shard: str
    extensions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None


def complete_shards(location: Location) -> list[str]:
    """Paths of the complete shards (``*.tar``; ``*.tar.partial`` are not complete), sorted."""
    return [p for p in location.list_files(location.path(SHARDS_DIR)) if p.endswith(".tar")]


def iter_members(location: Location, path: str, *, read: set[str]) -> list[tuple[str, str, bytes | None]]:
    """(key, extension, data) for every member of a shard; data only for extensions in ``read``."""
    name = posixpath.basename(path)
    members: list[tuple[str, str, bytes | None]] = []
    try:
        with location.fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise ShardError(name, f"member {info.name!r} is not a regular file")
                key, _, extension = check_member_name(info.name).partition(".")
                data = None
                if extension in read:
                    extracted = tar.extractfile(info)
                    data = extracted.read() if extracted else b""
                    if len(data) != info.size:
                        raise ShardError(name, f"member {info.name!r} is truncated")
                members.append((key, extension, data))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(name, f"unreadable or truncated tar ({err})") from err
    except ValueError as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(name, str(err)) from err
    return members


def index_shard(location: Location, path: str) -> list[IndexedSample]:
    """The samples of one shard in order, with their parsed metadata."""
    name = posixpath.basename(path)
    samples: dict[str, IndexedSample] = {}
    for key, extension, data in iter_members(location, path, read={META}):
        sample = samples.setdefault(key, IndexedSample(key=key, shard=name))
        if extension in sample.extensions:
            raise ShardError(name, f"sample {key!r} has member .{extension} twice")
        sample.extensions.append(extension)
        if data is not None:
            try:
                sample.metadata = json.loads(data)
            except json.JSONDecodeError as err:
                raise ShardError(name, f"{key}.json is not valid JSON ({err})") from err
    return list(samples.values())


def index_dataset(location: Location) -> list[IndexedSample]:
    """Every sample of every complete shard; a key found twice is an error naming both shards."""
    seen: dict[str, IndexedSample] = {}
    for path in complete_shards(location):
        for sample in index_shard(location, path):
            if sample.key in seen:
                raise ShardError(sample.shard, f"key {sample.key!r} also in {seen[sample.key].shard}")
            seen[sample.key] = sample
    return list(seen.values())
