"""What made a dataset, per product: the model version and a settings digest, kept in ``identity.json``.

Sample keys derive from the request alone, so a resumed run would skip the keys an earlier model version
wrote and fill in the rest with the new one: one dataset, two models. The identity is checked when a
writer opens the dataset, and a run whose model version or settings differ from what wrote the product's
samples is refused before anything is written. Datasets from before the identity file are checked
against the model version their samples record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from defectsynth.storage.errors import DatasetError
from defectsynth.storage.fs import Location
from defectsynth.storage.shard_index import IndexedSample

IDENTITY_FILE = "identity.json"
Identity = dict[str, dict[str, str]]  # product -> {"model_version": ..., "settings_digest": ...}


def recorded_identity(location: Location, samples: Iterable[IndexedSample]) -> Identity:
    """The dataset's identity: ``identity.json``, or (older datasets) each product's model version in its samples."""
    path = location.path(IDENTITY_FILE)
    if location.exists(path):
        try:
            recorded = json.loads(location.read_bytes(path))
        except ValueError as err:
            raise DatasetError(location.uri, f"{IDENTITY_FILE} is unreadable ({err})") from err
        if not isinstance(recorded, dict):
            raise DatasetError(location.uri, f"{IDENTITY_FILE} is not a JSON object")
        return recorded
    found: Identity = {}
    for sample in samples:
        meta = sample.metadata or {}
        version = (meta.get("generator") or {}).get("model_version")
        if version is not None:
            found.setdefault(meta.get("product", "?"), {"model_version": str(version)})
    return found


def claim_identity(
    location: Location, samples: Iterable[IndexedSample], identity: Mapping[str, Mapping[str, str]]
) -> Identity:
    """Check ``identity`` against what wrote the dataset's samples, record it, and return the merged identity.

    Raises:
        DatasetError: Naming the dataset, the product and both identities, when a product's samples came
            from another model version or other settings.
    """
    recorded = recorded_identity(location, samples)
    for product, wanted in identity.items():
        before = recorded.get(product, {})
        differing = [k for k in wanted if k in before and before[k] != wanted[k]]
        if differing:
            was = ", ".join(f"{k} {before[k]}" for k in differing)
            now = ", ".join(f"{k} {wanted[k]}" for k in differing)
            problem = (
                f"its {product} samples were made with {was}; this run has {now}. Mixing them is refused: "
                "write to a new dataset (generate.output) or delete this one"
            )
            raise DatasetError(location.uri, problem)
    merged = {**recorded, **{product: dict(value) for product, value in identity.items()}}
    location.write_atomically(location.path(IDENTITY_FILE), json.dumps(merged, indent=2, sort_keys=True).encode())
    return merged
