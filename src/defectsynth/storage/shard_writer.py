"""Writing one series of shards, ``<prefix>-NNNNNN.tar``, committed by rename when complete.

Like webdataset's ``ShardWriter`` (maxcount and maxsize limits, a fixed mtime for reproducible
tars), except that a shard is written as ``<name>.tar.partial`` and moved to ``<name>.tar`` only once
closed: a crash leaves a ``.partial`` file, never a truncated tar that looks complete.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from defectsynth.storage.fs import Location
from defectsynth.storage.keys import check_member_name
from defectsynth.storage.sample import EncodedSample
from defectsynth.storage.shard_reader import read_shard

logger = logging.getLogger(__name__)

SHARD_MTIME = 0  # fixed, so the same samples give byte-identical tars
PARTIAL = ".partial"
WRITE_BUFFER = 1 << 20  # unbuffered, tarfile's 10 KiB copies each became a write call


def shard_name(prefix: str, index: int) -> str:
    """``<prefix>-NNNNNN.tar``."""
    return f"{prefix}-{index:06d}.tar"


@dataclass
class ShardInfo:
    """A committed shard: its file name, samples and size."""

    name: str
    keys: list[str] = field(default_factory=list)
    nbytes: int = 0


class _OpenShard:
    """One tar being written as a stream to ``<path>.partial``."""

    def __init__(self, location: Location, path: str, name: str) -> None:
        self.location, self.path, self.partial = location, path, path + PARTIAL
        self.stream = location.fs.open_output_stream(self.partial, buffer_size=WRITE_BUFFER)
        self.tar = tarfile.open(fileobj=self.stream, mode="w", format=tarfile.USTAR_FORMAT)
        self.info = ShardInfo(name)

    def add(self, sample: EncodedSample) -> None:
        self.add_members(sample.key, sample.members)
        self.info.nbytes += sample.nbytes

    def add_members(self, key: str, members: dict[str, bytes]) -> None:
        for extension in sorted(members):
            data = members[extension]
            member = tarfile.TarInfo(check_member_name(f"{key}.{extension}"))
            member.size, member.mtime, member.mode = len(data), SHARD_MTIME, 0o444
            self.tar.addfile(member, io.BytesIO(data))
        self.info.keys.append(key)

    def commit(self) -> ShardInfo:
        self.tar.close()
        self.stream.close()
        self.location.fs.move(self.partial, self.path)
        return self.info

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            self.stream.close()
            self.location.fs.delete_file(self.partial)


def rewrite_shard(location: Location, path: str, keep: Callable[[str], bool]) -> list[str]:
    """Rewrite a committed shard with only the samples whose key ``keep`` accepts; returns the keys dropped.

    The kept samples keep their order and bytes; the new tar is written as ``.partial`` and moved over the
    old one, so a reader sees the old shard or the new, never half of one. A shard left empty is deleted.
    """
    samples = list(read_shard(location, path))
    dropped = [s.key for s in samples if not keep(s.key)]
    if not dropped:
        return []
    kept = [s for s in samples if keep(s.key)]
    if not kept:
        location.fs.delete_file(path)
        return dropped
    shard = _OpenShard(location, path, posixpath.basename(path))
    for sample in kept:
        shard.add_members(sample.key, sample.members)
    shard.commit()
    return dropped


class ShardWriter:
    """Write encoded samples into ``<directory>/<prefix>-NNNNNN.tar``, starting at ``start_index``.

    A shard closes when it holds ``maxcount`` samples or when the next sample would push it past
    ``maxsize`` bytes (a single larger sample still gets a shard of its own). ``on_commit`` runs after
    each shard is renamed into place.

    Example:
        >>> with ShardWriter(location, "shards", "wood-perlin", maxcount=100) as writer:  # doctest: +SKIP
        ...     writer.write(encode_sample(sample))
    """

    def __init__(
        self,
        location: Location,
        directory: str,
        prefix: str,
        *,
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        start_index: int = 0,
        on_commit: Callable[[ShardInfo], None] | None = None,
    ) -> None:
        if maxcount < 1 or maxsize < 1:
            msg = f"maxcount and maxsize must be positive, got {maxcount} and {maxsize}"
            raise ValueError(msg)
        self.location, self.directory, self.prefix = location, directory, prefix
        location.fs.create_dir(location.path(directory), recursive=True)
        self.maxcount, self.maxsize = maxcount, maxsize
        self.next_index = start_index
        self.on_commit = on_commit
        self.committed: list[ShardInfo] = []
        self._open: _OpenShard | None = None

    def write(self, sample: EncodedSample) -> str:
        """Append one sample, opening and closing shards as the limits require; returns its shard's name."""
        current = self._open
        if current and (current.info.nbytes + sample.nbytes > self.maxsize and current.info.keys):
            self._commit()
        if self._open is None:
            name = shard_name(self.prefix, self.next_index)
            self.next_index += 1
            self._open = _OpenShard(self.location, self.location.path(self.directory, name), name)
        self._open.add(sample)
        name = self._open.info.name
        if len(self._open.info.keys) >= self.maxcount or self._open.info.nbytes >= self.maxsize:
            self._commit()
        return name

    def _commit(self) -> None:
        assert self._open is not None
        info = self._open.commit()
        self._open = None
        self.committed.append(info)
        logger.debug("committed shard %s (%d samples, %d bytes)", info.name, len(info.keys), info.nbytes)
        if self.on_commit:
            self.on_commit(info)

    def close(self) -> None:
        """Commit the open shard, if it holds any sample."""
        if self._open is not None:
            self._commit()

    def abort(self) -> None:
        """Drop the open shard's partial file; committed shards stay."""
        if self._open is not None:
            self._open.abort()
            self._open = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
