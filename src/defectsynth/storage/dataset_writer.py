"""Writing a dataset: samples into shard series per product and method, then manifest and card.

Re-runs resume: keys already in complete shards are skipped, new shards continue the numbering,
and the manifest and card are rebuilt from every complete shard. Samples the quality gates rejected
go to ``reject`` instead: logged (and a few previewed) under ``rejected/``, never into a shard, and
counted in the card. One writer per dataset at a time.

Example:
    >>> with DatasetWriter("runs/demo/datasets/perlin", maxcount=500) as writer:  # doctest: +SKIP
    ...     for sample in samples:
    ...         writer.write(sample)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow.fs as pafs

from defectsynth.storage.dataset_identity import claim_identity
from defectsynth.storage.dataset_lock import DatasetLock
from defectsynth.storage.fs import resolve
from defectsynth.storage.keys import slug
from defectsynth.storage.manifest import CARD, build_card, read_card, write_manifest_and_card
from defectsynth.storage.rejections import RejectionLog
from defectsynth.storage.sample import META, EncodedSample, Sample, encode_sample
from defectsynth.storage.shard_index import SHARDS_DIR, IndexedSample, complete_shards, index_dataset
from defectsynth.storage.shard_writer import PARTIAL, ShardWriter, rewrite_shard

logger = logging.getLogger(__name__)

_SHARD_NUMBER = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6})\.tar$")


def shard_prefix(sample: EncodedSample) -> str:
    """``<product>-<method>``: the series a sample's shard belongs to."""
    return f"{slug(sample.metadata.product)}-{slug(sample.metadata.generator.method)}"


class DatasetWriter:
    """Write samples under ``uri`` (local path or pyarrow URI) with resume; see the module docstring."""

    def __init__(
        self,
        uri: str | Path,
        *,
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        filesystem: pafs.FileSystem | None = None,
        config: Any = None,
        split: Any = None,
        preview_per_type: int = 2,
        identity: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.location = resolve(uri, filesystem)
        self.maxcount, self.maxsize = maxcount, maxsize
        self.location.fs.create_dir(self.location.path(SHARDS_DIR), recursive=True)
        self.lock = DatasetLock(self.location)
        self.lock.acquire()  # before anything is touched: another writer's open shards look like leftovers
        try:
            self._drop_partials()
            self._indexed: list[IndexedSample] = index_dataset(self.location)
            if identity:
                claim_identity(self.location, self._indexed, identity)
        except BaseException:
            self.lock.release()
            raise
        self._keys = {s.key for s in self._indexed}
        self._next_index = self._next_shard_numbers()
        self._writers: dict[str, ShardWriter] = {}
        self._pending: list[IndexedSample] = []  # written this run; all committed once close() closes the shards
        self._card_fields = self._previous_card_fields(config, split)
        self.rejections = RejectionLog(self.location, preview_per_type=preview_per_type)
        self.written = 0
        self.skipped = 0
        self.card: dict[str, Any] | None = None  # set by close()
        logger.info("dataset %s: %d sample(s) already complete", self.location.uri, len(self._keys))

    def _drop_partials(self) -> None:
        for path in self.location.list_files(self.location.path(SHARDS_DIR)):
            if path.endswith(PARTIAL):
                logger.warning("removing incomplete shard left by an earlier run: %s", path)
                self.location.fs.delete_file(path)

    def _next_shard_numbers(self) -> dict[str, int]:
        numbers: dict[str, int] = {}
        for path in complete_shards(self.location):
            match = _SHARD_NUMBER.match(path.rsplit("/", 1)[-1])
            if match:
                prefix, index = match["prefix"], int(match["index"])
                numbers[prefix] = max(numbers.get(prefix, 0), index + 1)
        return numbers

    def _previous_card_fields(self, config: Any, split: Any) -> dict[str, Any]:
        previous: dict[str, Any] = {}
        if self.location.exists(self.location.path(CARD)):
            previous = read_card(self.location)
        return {
            "config": config if config is not None else previous.get("config"),
            "split": split if split is not None else previous.get("split"),
        }

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def is_rejected(self, key: str) -> bool:
        """Whether ``key`` was rejected by the quality gates, in this run or an earlier one."""
        return key in self.rejections

    def reject(self, sample: Sample | EncodedSample, reasons: tuple[str, ...]) -> bool:
        """Log a rejected sample (previewed while its type has room); it never enters a shard. Returns whether new."""
        encoded = sample if isinstance(sample, EncodedSample) else encode_sample(sample)
        return self.rejections.add(encoded, tuple(reasons))

    def write(self, sample: Sample | EncodedSample) -> bool:
        """Write a sample unless its key is already in the dataset; returns whether it was written."""
        if sample.key in self._keys:
            self.skipped += 1
            return False
        encoded = sample if isinstance(sample, EncodedSample) else encode_sample(sample)
        prefix = shard_prefix(encoded)
        if prefix not in self._writers:
            self._writers[prefix] = ShardWriter(
                self.location,
                SHARDS_DIR,
                prefix,
                maxcount=self.maxcount,
                maxsize=self.maxsize,
                start_index=self._next_index.get(prefix, 0),
                on_commit=lambda _: self.lock.heartbeat(),
            )
        shard = self._writers[prefix].write(encoded)
        self._pending.append(
            IndexedSample(
                key=encoded.key,
                shard=shard,
                extensions=sorted(encoded.members),
                metadata=json.loads(encoded.members[META]),
            )
        )
        self._keys.add(encoded.key)
        self.written += 1
        return True

    def retain(self, wanted: Collection[str], products: Collection[str]) -> list[str]:
        """Remove the earlier runs' samples of ``products`` whose key is not in ``wanted``; returns their keys.

        A run that asks for fewer samples than an earlier one wrote (a lower ``per_type``) calls this, so
        the surplus is not streamed or counted as part of the dataset: the shards holding it are rewritten.
        Samples of other products (written by runs over other products) stay.
        """
        wanted, products = set(wanted), set(products)
        surplus = {
            s.key for s in self._indexed if s.key not in wanted and (s.metadata or {}).get("product") in products
        }
        for shard in sorted({s.shard for s in self._indexed if s.key in surplus}):
            rewrite_shard(self.location, self.location.path(SHARDS_DIR, shard), lambda key: key not in surplus)
        if surplus:
            logger.info("dataset %s: removed %d sample(s) no request asks for", self.location.uri, len(surplus))
            self._indexed = [s for s in self._indexed if s.key not in surplus]
            self._keys -= surplus
        return sorted(surplus)

    def close(self) -> dict[str, Any]:
        """Commit open shards, rebuild manifest and card from every complete shard; returns the card."""
        try:
            for writer in self._writers.values():
                writer.close()
            self._indexed.extend(self._pending)
            self._pending.clear()
            card = self._write_manifest_and_card()
        finally:
            self.lock.release()
        logger.info(
            "dataset %s: wrote %d, skipped %d already present, %d in all",
            self.location.uri,
            self.written,
            self.skipped,
            card["samples"],
        )
        return card

    def abort(self) -> None:
        """Drop open shards' partial files; the complete shards stay, described by a rebuilt manifest and card."""
        try:
            for writer in self._writers.values():
                writer.abort()
            committed = {info.name for writer in self._writers.values() for info in writer.committed}
            self._indexed.extend(s for s in self._pending if s.shard in committed)
            self._pending.clear()
            self._write_manifest_and_card()
        finally:
            self.lock.release()

    def _write_manifest_and_card(self) -> dict[str, Any]:
        self.rejections.save()
        card = build_card(self._indexed, **self._card_fields, rejections=self.rejections.summary())
        write_manifest_and_card(self.location, self._indexed, card)
        self.card = card
        return card

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
