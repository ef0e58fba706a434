"""``defectsynth.storage.stream``: decoding, manifest filters, rank x worker splits, other readers, safety, tars."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
import webdataset
from torch.utils.data import DataLoader

from defectsynth.storage import stream
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.errors import ShardError
from defectsynth.storage.fs import resolve
from defectsynth.storage.keys import derive_key
from defectsynth.storage.manifest import read_manifest
from defectsynth.storage.sample import GeneratorInfo, QualityCheck, Sample, SampleMetadata, decode_png, encode_sample
from defectsynth.storage.streaming import (
    collate,
    dataset_urls,
    decode_sample,
    resolve_rank,
)
from defectsynth.storage.tar_reader import READ_BUFFER, iter_tar

HEIGHT, WIDTH = 24, 32  # not square, so a transposed image would not fit
PRODUCTS, METHODS, TYPES = ("wood", "fabric"), ("perlin", "cutpaste"), ("crack", "hole")
COUNT, MAXCOUNT = 48, 5  # 12 samples per product-method series, 3 shards each: 12 shards


def make_sample(index: int) -> Sample:
    """Sample ``index``: product, method, type, intensity, QC and conditioning mask vary independently."""
    rng = np.random.default_rng(index)
    product, method = PRODUCTS[index % 2], METHODS[index // 2 % 2]
    defect_type = TYPES[index // 4 % 2]
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    y, x = rng.integers(0, HEIGHT - 6), rng.integers(0, WIDTH - 6)
    mask[y : y + 5, x : x + 6] = True
    metadata = SampleMetadata(
        key=derive_key(product, method, defect_type, {"index": index}),
        product=product,
        defect_type=defect_type,
        intensity=None if index % 5 == 0 else round(0.1 * (index % 10), 2),
        generator=GeneratorInfo(method=method),
        qc=QualityCheck(scores={"ssim": 0.5}, passed=index % 3 != 0),
        seed=index,
    )
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    cond = np.roll(mask, 2, axis=1) if index // 3 % 2 else None
    return Sample(image=image, mask=mask, metadata=metadata, cond_mask=cond)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Sample]]:
    """A dataset of COUNT samples in 12 shards, and the samples by key."""
    root = tmp_path_factory.mktemp("stream") / "dataset"
    samples = {sample.key: sample for sample in map(make_sample, range(COUNT))}
    with DatasetWriter(root, maxcount=MAXCOUNT) as writer:
        for sample in samples.values():
            writer.write(sample)
    assert len(dataset_urls(root)) == 12
    return root, samples


def keys_of(items: Any) -> list[str]:
    return [item["key"] if "key" in item else item["__key__"] for item in items]


def metadata_of(sample: Sample) -> dict[str, Any]:
    return json.loads(encode_sample(sample).members["json"])


# 1. decoding


def test_decoded_samples_equal_what_was_written(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = dataset
    items = list(stream(root))
    assert sorted(keys_of(items)) == sorted(samples)
    for item in items:
        sample = samples[item["key"]]
        image, mask = item["image"], item["mask"]
        assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
        assert mask.shape == (1, HEIGHT, WIDTH) and mask.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        expected = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
        assert torch.equal(image, expected)
        assert torch.equal(mask[0].bool(), torch.from_numpy(sample.mask))
        assert item["metadata"] == metadata_of(sample)
        if sample.cond_mask is None:
            assert "cond_mask" not in item
        else:
            assert torch.equal(item["cond_mask"][0].bool(), torch.from_numpy(sample.cond_mask))
    assert Counter("cond_mask" in item for item in items) == {True: COUNT // 2, False: COUNT // 2}


def test_collate_batches_tensors_and_keeps_metadata(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = dataset
    batch = next(iter(DataLoader(stream(root), batch_size=6, collate_fn=collate)))
    assert batch["image"].shape == (6, 3, HEIGHT, WIDTH) and batch["mask"].shape == (6, 1, HEIGHT, WIDTH)
    assert batch["cond_mask"].shape == (6, 1, HEIGHT, WIDTH) and batch["has_cond"].dtype == torch.bool
    for i, key in enumerate(batch["key"]):
        assert batch["has_cond"][i].item() == (samples[key].cond_mask is not None)
        assert batch["cond_mask"][i].any().item() == batch["has_cond"][i].item()
        assert batch["metadata"][i]["key"] == key
    # default_collate cannot batch the metadata: it holds None fields.
    with pytest.raises(TypeError):
        next(iter(DataLoader(stream(root, products="wood", methods="perlin"), batch_size=6)))


def test_raw_members_with_decode_false(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = dataset
    for item in stream(root, decode=False):
        members = encode_sample(samples[item["__key__"]]).members
        assert {k: v for k, v in item.items() if not k.startswith("__")}.keys() == members.keys()
        assert item["png"] == members["png"] and item["mask.png"] == members["mask.png"]


# 2. manifest filters


@pytest.mark.parametrize(
    ("filters", "wanted"),
    [
        ({"defect_types": ["crack"]}, lambda m: m["defect_type"] == "crack"),
        ({"products": "wood"}, lambda m: m["product"] == "wood"),
        ({"methods": ["cutpaste"]}, lambda m: m["generator"]["method"] == "cutpaste"),
        ({"qc_passed": True}, lambda m: m["qc"]["passed"]),
        ({"qc_passed": False}, lambda m: not m["qc"]["passed"]),
        ({"intensity": (0.2, 0.6)}, lambda m: m["intensity"] is not None and 0.2 <= m["intensity"] <= 0.6),
        ({"intensity": (None, 0.3)}, lambda m: m["intensity"] is not None and m["intensity"] <= 0.3),
        (
            {"products": ["fabric"], "defect_types": "hole", "qc_passed": True, "intensity": (0.0, 1.0)},
            lambda m: (
                m["product"] == "fabric"
                and m["defect_type"] == "hole"
                and m["qc"]["passed"]
                and m["intensity"] is not None
            ),
        ),
        ({"products": ["nothing"]}, lambda m: False),
    ],
)
def test_filters_select_exactly_the_matching_samples(
    dataset: tuple[Path, dict[str, Sample]], filters: dict[str, Any], wanted: Any
) -> None:
    root, samples = dataset
    expected = sorted(key for key, sample in samples.items() if wanted(metadata_of(sample)))
    data = stream(root, decode=False, **filters)
    assert sorted(keys_of(data)) == expected
    assert sorted(data.keys) == expected
    shard_of = {item["__key__"]: item["__url__"] for item in stream(root, decode=False)}
    assert sorted(data.shards) == sorted({shard_of[key] for key in expected})


def test_bad_arguments_are_refused(dataset: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, _ = dataset
    with pytest.raises(ValueError, match="low > high"):
        stream(root, intensity=(0.6, 0.2))
    with pytest.raises(ValueError, match="shuffle"):
        stream(root, shuffle=-1)
    with pytest.raises(ValueError, match="together"):
        stream(root, rank=1)
    with pytest.raises(ValueError, match="not in"):
        stream(root, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        stream(tmp_path)


# 3. rank x worker splitting and shuffling


def loader_keys(data: Any, workers: int = 2) -> list[str]:
    loader = DataLoader(data, batch_size=4, num_workers=workers, collate_fn=collate)
    return [key for batch in loader for key in batch["key"]]


def collate_with_worker(batch: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Runs in the DataLoader worker, so it can say which one batched these keys."""
    return torch.utils.data.get_worker_info().id, [item["key"] for item in batch]


def test_ranks_and_workers_see_every_sample_once(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = dataset
    shard_of = {item["__key__"]: item["__url__"] for item in stream(root, decode=False)}
    keys_by_pair: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        loader = DataLoader(
            stream(root, rank=rank, world_size=2), batch_size=4, num_workers=2, collate_fn=collate_with_worker
        )
        for worker, keys in loader:
            keys_by_pair.setdefault((rank, worker), []).extend(keys)
    seen = Counter(key for keys in keys_by_pair.values() for key in keys)
    assert seen.keys() == samples.keys() and set(seen.values()) == {1}
    # 12 shards over 2 ranks x 2 workers: each pair reads 3 whole shards
    shards_by_pair = {pair: {shard_of[key] for key in keys} for pair, keys in keys_by_pair.items()}
    assert sorted(shards_by_pair) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(shards) == 3 for shards in shards_by_pair.values())
    for pair, shards in shards_by_pair.items():
        whole = [key for key, shard in shard_of.items() if shard in shards]
        assert sorted(keys_by_pair[pair]) == sorted(whole)
    filtered = [loader_keys(stream(root, qc_passed=True, rank=r, world_size=2, shuffle=8, seed=1)) for r in range(2)]
    assert sorted(key for keys in filtered for key in keys) == sorted(stream(root, qc_passed=True).keys)


def test_rank_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (1, 3)
    assert resolve_rank(0, 2) == (0, 2)


def test_shuffle_is_reproducible(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = dataset
    plain = keys_of(stream(root, decode=False))
    first = keys_of(stream(root, decode=False, shuffle=16, seed=3))
    assert first == keys_of(stream(root, decode=False, shuffle=16, seed=3))
    assert sorted(first) == sorted(plain) and first != plain
    assert first != keys_of(stream(root, decode=False, shuffle=16, seed=4))
    shuffled = stream(root, decode=False, shuffle=16, seed=3)
    shuffled.set_epoch(1)
    assert keys_of(shuffled) != first
    with_workers = loader_keys(stream(root, shuffle=16, seed=3))
    assert with_workers == loader_keys(stream(root, shuffle=16, seed=3))
    assert sorted(with_workers) == sorted(samples)


# 4. the same samples through webdataset and Ray Data


def test_webdataset_reads_the_same_samples(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, _ = dataset
    ours = {item["__key__"]: item for item in stream(root, decode=False)}
    theirs = {item["__key__"]: item for item in webdataset.WebDataset(dataset_urls(root), shardshuffle=False)}
    assert theirs.keys() == ours.keys()
    for key in sorted(ours)[:5]:
        for member in ("png", "mask.png", "json"):
            assert theirs[key][member] == ours[key][member]
    # webdataset's own .decode() would unpickle .pyd members; map our decoder instead
    decoded = webdataset.WebDataset(dataset_urls(root), shardshuffle=False).map(decode_sample)
    by_key = {item["key"]: item for item in stream(root)}
    for item in itertools.islice(decoded, 5):
        assert item.keys() - {"__key__"} == by_key[item["key"]].keys()
        assert torch.equal(item["image"], by_key[item["key"]]["image"])


@pytest.mark.integration
def test_ray_data_reads_the_same_samples(dataset: tuple[Path, dict[str, Sample]]) -> None:
    ray = pytest.importorskip("ray")
    root, samples = dataset
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rows = ray.data.read_webdataset(dataset_urls(root), decoder=None).take_all()
    finally:
        ray.shutdown()
    by_key = {row["__key__"]: row for row in rows}
    assert len(rows) == len(by_key) and by_key.keys() == samples.keys()
    ours = {item["key"]: item for item in stream(root)}
    for key in sorted(by_key)[:5]:
        row = by_key[key]
        assert isinstance(row["png"], bytes)
        image = np.array(decode_png(row["png"]))
        assert np.array_equal(image, samples[key].image)
        assert torch.equal(ours[key]["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        assert np.array_equal(decode_png(row["mask.png"]) > 0, samples[key].mask)
        assert json.loads(row["json"]) == ours[key]["metadata"]


def _write_shard_keys(config: dict) -> None:
    """Ray Train worker loop: read this worker's share of the dataset and write its keys to ``<out>/rank<k>``."""
    import ray.train

    keys = [row["__key__"] for row in ray.train.get_dataset_shard("train").iter_rows()]
    rank = ray.train.get_context().get_world_rank()
    (Path(config["out"]) / f"rank{rank}").write_text("\n".join(keys))


@pytest.mark.integration
def test_a_ray_train_job_streams_the_shards_through_read_webdataset(
    dataset: tuple[Path, dict[str, Sample]], tmp_path: Path
) -> None:
    """A training cluster's way in: ``ray.data.read_webdataset`` handed to a TorchTrainer, split over 2 workers."""
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from helpers.ray_cluster import local_cluster

    root, samples = dataset
    with local_cluster():  # tests/ on the workers' path: the loop lives in this module
        TorchTrainer(
            _write_shard_keys,
            train_loop_config={"out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),  # a CPU left for reading
            datasets={"train": ray.data.read_webdataset(dataset_urls(root), decoder=None)},
            run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="read-shards"),
        ).fit()
    shares = [set(filter(None, (tmp_path / f"rank{k}").read_text().split("\n"))) for k in range(2)]
    assert all(shares) and not shares[0] & shares[1], "each worker reads its own share"
    assert shares[0] | shares[1] == samples.keys()


# 5. incomplete shards


class RecordingFileSystem(fsspec.implementations.local.LocalFileSystem):
    """Local files, remembering every path opened."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[str] = []

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self.opened.append(path)
        return super()._open(path, mode=mode, **kwargs)


def test_partial_shards_are_never_read(dataset: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, samples = dataset
    copy = tmp_path / "copy"
    with DatasetWriter(copy, maxcount=MAXCOUNT) as writer:
        for sample in samples.values():
            writer.write(sample)
    partial = copy / "shards" / "wood-perlin-000009.tar.partial"
    partial.write_bytes(b"not a tar at all" * 100)
    recording = RecordingFileSystem()
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(recording))
    assert sorted(keys_of(stream(str(copy), filesystem=filesystem, decode=False))) == sorted(samples)
    assert any(path.endswith(".tar") for path in recording.opened)
    assert not any(path.endswith(".partial") for path in recording.opened)
    assert not any(url.endswith(".partial") for url in dataset_urls(copy))
    assert len(list(webdataset.WebDataset(dataset_urls(copy), shardshuffle=False))) == COUNT


# 6. unsafe or unknown members


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.png", "refused"),
        ("/abs.png", "refused"),
        ("sub/evil.png", "refused"),
        ("noextension", "refused"),
        ("a\x00b.png", "refused"),
        ("{key}.pyd", "unknown extension"),
        ("{key}.npy", "unknown extension"),
    ],
)
@pytest.mark.parametrize("decode", [True, False])
def test_unsafe_or_unknown_members_raise(tmp_path: Path, name: str, problem: str, decode: bool) -> None:
    root = tmp_path / "dataset"
    with DatasetWriter(root, maxcount=2) as writer:
        for index in range(4):
            writer.write(make_sample(index))
    shard = next(path for path in sorted((root / "shards").iterdir()) if path.name.endswith(".tar"))
    with tarfile.open(shard) as tar:
        members = {info.name: tar.extractfile(info).read() for info in tar}
    key = next(iter(members)).split(".")[0]
    members[name.format(key=key)] = b"\x80\x04payload"
    write_tar(shard, members)
    with pytest.raises(ShardError, match=problem) as caught:
        list(stream(root, decode=decode))
    assert shard.name in str(caught.value)


# 7. the tar reader: other tar formats, corrupt and truncated shards


def copy_dataset(dataset: tuple[Path, dict[str, Sample]], tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(dataset[0], root)
    return root


def first_shard(root: Path) -> Path:
    return min(path for path in (root / "shards").iterdir() if path.name.endswith(".tar"))


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar]


def raw_items(root: Path) -> dict[str, dict[str, Any]]:
    return {item["__key__"]: {k: v for k, v in item.items() if k != "__url__"} for item in stream(root, decode=False)}


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_gnu_and_pax_tars_stream_the_same_samples(
    dataset: tuple[Path, dict[str, Sample]], tmp_path: Path, tar_format: int
) -> None:
    root = copy_dataset(dataset, tmp_path)
    expected = raw_items(root)
    for shard in sorted((root / "shards").glob("*.tar")):
        members = tar_members(shard)
        with tarfile.open(shard, "w", format=tar_format) as tar:
            for index, (name, data) in enumerate(members):
                info = tarfile.TarInfo(name if tar_format == tarfile.GNU_FORMAT or index % 3 else "renamed.txt")
                info.size, info.mtime = len(data), 1_700_000_000.5 + index
                if tar_format == tarfile.PAX_FORMAT:
                    info.uname = "günther"  # not ASCII: a pax header per member
                    info.pax_headers = {"comment": "x" * (index * 97 % 700)}
                    if index % 3 == 0:
                        info.pax_headers["path"] = name  # the pax path wins over the header's name
                tar.addfile(info, io.BytesIO(data))
        if tar_format == tarfile.PAX_FORMAT:
            raw = shard.read_bytes()
            assert b"renamed.txt" in raw and "günther".encode() in raw and b"PaxHeader" in raw
            assert [name for name, _ in tar_members(shard)] == [name for name, _ in members]
    assert raw_items(root) == expected


def build_tar(tar_format: int, members: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A tar of ``members`` with a directory, a symlink and a hard link between them; and its regular files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for index, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if index == 1:
                for kind, link in ((tarfile.DIRTYPE, ""), (tarfile.SYMTYPE, "../etc/passwd"), (tarfile.LNKTYPE, name)):
                    special = tarfile.TarInfo(f"link{kind.decode()}.png")
                    special.type, special.linkname = kind, link
                    tar.addfile(special)
    return buffer.getvalue(), members


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("block", [512, 1536, 4096, READ_BUFFER])
def test_iter_tar_reads_what_tarfile_wrote(tar_format: int, block: int) -> None:
    rng = np.random.default_rng(tar_format)
    sizes = [0, 1, 511, 512, 513, 1000, 5000, 70_000, 3 * 4096 + 7]
    members = [(f"key{index}.png", rng.bytes(size)) for index, size in enumerate(sizes)]
    long_name = "a" * 90 + "/" + "b" * 90 + ".json"  # ustar prefix, GNU long name or pax path by format
    members.append((long_name if tar_format != tarfile.PAX_FORMAT else "ü" + long_name, b"{}"))
    raw, expected = build_tar(tar_format, members)
    assert list(iter_tar(pa.BufferReader(raw), "mem.tar", block=block)) == expected
    assert list(iter_tar(io.BytesIO(raw), "mem.tar", block=block)) == expected


def test_iter_tar_takes_pax_size_and_signed_checksums() -> None:
    data = b"0123456789" * 100
    pax = tarfile.TarInfo("k.png")
    pax.size, pax.pax_headers = len(data), {"size": str(len(data))}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(pax, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    regular = raw.index(b"k.png")  # the member header after the pax header: zero its size field
    raw[regular + 124 : regular + 136] = b"00000000000\0"
    checksum = sum(raw[regular : regular + 148]) + 256 + sum(raw[regular + 156 : regular + 512])
    raw[regular + 148 : regular + 156] = b"%06o\0 " % checksum
    assert list(iter_tar(io.BytesIO(bytes(raw)), "t")) == [("k.png", data)]
    # some old tars summed signed bytes: a header with a byte >= 0x80 has two valid checksums
    plain = bytearray(build_tar(tarfile.USTAR_FORMAT, [("k.png", b"x")])[0])
    plain[265:269] = "ü".encode() + b"\0\0"  # the uname field
    signed = (
        sum(b - 256 if b >= 128 else b for b in plain[:148])
        + 256
        + sum(b - 256 if b >= 128 else b for b in plain[156:512])
    )
    plain[148:156] = b"%06o\0 " % signed
    assert list(iter_tar(io.BytesIO(bytes(plain)), "t")) == [("k.png", b"x")]


def corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: corrupt(p, 1, b"X"), "bad checksum"),  # a member name, under the checksum
        (lambda p: corrupt(p, 124, b"7"), "bad checksum"),  # a size digit
        (lambda p: corrupt(p, 148, b"1"), "bad checksum"),  # the checksum itself
        (lambda p: p.write_bytes(b"not a tar at all" * 100), "not a tar header"),
        (lambda p: p.write_bytes(p.read_bytes()[:700]), "truncated"),  # inside the first member or its padding
        (lambda p: p.write_bytes(cut_inside_last_member(p)), "truncated: the member at byte"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), r"header at byte 0 is cut short \(100 of 512"),
        (lambda p: p.write_bytes(b""), "ends at byte 0 without its end-of-archive blocks"),
        (lambda p: p.write_bytes(cut_at_member_end(p)), "without its end-of-archive blocks"),
        (lambda p: p.write_bytes(cut_at_member_end(p) + bytes(512) + cut_at_member_end(p)), "lone zero block"),
    ],
)
@pytest.mark.parametrize("decode", [True, False])
def test_corrupt_or_truncated_shards_raise(
    dataset: tuple[Path, dict[str, Sample]], tmp_path: Path, damage: Any, problem: str, decode: bool
) -> None:
    root = copy_dataset(dataset, tmp_path)
    shard = first_shard(root)
    damage(shard)
    with pytest.raises(ShardError, match=problem) as caught:
        list(stream(root, decode=decode))
    assert shard.name in str(caught.value) and caught.value.shard.endswith(shard.name)


def cut_at_member_end(path: Path) -> bytes:
    """The shard up to the end of its members: its end-of-archive blocks cut off."""
    with tarfile.open(path) as tar:
        *_, last = tar.getmembers()
    return path.read_bytes()[: last.offset_data + (last.size + 511) // 512 * 512]


def cut_inside_last_member(path: Path) -> bytes:
    """The shard cut in the middle of its last member's data."""
    with tarfile.open(path) as tar:
        *_, last = tar.getmembers()
    return path.read_bytes()[: last.offset_data + last.size // 2]


def test_truncated_shards_raise_through_a_dataloader(dataset: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root = copy_dataset(dataset, tmp_path)
    shard = first_shard(root)
    shard.write_bytes(cut_inside_last_member(shard))
    with pytest.raises(RuntimeError, match=f"{shard.name}.*truncated"):
        list(DataLoader(stream(root), batch_size=4, num_workers=1, collate_fn=collate))


def test_sparse_and_duplicate_members_raise(dataset: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root = copy_dataset(dataset, tmp_path)
    shard = first_shard(root)
    members = tar_members(shard)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [*members[:2], members[1], *members[2:]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=f"member '{members[1][0]}' appears twice"):
        list(stream(root, decode=False))
    write_tar(shard, dict(members))
    raw = bytearray(shard.read_bytes())
    raw[156:157] = b"S"  # GNU sparse
    raw[148:156] = b"%06o\0 " % (sum(raw[:148]) + 256 + sum(raw[156:512]))
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="sparse"):
        list(stream(root, decode=False))


def test_manifest_loads_only_the_columns_asked_for(dataset: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = dataset
    table = read_manifest(resolve(root), columns=["key", "shard"])
    assert table.column_names == ["key", "shard"] and sorted(table.column("key").to_pylist()) == sorted(samples)
    assert "seed" in read_manifest(resolve(root)).column_names
