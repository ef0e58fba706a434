"""Small generated samples for storage tests, and a writer process that tests can kill."""

from __future__ import annotations

import sys
import time

import numpy as np

from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.keys import derive_key
from defectsynth.storage.sample import GeneratorInfo, Sample, SampleMetadata

TYPES = ("crack", "hole", "scratch")


def make_sample(index: int, *, size: int = 16, product: str = "wood", method: str = "perlin") -> Sample:
    """A deterministic sample: random image, a box mask, a conditioning mask on even indices."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    x, y = rng.integers(0, size // 2, 2)
    mask[y : y + 4, x : x + 5] = True
    defect_type = TYPES[index % len(TYPES)]
    metadata = SampleMetadata(
        key=derive_key(product, method, defect_type, {"sample_index": index}),
        product=product,
        defect_type=defect_type,
        intensity=round(float(rng.uniform(0.2, 1.0)), 3),
        generator=GeneratorInfo(method=method, model_version="1"),
        seed=index,
        qc={"scores": {"area": float(mask.sum())}, "passed": index % 7 != 0},
        created_at="2026-01-01T00:00:00+00:00",
    )
    return Sample(image=image, mask=mask, metadata=metadata, cond_mask=mask.copy() if index % 2 == 0 else None)


def slow_write(root: str, count: int, maxcount: int, delay: float) -> None:
    """Write ``count`` samples, pausing between them, so a test can kill the process mid-shard."""
    with DatasetWriter(root, maxcount=maxcount) as writer:
        for index in range(count):
            writer.write(make_sample(index))
            time.sleep(delay)


if __name__ == "__main__":
    slow_write(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
