"""Shard write and read throughput: defectsynth's writer and stream against plain ``tarfile``.

Four timed measurements per image size (128 px and 512 px), over the same pre-encoded samples:

* ours write: ``DatasetWriter(dir, maxcount=...)`` writing the ``EncodedSample`` objects, then
  ``close()`` (manifest.parquet and dataset.json included: users pay for them);
* baseline write: plain ``tarfile`` writing the same member bytes into shards of the same count;
* ours read: iterating ``defectsynth.storage.stream(dir, decode=False)`` over every sample;
* baseline read: plain ``tarfile`` iterating every member of the same shards and reading its bytes.

PNG encoding happens before any timing. Each measurement runs ``--repeats`` times, ours and
baseline interleaved, and the best run counts. Ratios are ours / baseline throughput (1.0 = as
fast as plain tarfile; higher is better), from wall time; the ``cpu_*_ratio_*`` keys are the same
from this process's CPU time, steadier on a shared machine. The last line printed is one JSON object.

Usage:
    .venv/bin/python bench/shards.py               # the real figures (about 2-3 minutes)
    .venv/bin/python bench/shards.py --quick       # a few seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from defectsynth.storage import stream
from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.keys import derive_key
from defectsynth.storage.sample import META, EncodedSample, GeneratorInfo, Sample, SampleMetadata, encode_sample

SIZES = (128, 512)
UNIQUE = 64  # distinct images per size; further samples reuse their PNG bytes under new keys
MB = 1e6


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise plus a little grain: compresses like a photo of a surface, not like pure noise."""
    low = rng.integers(0, 256, (max(size // 16, 2), max(size // 16, 2), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-3, 4, image.shape, dtype=np.int16)
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """An elliptic defect somewhere in the image."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.03, 0.15, 2) * size
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_samples(count: int, size: int, seed: int = 0) -> list[EncodedSample]:
    """``count`` encoded samples (PNG image, mask, half with a cond mask, JSON), all with distinct keys."""
    rng = np.random.default_rng(seed)
    pool: list[EncodedSample] = []
    samples: list[EncodedSample] = []
    for index in range(count):
        key = derive_key("wood", "perlin", "crack", {"size": size, "sample_index": index})
        if index < UNIQUE:
            mask = blob_mask(rng, size)
            metadata = SampleMetadata(
                key=key,
                product="wood",
                defect_type="crack",
                intensity=float(rng.uniform()),
                generator=GeneratorInfo(method="perlin", config_digest="0" * 64),
                seed=index,
                sampler="bench",
                steps=0,
                source_image=f"train/good/{index:03d}.png",
            )
            cond = mask if index % 2 else None
            encoded = encode_sample(Sample(image=smooth_image(rng, size), mask=mask, metadata=metadata, cond_mask=cond))
            pool.append(encoded)
        else:
            # What encode_sample returns for the same pixels under another key, without re-encoding PNGs.
            base = pool[index % UNIQUE]
            metadata = base.metadata.model_copy(update={"key": key, "seed": index})
            members = {**base.members, META: metadata.model_dump_json().encode()}
            encoded = EncodedSample(key=key, members=members, metadata=metadata)
        samples.append(encoded)
    return samples


def payload_bytes(samples: list[EncodedSample]) -> int:
    """Member data bytes, what both sides write and read (tar headers and padding not counted)."""
    return sum(len(data) for sample in samples for data in sample.members.values())


# --- the four measurements ----------------------------------------------------------------------


def ours_write(samples: list[EncodedSample], directory: Path, maxcount: int) -> None:
    """DatasetWriter: shards, then manifest and card on close."""
    writer = DatasetWriter(directory, maxcount=maxcount)
    for sample in samples:
        writer.write(sample)
    writer.close()


def baseline_write(samples: list[EncodedSample], directory: Path, maxcount: int) -> None:
    """Plain tarfile: the same members, the same number of samples per shard, nothing else."""
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), maxcount):
        path = directory / "shards" / f"wood-perlin-{start // maxcount:06d}.tar"
        with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[start : start + maxcount]:
                for extension in sorted(sample.members):
                    data = sample.members[extension]
                    info = tarfile.TarInfo(f"{sample.key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def ours_read(directory: Path) -> tuple[int, int]:
    """Iterate ``stream(directory, decode=False)``; returns (samples, member bytes)."""
    count = nbytes = 0
    for item in stream(str(directory), decode=False):
        count += 1
        for name, value in item.items():
            if not name.startswith("__"):
                nbytes += len(value)
    return count, nbytes


def baseline_read(directory: Path) -> tuple[int, int]:
    """Plain tarfile over the same shards: every member's bytes read; returns (samples, member bytes)."""
    keys: set[str] = set()
    nbytes = 0
    for path in sorted((directory / "shards").glob("*.tar")):
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                handle = tar.extractfile(info)
                data = handle.read() if handle else b""
                nbytes += len(data)
                keys.add(info.name.partition(".")[0])
    return len(keys), nbytes


# --- running ------------------------------------------------------------------------------------


def timed(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result)."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - start, time.process_time() - cpu, result


def bench_size(size: int, count: int, maxcount: int, repeats: int, root: Path) -> dict[str, float | int | None]:
    setup = time.perf_counter()
    samples = make_samples(count, size)
    total = payload_bytes(samples)
    print(
        f"[{size}px] {count} samples, {total / MB:.1f} MB of members, {maxcount}/shard "
        f"(encoded in {time.perf_counter() - setup:.1f} s)",
        flush=True,
    )
    best: dict[str, float] = {}

    def keep(name: str, seconds: float, cpu: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)
        best[f"cpu_{name}"] = min(best.get(f"cpu_{name}", float("inf")), cpu)

    read_dir = root / f"read-{size}"
    for repeat in range(repeats):
        # Interleaved, alternating which side goes first, so drift hits both alike.
        order = ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours")
        for side in order:
            directory = root / f"write-{size}-{side}"
            write = ours_write if side == "ours" else baseline_write
            seconds, cpu, _ = timed(lambda write=write, directory=directory: write(samples, directory, maxcount))
            keep(f"write_{side}", seconds, cpu)
            if side == "ours" and not read_dir.exists():
                directory.rename(read_dir)  # keep one dataset written by us for the reads
            else:
                shutil.rmtree(directory)
        for side in order:
            read = ours_read if side == "ours" else baseline_read
            seconds, cpu, (got, nbytes) = timed(lambda read=read: read(read_dir))  # type: ignore[misc]
            if got != count or nbytes != total:
                msg = f"{side} read gave {got} samples / {nbytes} bytes, expected {count} / {total}"
                raise RuntimeError(msg)
            keep(f"read_{side}", seconds, cpu)
        line = ", ".join(
            f"{name} {count / seconds:,.0f}/s" for name, seconds in sorted(best.items()) if not name.startswith("cpu_")
        )
        print(f"[{size}px] repeat {repeat + 1}/{repeats}: best so far {line}", flush=True)
    shutil.rmtree(read_dir)

    result: dict[str, float | int | None] = {}
    for kind in ("write", "read"):
        for side in ("ours", "baseline"):
            seconds = best.get(f"{kind}_{side}")
            prefix = f"{kind}_" if side == "ours" else f"baseline_{kind}_"
            result[f"{prefix}samples_per_s_{size}"] = round(count / seconds, 1) if seconds else None
            result[f"{prefix}mb_per_s_{size}"] = round(total / MB / seconds, 1) if seconds else None
        ours, base = best.get(f"{kind}_ours"), best.get(f"{kind}_baseline")
        result[f"{kind}_ratio_{size}"] = round(base / ours, 3) if ours and base else None
        ours, base = best.get(f"cpu_{kind}_ours"), best.get(f"cpu_{kind}_baseline")
        result[f"cpu_{kind}_ratio_{size}"] = round(base / ours, 3) if ours and base else None
    result[f"samples_{size}"] = count
    result[f"mb_{size}"] = round(total / MB, 1)
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples-128", type=int, default=6000, help="samples at 128 px (default 6000)")
    parser.add_argument("--samples-512", type=int, default=600, help="samples at 512 px (default 600, ~300 MB)")
    parser.add_argument("--maxcount-128", type=int, default=1000, help="samples per shard at 128 px")
    parser.add_argument("--maxcount-512", type=int, default=100, help="samples per shard at 512 px")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each measurement; the best counts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples_128, args.samples_512, args.repeats = 40, 8, 1
        args.maxcount_128, args.maxcount_512 = 16, 3

    started = time.perf_counter()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="defectsynth-bench-", dir=args.dir) as tmp:
        for size, count, maxcount in (
            (128, args.samples_128, args.maxcount_128),
            (512, args.samples_512, args.maxcount_512),
        ):
            results.update(bench_size(size, count, maxcount, args.repeats, Path(tmp)))
    ratios = {
        name: results.pop(name)
        for name in sorted(results, key=lambda n: (n.startswith("cpu_"), n))
        if "_ratio_" in name
    }
    summary = {
        **ratios,
        **results,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
