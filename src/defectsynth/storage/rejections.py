"""Samples the quality gates kept out of a dataset: their log and a small preview under ``rejected/``.

``rejected/rejections.json`` lists every rejected attempt (key, product, defect type, attempt, reasons,
whether it is previewed), so a re-run neither re-tries a rejected key nor lets it into the dataset, and
the card counts rejections per reason and per type across runs. The first ``preview_per_type`` rejected
samples of each product and type are kept as plain members beside the log (``rejected/<key>.png``,
``.mask.png``, ``.cond.png``, ``.json`` with ``rejected_for``) for inspection; they are never shards, so
no reader streams them.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.fs import Location
from defectsynth.storage.sample import EncodedSample

REJECTED_DIR = "rejected"
REJECTION_LOG = "rejections.json"


@dataclass(frozen=True)
class Rejection:
    """One rejected attempt."""

    key: str
    product: str
    defect_type: str
    attempt: int
    reasons: tuple[str, ...]
    previewed: bool


class RejectionLog:
    """The dataset's rejection log, read on open, extended by ``add``, written by ``save``."""

    def __init__(self, location: Location, *, preview_per_type: int = 2) -> None:
        self.location = location
        self.preview_per_type = preview_per_type
        self.entries: list[Rejection] = self._read()
        self.keys = {entry.key for entry in self.entries}
        self._previewed = Counter((e.product, e.defect_type) for e in self.entries if e.previewed)

    def _read(self) -> list[Rejection]:
        path = self.location.path(REJECTED_DIR, REJECTION_LOG)
        if not self.location.exists(path):
            return []
        try:
            rows = json.loads(self.location.read_bytes(path))
            return [Rejection(**{**row, "reasons": tuple(row["reasons"])}) for row in rows]
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise DatasetError(self.location.uri, f"{REJECTED_DIR}/{REJECTION_LOG} is unreadable ({err})") from err

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, sample: EncodedSample, reasons: tuple[str, ...]) -> bool:
        """Record a rejected sample (once per key); preview it while its type has room. Returns whether new."""
        meta = sample.metadata
        if sample.key in self.keys:
            return False
        slot = (meta.product, meta.defect_type)
        previewed = self._previewed[slot] < self.preview_per_type
        if previewed:
            self.location.fs.create_dir(self.location.path(REJECTED_DIR), recursive=True)
            for extension, data in sample.members.items():
                self.location.write_atomically(self.location.path(REJECTED_DIR, f"{sample.key}.{extension}"), data)
            self._previewed[slot] += 1
        attempt = int((meta.model_extra or {}).get("attempt", 0))
        self.entries.append(Rejection(sample.key, meta.product, meta.defect_type, attempt, reasons, previewed))
        self.keys.add(sample.key)
        return True

    def save(self) -> None:
        """Write the log atomically (nothing when there has never been a rejection)."""
        if not self.entries:
            return
        self.location.fs.create_dir(self.location.path(REJECTED_DIR), recursive=True)
        rows = [asdict(entry) for entry in sorted(self.entries, key=lambda e: e.key)]
        self.location.write_atomically(
            self.location.path(REJECTED_DIR, REJECTION_LOG), json.dumps(rows, indent=1).encode()
        )

    def summary(self) -> dict[str, Any]:
        """The card's ``rejections``: totals per reason, per product and type, and per type and reason.

        A rejection may have several reasons, so ``by_reason`` can add up to more than ``total``.
        """
        by_type: dict[str, Counter[str]] = defaultdict(Counter)
        by_type_reason: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        by_reason: Counter[str] = Counter()
        for entry in self.entries:
            by_type[entry.product][entry.defect_type] += 1
            by_reason.update(entry.reasons)
            by_type_reason[entry.product][entry.defect_type].update(entry.reasons)
        return {
            "total": len(self.entries),
            "by_reason": dict(sorted(by_reason.items())),
            "by_type": {p: dict(sorted(c.items())) for p, c in sorted(by_type.items())},
            "by_type_and_reason": {
                p: {t: dict(sorted(c.items())) for t, c in sorted(types.items())}
                for p, types in sorted(by_type_reason.items())
            },
            "previewed": sum(entry.previewed for entry in self.entries),
        }
