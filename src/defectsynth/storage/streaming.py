"""Streaming a dataset into PyTorch: ``stream(uri, ...)``, a webdataset pipeline over the complete shards.

The manifest picks the samples first, so only shards holding a matching sample are opened. Each
iteration runs a ``webdataset.DataPipeline`` with these stages:

1. the shard list (sorted; shuffled with ``seed`` and the epoch when ``shuffle`` is on),
2. split by rank: rank ``r`` of ``n`` takes shards ``r, r+n, ...``,
3. split by DataLoader worker the same way (``torch.utils.data.get_worker_info``),
4. open each shard through the dataset's pyarrow filesystem (local paths, ``s3://``, ...),
5. read it with ``iter_tar``, a small USTAR/POSIX tar reader (1 MiB reads, header checksums verified,
   pax and GNU long names applied), check every member name (no ``..``, ``/`` or NUL) and extension
   (``png``, ``mask.png``, ``cond.png``, ``json``), and group consecutive members by key,
6. keep only the keys whose manifest rows match the filters,
7. ``webdataset.shuffle`` with a buffer of ``shuffle`` samples, seeded by seed, epoch, rank and worker,
8. decode PNG and JSON (never pickles: no webdataset autodecoder), or yield raw bytes.

Splitting is by whole shards: every sample is seen exactly once across all (rank, worker) pairs,
but a dataset needs at least ``world_size * num_workers`` shards to keep every worker busy, and
ranks may get different sample counts (shards hold up to ``maxcount`` samples each). The rank is
fixed when ``stream`` is called: explicit ``rank``/``world_size``, else ``torch.distributed`` when
initialised, else the ``RANK``/``WORLD_SIZE`` environment variables, else rank 0 of 1.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from defectsynth.storage.streaming import collate, stream
    >>> data = stream("runs/demo/datasets/perlin", defect_types="crack", qc_passed=True, shuffle=256)  # doctest: +SKIP
    >>> loader = DataLoader(data, batch_size=16, num_workers=4, collate_fn=collate)  # doctest: +SKIP
    >>> batch = next(iter(loader))  # doctest: +SKIP

``batch`` holds ``image`` (16, 3, H, W), ``mask`` and ``cond_mask`` (16, 1, H, W), ``has_cond``,
``key`` and ``metadata`` lists. Tar members that are not plain files (links, directories) are
skipped, never followed. A truncated or corrupt tar raises ``ShardError`` naming the shard; an
error in a DataLoader worker reaches the caller as a RuntimeError carrying the ``ShardError`` message.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from defectsynth.storage.errors import ShardError
from defectsynth.storage.fs import Location, resolve
from defectsynth.storage.manifest import manifest_shard_paths, read_manifest
from defectsynth.storage.sample import COND, IMAGE, MASK, META, decode_members
from defectsynth.storage.shard_index import complete_shards
from defectsynth.storage.shard_reader import iter_samples

logger = logging.getLogger(__name__)

MEMBERS = frozenset({IMAGE, MASK, COND, META})
_SCHEMES = {"gcs": "gs"}  # pyarrow filesystem type_name -> URI scheme, where they differ

Sample = dict[str, Any]


class ShardStream(IterableDataset):
    """An ``IterableDataset`` over the selected samples of some shards; see the module docstring.

    Build it with ``stream``. Each ``iter()`` runs ``pipeline()``, a fresh ``webdataset.DataPipeline``.

    Attributes:
        shards: Paths (on ``location.fs``) of the shards holding selected samples, all ranks together.
        keys: The selected sample keys, all ranks together: ``len(keys)`` samples per epoch in all.
        rank: This process's rank, fixed when built.
        world_size: The number of ranks.
    """

    def __init__(
        self,
        location: Location,
        shards: Sequence[str],
        keys: frozenset[str],
        *,
        shuffle: int,
        seed: int,
        decode: bool,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__()
        self.location, self.shards, self.keys = location, list(shards), keys
        self.shuffle, self.seed, self.decode = shuffle, seed, decode
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another epoch, as ``DistributedSampler.set_epoch`` does (only with ``shuffle``).

        Call it before iterating; DataLoader workers see it unless ``persistent_workers=True``.
        """
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """All shards in this epoch's order, the same on every rank (split happens after)."""
        shards = sorted(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        return shards

    def pipeline(self) -> wds.DataPipeline:
        """This epoch's pipeline; extend it with ``.compose(...)`` like any webdataset pipeline."""
        stages: list[Any] = [
            functools.partial(iter, self.shard_order()),  # a bare list would be taken as a list of stages
            functools.partial(split_by_rank, rank=self.rank, world_size=self.world_size),
            split_by_worker,
            functools.partial(open_shards, filesystem=self.location.fs),
            expand_shards,
            functools.partial(select_keys, keys=self.keys),
        ]
        if self.shuffle:
            seed = (self.seed, self.epoch, self.rank)
            stages.append(functools.partial(shuffle_samples, bufsize=self.shuffle, seed=seed))
        if self.decode:
            stages.append(decode_samples)
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.pipeline())


def stream(
    source: str | Path,
    *,
    products: str | Iterable[str] | None = None,
    methods: str | Iterable[str] | None = None,
    defect_types: str | Iterable[str] | None = None,
    intensity: tuple[float | None, float | None] | None = None,
    qc_passed: bool | None = None,
    shuffle: int = 0,
    seed: int = 0,
    decode: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> ShardStream:
    """Stream a dataset's samples, filtered through its manifest, split over ranks and workers.

    Args:
        source: The dataset directory or URI (``s3://bucket/prefix?endpoint_override=...``).
        products: Keep only these products (a name or names).
        methods: Keep only samples of these generator methods.
        defect_types: Keep only these defect types.
        intensity: Keep intensities in ``(low, high)``, both inclusive, either end ``None`` for open;
            samples without an intensity are dropped whenever a range is given.
        qc_passed: Keep only samples that passed (True) or failed (False) the quality checks.
        shuffle: Shuffle-buffer size in samples; 0 keeps shard order. Shard order is shuffled too.
        seed: Seed of both shuffles; the same seed, epoch and splitting give the same order.
        decode: Yield tensors (see ``decode_sample``); False yields raw member bytes
            ``{"__key__", "__url__", "png", "mask.png", "json", ...}``.
        rank: This process's rank; give it with ``world_size`` or neither (see the module docstring).
        world_size: The number of ranks sharing the dataset.
        filesystem: A pyarrow filesystem ``source`` is a path on, instead of resolving it.

    Returns:
        A ``torch.utils.data.IterableDataset``; batch it with ``collate``.

    Raises:
        FileNotFoundError: When the dataset has no manifest.
        ValueError: On bad filter, rank or shuffle arguments, or a manifest naming a missing shard.
    """
    if shuffle < 0:
        msg = f"shuffle must be a buffer size >= 0, got {shuffle}"
        raise ValueError(msg)
    rank, world_size = resolve_rank(rank, world_size)
    location = resolve(source, filesystem)
    filters = {"product": products, "method": methods, "defect_type": defect_types}
    filters |= {"intensity": intensity, "qc_passed": qc_passed}
    columns = ["key", "shard", *(column for column, value in filters.items() if value is not None)]
    rows = filter_manifest(
        read_manifest(location, columns=columns),
        products=products,
        methods=methods,
        defect_types=defect_types,
        intensity=intensity,
        qc_passed=qc_passed,
    )
    shards = sorted(manifest_shard_paths(location, pc.unique(rows.column("shard")).to_pylist()).values())
    keys = frozenset(rows.column("key").to_pylist())
    if not keys:
        logger.warning("dataset %s: no sample matches the filters", location.uri)
    logger.info(
        "dataset %s: %d sample(s) in %d shard(s), rank %d of %d", location.uri, len(keys), len(shards), rank, world_size
    )
    return ShardStream(
        location, shards, keys, shuffle=shuffle, seed=seed, decode=decode, rank=rank, world_size=world_size
    )


def dataset_urls(source: str | Path, *, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """The complete shards of a dataset, for other readers (``webdataset.WebDataset``, Ray Data).

    Local datasets give absolute file paths; remote ones ``<scheme>://<path>`` without the query
    string, so pass ``filesystem=resolve(source).fs`` to readers that need endpoint options.
    ``*.tar.partial`` files (incomplete shards) are never listed.

    Args:
        source: The dataset directory or URI.
        filesystem: A pyarrow filesystem ``source`` is a path on; paths are then returned as they are.

    Returns:
        The shard paths or URLs, sorted.
    """
    location = resolve(source, filesystem)
    paths = complete_shards(location)
    scheme = location.fs.type_name
    if filesystem is not None or scheme == "local":
        return paths
    return [f"{_SCHEMES.get(scheme, scheme)}://{path}" for path in paths]


def filter_manifest(
    table: pa.Table,
    *,
    products: str | Iterable[str] | None = None,
    methods: str | Iterable[str] | None = None,
    defect_types: str | Iterable[str] | None = None,
    intensity: tuple[float | None, float | None] | None = None,
    qc_passed: bool | None = None,
) -> pa.Table:
    """The manifest rows matching every given filter (arguments as in ``stream``)."""
    conditions = [
        pc.field(column).isin(_names(values))
        for column, values in (("product", products), ("method", methods), ("defect_type", defect_types))
        if values is not None
    ]
    if intensity is not None:
        conditions.extend(_intensity_conditions(intensity))
    if qc_passed is not None:
        conditions.append(pc.field("qc_passed") == bool(qc_passed))
    if not conditions:
        return table
    return table.filter(functools.reduce(operator.and_, conditions))


def _names(values: str | Iterable[str]) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


def _intensity_conditions(intensity: tuple[float | None, float | None]) -> list[pc.Expression]:
    low, high = intensity
    if low is not None and high is not None and low > high:
        msg = f"intensity range ({low}, {high}) is empty: low > high"
        raise ValueError(msg)
    conditions = [pc.field("intensity").is_valid()]
    if low is not None:
        conditions.append(pc.field("intensity") >= float(low))
    if high is not None:
        conditions.append(pc.field("intensity") <= float(high))
    return conditions


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit, else torch.distributed, else RANK/WORLD_SIZE, else (0, 1)."""
    if (rank is None) != (world_size is None):
        msg = f"give rank and world_size together or neither, got rank={rank}, world_size={world_size}"
        raise ValueError(msg)
    if rank is None or world_size is None:
        rank, world_size = _distributed_rank() or _environment_rank() or (0, 1)
    if world_size < 1 or not 0 <= rank < world_size:
        msg = f"rank {rank} is not in [0, world_size={world_size})"
        raise ValueError(msg)
    return rank, world_size


def _distributed_rank() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def _environment_rank() -> tuple[int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_by_rank(shards: Iterable[str], *, rank: int, world_size: int) -> Iterator[str]:
    """Pipeline stage: rank ``r`` of ``n`` keeps every ``n``-th shard from the ``r``-th."""
    yield from itertools.islice(shards, rank, None, world_size)


def split_by_worker(shards: Iterable[str]) -> Iterator[str]:
    """Pipeline stage: DataLoader worker ``w`` of ``k`` keeps every ``k``-th shard from the ``w``-th."""
    worker, workers = worker_info()
    mine = list(itertools.islice(shards, worker, None, workers))
    if not mine:
        logger.warning("worker %d of %d has no shard: use fewer ranks or workers, or more shards", worker, workers)
    yield from mine


def open_shards(shards: Iterable[str], *, filesystem: pafs.FileSystem) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{"url", "stream"}`` per shard, opened through pyarrow and closed after it is read.

    The stream is unbuffered: ``iter_tar`` reads ``READ_BUFFER`` bytes at a time (one request each on
    object stores), and the rest of a larger member in one read.
    """
    for path in shards:
        with filesystem.open_input_stream(path, compression=None) as handle:
            yield {"url": path, "stream": handle}


def expand_shards(files: Iterable[dict[str, Any]]) -> Iterator[Sample]:
    """Pipeline stage: each shard's samples ``{"__key__", "__url__", <extension>: bytes, ...}``.

    Samples are read with ``iter_samples`` (consecutive members sharing a key, never across shards).
    An unsafe member name, an unknown extension or a member twice in one sample raises ``ShardError``
    naming the shard and the member.
    """
    for file in files:
        shard = file["url"]
        for sample in iter_samples(file["stream"], shard, extensions=MEMBERS):
            sample.require_whole()
            yield {"__key__": sample.key, "__url__": shard, **sample.members}


def select_keys(samples: Iterable[Sample], *, keys: frozenset[str]) -> Iterator[Sample]:
    """Pipeline stage: keep the samples whose key is in ``keys``."""
    return (sample for sample in samples if sample["__key__"] in keys)


def shuffle_samples(samples: Iterable[Sample], *, bufsize: int, seed: tuple[int, int, int]) -> Iterator[Sample]:
    """Pipeline stage: ``webdataset.shuffle`` seeded by (seed, epoch, rank) and the DataLoader worker."""
    worker, _ = worker_info()
    return wds.shuffle(bufsize, initial=bufsize, seed="/".join(map(str, (*seed, worker))))(iter(samples))


def decode_samples(samples: Iterable[Sample]) -> Iterator[Sample]:
    """Pipeline stage: ``decode_sample`` each sample."""
    return (decode_sample(sample) for sample in samples)


def decode_sample(raw: Sample) -> Sample:
    """Decode raw members to ``{"key", "image", "mask", "metadata"}`` plus ``"cond_mask"`` when present.

    ``image`` is float32 (3, H, W) in [0, 1]; ``mask`` and ``cond_mask`` are float32 (1, H, W) in {0, 1};
    ``metadata`` is the parsed JSON dict.
    """
    shard, key = raw.get("__url__", "?"), raw["__key__"]
    missing = sorted({IMAGE, MASK, META} - raw.keys())
    if missing:
        msg = f"sample {key!r} lacks member(s) {missing}"
        raise ShardError(shard, msg)
    decoded = decode_members(raw)
    if decoded.errors:
        extension, err = next(iter(decoded.errors.items()))
        msg = f"{key}.{extension} is not {'valid JSON' if extension == META else 'a readable PNG'} ({err})"
        raise ShardError(shard, msg) from err
    image = decoded.image
    if image.ndim != 3 or image.shape[2] != 3:
        msg = f"{key}.{IMAGE} must be RGB, got shape {image.shape}"
        raise ShardError(shard, msg)
    if not isinstance(decoded.metadata, dict):
        msg = f"{key}.{META} must hold a JSON object"
        raise ShardError(shard, msg)
    sample = {
        "key": key,
        "image": torch.from_numpy(_unit_float(image.transpose(2, 0, 1))),
        "mask": _mask_tensor(shard, f"{key}.{MASK}", decoded.mask, image.shape[:2]),
        "metadata": decoded.metadata,
    }
    if decoded.cond_mask is not None:
        sample["cond_mask"] = _mask_tensor(shard, f"{key}.{COND}", decoded.cond_mask, image.shape[:2])
    return sample


def _unit_float(array: np.ndarray) -> np.ndarray:
    """uint8 to float32 in [0, 1], in numpy: small torch ops pay for intra-op threading."""
    scaled = np.ascontiguousarray(array, dtype=np.float32)
    scaled /= np.float32(255)
    return scaled


def _mask_tensor(shard: str, member: str, mask: np.ndarray, size: tuple[int, ...]) -> torch.Tensor:
    if mask.shape != size:
        msg = f"{member} must be a single-channel {size[0]}x{size[1]} mask, got shape {mask.shape}"
        raise ShardError(shard, msg)
    return torch.from_numpy((mask != 0)[None].astype(np.float32))


def collate(batch: Sequence[Sample]) -> dict[str, Any]:
    """Batch decoded samples (all of one size): ``collate_fn`` for a ``DataLoader`` over ``stream``.

    ``default_collate`` fails on metadata (``None`` fields, per-method keys) and on batches mixing
    samples with and without a conditioning mask; this keeps both.

    Returns:
        ``key``: list of str; ``image``: (B, 3, H, W); ``mask``: (B, 1, H, W); ``cond_mask``:
        (B, 1, H, W), zeros where ``has_cond`` (B,) bool is False; ``metadata``: list of dicts.
    """
    masks = [sample["mask"] for sample in batch]
    conds = [sample.get("cond_mask", torch.zeros_like(mask)) for sample, mask in zip(batch, masks, strict=True)]
    return {
        "key": [sample["key"] for sample in batch],
        "image": torch.stack([sample["image"] for sample in batch]),
        "mask": torch.stack(masks),
        "cond_mask": torch.stack(conds),
        "has_cond": torch.tensor(["cond_mask" in sample for sample in batch]),
        "metadata": [sample["metadata"] for sample in batch],
    }
