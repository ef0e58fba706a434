"""anomalib reads a ``shards export --format anomalib-folder`` tree, and trains and tests DRAEM on it.

anomalib 2.7 wants torch 2.14.1 and torchvision 0.29.1, which would replace the pinned torch, so it runs in
an environment of its own that this test makes once (``ANOMALIB_ENV``, default ``.cache/anomalib-env``) and
reuses; the helper it runs there imports anomalib, never defectsynth.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.exporters import export_anomalib_folder
from defectsynth.storage.keys import derive_key
from defectsynth.storage.sample import GeneratorInfo, Sample, SampleMetadata

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ANOMALIB = "anomalib==2.7.0"
SIZE = 64
NORMALS = 16
DEFECTS = {"crack": 4, "hole": 4}


def anomalib_python() -> Path:
    """The Python of anomalib's own environment, made with pip on first use (about 2 minutes, no GPU needed)."""
    env = Path(os.environ.get("ANOMALIB_ENV", REPO / ".cache" / "anomalib-env"))
    python = env / "bin" / "python"
    if not (env / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-compile", ANOMALIB], capture_output=True, text=True
        )
        if install.returncode != 0:
            pytest.fail(f"pip install {ANOMALIB} into {env} failed:\n{install.stderr[-4000:]}")
        (env / ".installed").write_text(ANOMALIB + "\n")
    return python


def wood_sample(index: int, defect_type: str) -> Sample:
    """A grey wood-like image; a defect is a dark patch inside its mask (a crack thin, a hole square)."""
    rng = np.random.default_rng(index)
    image = (rng.random((SIZE, SIZE, 3)) * 40 + 120).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    label = 0 if defect_type == "good" else 1
    if label:
        y, x = rng.integers(8, SIZE - 24, 2)
        mask[y : y + 16, x : x + (2 if defect_type == "crack" else 12)] = True
        image[mask] = 30
    metadata = SampleMetadata(
        key=derive_key("wood", "perlin", defect_type, {"sample_index": index}),
        product="wood",
        defect_type=defect_type,
        label=label,
        generator=GeneratorInfo(method="perlin", model_version="1"),
        seed=index,
    )
    return Sample(image=image, mask=mask, metadata=metadata)


def write_textures(root: Path) -> Path:
    """A few noise images: DRAEM's anomaly-source textures, in place of the DTD archive it would download."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for index in range(4):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(root / f"{index}.png")
    return root


def test_anomalib_trains_and_tests_draem_on_a_folder_export(tmp_path: Path) -> None:
    samples = [wood_sample(i, "good") for i in range(NORMALS)]
    for offset, (defect_type, count) in enumerate(DEFECTS.items(), start=1):
        samples += [wood_sample(100 * offset + i, defect_type) for i in range(count)]
    with DatasetWriter(tmp_path / "data", maxcount=8) as writer:
        for sample in samples:
            writer.write(sample)
    export_anomalib_folder(tmp_path / "data", tmp_path / "export")
    product = tmp_path / "export" / "wood"
    with (product / "keys.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    mask_of = {str(product / row["file"]): row["mask"] and str(product / row["mask"]) for row in rows}

    run = subprocess.run(
        [str(anomalib_python()), str(REPO / "tests/helpers/anomalib_folder_run.py"), str(product),
         str(write_textures(tmp_path / "textures")), str(tmp_path / "anomalib")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])

    read = [s for split in result["samples"].values() for s in split]
    assert sorted(s["image"] for s in read) == sorted(mask_of), "anomalib read other files than the export wrote"
    assert all(s["mask"] == mask_of[s["image"]] for s in read), "anomalib paired an image with another's mask"
    assert all(s["label"] == 0 for s in result["samples"]["train"])
    abnormal = [s for s in read if s["label"] == 1]
    assert len(abnormal) == sum(DEFECTS.values()) and all(s["mask"] for s in abnormal)
    for metric in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= result["metrics"][metric] <= 1.0, result["metrics"]
