"""Indexing complete shards: per sample, its member extensions and its parsed JSON metadata.

Shards are read with ``read_shard`` (the one shard reader), so the index sees what a stream sees:
links and directories skipped, a truncated or unreadable tar a ``ShardError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from defectsynth.storage.errors import ShardError
from defectsynth.storage.fs import Location
from defectsynth.storage.shard_reader import read_shard

SHARDS_DIR = "shards"


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


def index_shard(location: Location, path: str) -> list[IndexedSample]:
    """The samples of one shard in order, with their parsed metadata.

    Raises:
        ShardError: Naming the shard: it cannot be read (see ``read_shard``), a sample appears twice,
            or a ``<key>.json`` member (named) is not a UTF-8 JSON object.
    """
    samples: dict[str, IndexedSample] = {}
    for read in read_shard(location, path):
        read.require_whole()
        if read.key in samples:
            raise ShardError(read.shard, f"sample {read.key!r} appears twice (its members are not consecutive)")
        samples[read.key] = IndexedSample(
            key=read.key, shard=read.shard, extensions=list(read.members), metadata=read.metadata()
        )
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
