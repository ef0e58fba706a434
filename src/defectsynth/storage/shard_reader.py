"""A shard's samples: ``iter_tar``'s members, their names checked, consecutive ones grouped by key.

The one way index, verify, export and streaming read a shard. Member names must be ``<key>.<extension>``
(``check_member_name``); a member seen twice in one sample is noted on the sample, its first copy kept.
Readers that need a sample's metadata but not its pixels (the index, export) parse it with
``ShardSample.metadata``; those that decode pixels too use ``sample.decode_members``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from defectsynth.storage.errors import ShardError
from defectsynth.storage.fs import Location
from defectsynth.storage.keys import KEY_PATTERN, check_member_name
from defectsynth.storage.sample import META
from defectsynth.storage.tar_reader import iter_tar

_ANY_MEMBER = re.compile(rf"({KEY_PATTERN.pattern})\.([^/\x00]+)")  # every check of check_member_name


@dataclass
class ShardSample:
    """The members of one sample as read from a shard; ``problems`` holds grouping faults (a twice-seen member)."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def require_whole(self) -> None:
        """Raise ShardError naming the shard, the member and the sample when a member was seen twice."""
        if self.problems:
            raise ShardError(self.shard, f"{self.problems[0]} in sample {self.key!r}")

    def metadata(self) -> dict[str, Any] | None:
        """The ``<key>.json`` member parsed, or None when the sample has none; no PNG is decoded.

        Raises:
            ShardError: Naming the shard and the member: it is not UTF-8 JSON, or holds no JSON object.
        """
        if META not in self.members:
            return None
        member = f"{self.key}.{META}"
        try:
            metadata = json.loads(self.members[META])
        except ValueError as err:  # a JSONDecodeError, or a UnicodeDecodeError for bytes that are not UTF-8
            raise ShardError(self.shard, f"{member} is not valid JSON ({err})") from err
        if not isinstance(metadata, dict):
            raise ShardError(self.shard, f"{member} must hold a JSON object")
        return metadata


def group_samples(members: Iterable[tuple[str, str, bytes]], shard: str) -> Iterator[ShardSample]:
    """One ``ShardSample`` per run of consecutive ``(key, extension, data)`` members sharing a key."""
    sample: ShardSample | None = None
    for key, extension, data in members:
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample
            sample = ShardSample(key, shard)
        if extension in sample.members:
            sample.problems.append(f"member {f'{key}.{extension}'!r} appears twice")
        else:
            sample.members[extension] = data
    if sample is not None:
        yield sample


def member_pattern(extensions: Collection[str] | None = None) -> re.Pattern[str]:
    """A regex whose full match is a safe member name (key, extension), with one of ``extensions`` when given."""
    if extensions is None:
        return _ANY_MEMBER
    return re.compile(rf"({KEY_PATTERN.pattern})\.({'|'.join(map(re.escape, sorted(extensions)))})")


def member_problem(name: str, extensions: Collection[str] | None = None) -> str:
    """Why ``name`` is no ``<key>.<extension>`` member name (with a known extension when ``extensions`` given)."""
    try:
        check_member_name(name)
    except ValueError as err:
        return str(err)
    return f"member {name!r} has unknown extension .{name.partition('.')[2]} (known: {sorted(extensions or ())})"


def split_members(
    members: Iterable[tuple[str, bytes]],
    shard: str,
    *,
    extensions: Collection[str] | None = None,
    on_bad_member: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, data)`` per member; a bad name goes to ``on_bad_member`` (skipped), else raises ShardError."""
    pattern = member_pattern(extensions)
    for name, data in members:
        match = pattern.fullmatch(name)
        if match is not None:
            yield match[1], match[2], data
        elif on_bad_member is None:
            raise ShardError(shard, member_problem(name, extensions))
        else:
            on_bad_member(member_problem(name, extensions))


def iter_samples(
    stream: Any,
    shard: str,
    *,
    extensions: Collection[str] | None = None,
    on_bad_member: Callable[[str], None] | None = None,
    strict_end: bool = False,
) -> Iterator[ShardSample]:
    """The samples of a tar read from ``stream``, reading every byte (truncation and the archive end checked).

    Args:
        stream: Anything with ``read``, positioned at the tar's first byte.
        shard: The shard's name, for errors.
        extensions: Accept only these member extensions (others are bad members); None accepts any.
        on_bad_member: Called with the problem of an unsafe or unknown member name, or of a member that
            is not a regular file; the member is skipped. When None, a bad name raises ``ShardError``
            and links, directories and devices are skipped, never followed.
        strict_end: Take a lone zero block at the very end as truncation too (see ``iter_tar``).

    Raises:
        ShardError: Naming ``shard``: the tar is truncated or corrupt (samples already yielded stay
            yielded), or a member name is bad and ``on_bad_member`` is None.
    """
    on_skipped = None if on_bad_member is None else _not_a_file(on_bad_member)
    members = iter_tar(stream, shard, on_skipped=on_skipped, strict_end=strict_end)
    yield from group_samples(split_members(members, shard, extensions=extensions, on_bad_member=on_bad_member), shard)


def read_shard(
    location: Location, path: str, *, on_bad_member: Callable[[str], None] | None = None
) -> Iterator[ShardSample]:
    """``iter_samples`` of the shard at ``path`` on ``location`` (any extension, strict end), named by its file name."""
    shard = posixpath.basename(path)
    try:
        with location.fs.open_input_stream(path, compression=None) as stream:
            yield from iter_samples(stream, shard, on_bad_member=on_bad_member, strict_end=True)
    except OSError as err:
        raise ShardError(shard, f"unreadable or truncated tar ({err})") from err


def _not_a_file(report: Callable[[str], None]) -> Callable[[str], None]:
    return lambda name: report(f"member {name!r} is not a regular file")
