"""The one shard reader: members named and grouped by key, bad members reported or refused."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from defectsynth.storage.errors import ShardError
from defectsynth.storage.fs import resolve
from defectsynth.storage.shard_index import index_shard
from defectsynth.storage.shard_reader import ShardSample, group_samples, iter_samples, read_shard, split_members


def tar_bytes(members: list[tuple[str, bytes]], *, link_after: int | None = None) -> bytes:
    """A USTAR tar of ``members``, with a symlink after the ``link_after``-th when given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if index == link_after:
                link = tarfile.TarInfo("link.png")
                link.type, link.linkname = tarfile.SYMTYPE, "../etc/passwd"
                tar.addfile(link)
    return buffer.getvalue()


def test_group_samples_groups_consecutive_members_by_key() -> None:
    members = [("a", "png", b"1"), ("a", "json", b"2"), ("b", "png", b"3"), ("a", "png", b"4")]
    assert list(group_samples(members, "s.tar")) == [
        ShardSample("a", "s.tar", {"png": b"1", "json": b"2"}),
        ShardSample("b", "s.tar", {"png": b"3"}),
        ShardSample("a", "s.tar", {"png": b"4"}),  # not consecutive: another sample, never merged
    ]
    assert list(group_samples([], "s.tar")) == []


def test_group_samples_keeps_the_first_of_a_repeated_member() -> None:
    (sample,) = group_samples([("a", "png", b"1"), ("a", "png", b"2")], "s.tar")
    assert sample.members == {"png": b"1"} and sample.problems == ["member 'a.png' appears twice"]
    with pytest.raises(ShardError, match=r"s\.tar: member 'a\.png' appears twice in sample 'a'"):
        sample.require_whole()


def test_split_members_checks_names_and_extensions() -> None:
    members = [("a.png", b"1"), ("a.mask.png", b"2"), ("../x.png", b"3"), ("b.npy", b"4")]
    bad: list[str] = []
    assert list(split_members(members, "s.tar", on_bad_member=bad.append)) == [
        ("a", "png", b"1"),
        ("a", "mask.png", b"2"),
        ("b", "npy", b"4"),
    ]
    assert len(bad) == 1 and "'../x.png' refused" in bad[0]
    with pytest.raises(ShardError, match="unknown extension .npy"):
        list(split_members(members[-1:], "s.tar", extensions={"png"}))
    with pytest.raises(ShardError, match=r"s\.tar: tar member name '\.\./x\.png' refused"):
        list(split_members(members, "s.tar"))


def test_iter_samples_skips_links_or_reports_them() -> None:
    raw = tar_bytes([("a.png", b"1"), ("a.json", b"{}"), ("b.png", b"2")], link_after=0)
    expected = [ShardSample("a", "s.tar", {"png": b"1", "json": b"{}"}), ShardSample("b", "s.tar", {"png": b"2"})]
    assert list(iter_samples(io.BytesIO(raw), "s.tar")) == expected
    bad: list[str] = []
    assert list(iter_samples(io.BytesIO(raw), "s.tar", on_bad_member=bad.append)) == expected
    assert bad == ["member 'link.png' is not a regular file"]


def test_strict_end_refuses_a_lone_zero_block_at_the_end() -> None:
    raw = tar_bytes([("a.png", b"1")])
    one_block = raw[: 512 + 512 + 512]  # header, data, one zero block
    assert [s.key for s in iter_samples(io.BytesIO(one_block), "s.tar")] == ["a"]
    with pytest.raises(ShardError, match="truncated: the tar ends at byte 1536, after one end-of-archive block"):
        list(iter_samples(io.BytesIO(one_block), "s.tar", strict_end=True))
    assert [s.key for s in iter_samples(io.BytesIO(raw), "s.tar", strict_end=True)] == ["a"]


def test_iter_samples_groups_every_member_of_each_sample() -> None:
    members = [(f"{key}.{ext}", bytes([i]) * 700) for i, key in enumerate("abc") for ext in ("png", "mask.png", "json")]
    raw = tar_bytes(members)
    samples = list(iter_samples(io.BytesIO(raw), "s.tar"))
    assert samples == list(iter_samples(io.BytesIO(raw), "s.tar", strict_end=True))
    assert [s.key for s in samples] == ["a", "b", "c"]
    assert all(list(s.members) == ["png", "mask.png", "json"] for s in samples)
    assert samples[1].members["mask.png"] == bytes([1]) * 700


def test_a_truncated_member_is_named_with_its_shard() -> None:
    raw = tar_bytes([("a.png", b"1"), ("b.png", b"x" * 2000)])
    cut = raw[: 3 * 512 + 1000]  # a's header and data, b's header, half of b's data
    with pytest.raises(ShardError, match=r"s\.tar: truncated: the member at byte 1024 \('b\.png'\) holds 2000 bytes"):
        list(iter_samples(io.BytesIO(cut), "s.tar"))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{not json", r"s\.tar: a\.json is not valid JSON \(Expecting"),
        (b'{"x": "\xff"}', r"s\.tar: a\.json is not valid JSON \('utf-8' codec can't decode"),
        (b"[1, 2]", r"s\.tar: a\.json must hold a JSON object"),
    ],
)
def test_metadata_names_the_shard_and_member_it_cannot_parse(data: bytes, problem: str) -> None:
    assert ShardSample("a", "s.tar", {"json": b'{"x": 1}'}).metadata() == {"x": 1}
    assert ShardSample("a", "s.tar", {"png": b""}).metadata() is None
    with pytest.raises(ShardError, match=problem):
        ShardSample("a", "s.tar", {"json": data}).metadata()


def test_index_and_read_shard_name_the_shard_file(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    path = shards / "wood-000000.tar"
    path.write_bytes(tar_bytes([("a.png", b"1"), ("a.json", b'{"x": "\xff"}')]))
    location = resolve(tmp_path)
    with pytest.raises(ShardError, match=r"^wood-000000\.tar: a\.json is not valid JSON") as caught:
        index_shard(location, str(path))
    assert caught.value.shard == "wood-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ShardError, match=r"^wood-000000\.tar: truncated"):
        list(read_shard(location, str(path)))
