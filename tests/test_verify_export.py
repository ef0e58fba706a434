"""Verifying shard datasets (missing, extra, corrupt samples and shards) and exporting them to plain trees."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from defectsynth.storage.dataset_writer import DatasetWriter
from defectsynth.storage.errors import ShardError
from defectsynth.storage.exporters import export_anomalib_folder, export_mvtec
from defectsynth.storage.imageio import load_item
from defectsynth.storage.keys import derive_key
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.layouts.mvtec import defect_records, mvtec_masks
from defectsynth.storage.sample import GeneratorInfo, Sample, SampleMetadata, encode_png, encode_sample
from defectsynth.storage.shard_reader import ShardSample
from defectsynth.storage.verify import check_sample, verify_dataset

SIZE = 24
TYPES = ("crack", "hole")


def make_sample(index: int, product: str, label: int) -> Sample:
    """A deterministic sample; label 0 is a generated normal (defect type "good", empty mask)."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if label == 1:
        x, y = rng.integers(0, SIZE // 2, 2)
        mask[y : y + 5, x : x + 6] = True
    defect_type = TYPES[index % 2] if label == 1 else "good"
    metadata = SampleMetadata(
        key=derive_key(product, "perlin", defect_type, {"sample_index": index}),
        product=product,
        defect_type=defect_type,
        label=label,
        intensity=round(0.1 + 0.02 * index, 3) if label == 1 else None,
        generator=GeneratorInfo(method="perlin", model_version="1"),
        seed=index,
        qc={"passed": index % 9 != 4},
    )
    return Sample(image=image, mask=mask, metadata=metadata, cond_mask=mask.copy() if index % 3 == 0 else None)


def dataset_samples() -> list[Sample]:
    """wood: 14 defects + 3 normals; pill: 10 defects, no normals (27 samples, 3 rejected by qc)."""
    samples = [make_sample(i, "wood", 1) for i in range(14)]
    samples += [make_sample(100 + i, "wood", 0) for i in range(3)]
    samples += [make_sample(200 + i, "pill", 1) for i in range(10)]
    return samples


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Sample]]:
    root = tmp_path_factory.mktemp("verify") / "data"
    samples = dataset_samples()
    with DatasetWriter(root, maxcount=4) as writer:
        for sample in samples:
            writer.write(sample)
    return root, {s.key: s for s in samples}


@pytest.fixture
def dataset(written: tuple[Path, dict[str, Sample]], tmp_path: Path) -> Path:
    """A private copy of the written dataset, for tests that damage it."""
    return Path(shutil.copytree(written[0], tmp_path / "data"))


def shard_members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def manifest_rows(root: Path) -> list[dict]:
    return pq.read_table(root / "manifest.parquet").to_pylist()


def problems_of(report_list: list) -> list[tuple[str | None, str | None]]:
    return [(p.shard, p.key) for p in report_list]


# --- verify ---------------------------------------------------------------------------------------


def test_clean_dataset_verifies_ok(written: tuple[Path, dict[str, Sample]]) -> None:
    root, samples = written
    report = verify_dataset(root)
    assert report.ok, report.format()
    assert report.samples == len(samples) == report.manifest_rows
    assert report.shards == len(list((root / "shards").glob("*.tar"))) >= 7
    assert report.counts["corrupt sample"] == 0
    assert "OK" in report.format()


def test_flipped_bytes_inside_a_png_member_are_a_corrupt_sample(dataset: Path) -> None:
    shard = sorted((dataset / "shards").glob("wood-*.tar"))[1]
    member = next(m for m in shard_members(shard) if m.name.split(".", 1)[1] == "png")  # an image member
    key = member.name.split(".", 1)[0]
    with shard.open("r+b") as handle:  # the tar headers stay valid: only data bytes change
        handle.seek(member.offset_data + member.size // 2)
        chunk = handle.read(8)
        handle.seek(member.offset_data + member.size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    report = verify_dataset(dataset)
    assert not report.ok
    assert problems_of(report.corrupt_samples) == [(shard.name, key)]
    assert "png: sha256 differs from the json digest" in report.corrupt_samples[0].reason
    assert not report.missing and not report.extra and not report.corrupt_shards
    assert f"corrupt sample  {shard.name}  {key}" in report.format()


@pytest.mark.parametrize("where", ["middle", "member boundary"])
def test_truncated_tar_is_a_corrupt_shard_and_its_samples_are_missing(dataset: Path, where: str) -> None:
    shard = sorted((dataset / "shards").glob("pill-*.tar"))[0]
    members = shard_members(shard)
    cut = shard.stat().st_size // 2 if where == "middle" else members[5].offset  # a header's first byte
    with shard.open("r+b") as handle:
        handle.truncate(cut)
    report = verify_dataset(dataset)
    assert [p.shard for p in report.corrupt_shards] == [shard.name]
    assert "truncated" in report.corrupt_shards[0].reason
    in_shard = sorted(r["key"] for r in manifest_rows(dataset) if r["shard"] == shard.name)
    assert sorted(p.key for p in report.missing) == in_shard and len(in_shard) == 4
    assert {p.shard for p in report.missing} == {shard.name}
    assert not report.extra and not report.corrupt_samples
    assert "cannot be read to the end" in report.missing[0].reason


def test_sample_dropped_from_the_manifest_is_extra(dataset: Path) -> None:
    table = pq.read_table(dataset / "manifest.parquet")
    dropped = table.slice(3, 1).to_pylist()[0]
    pq.write_table(table.filter(pc.not_equal(table["key"], dropped["key"])), dataset / "manifest.parquet")
    report = verify_dataset(dataset)
    assert problems_of(report.extra) == [(dropped["shard"], dropped["key"])]
    assert not report.missing and not report.corrupt_samples and not report.corrupt_shards
    assert any("dataset.json says 27 sample(s)" in p.reason for p in report.dataset)


def test_manifest_row_without_a_sample_is_missing(dataset: Path) -> None:
    table = pq.read_table(dataset / "manifest.parquet")
    ghost = {**table.slice(0, 1).to_pylist()[0], "key": "wood_crack_00000000000000000000"}
    extended = table.to_pylist() + [ghost]
    pq.write_table(type(table).from_pylist(extended, schema=table.schema), dataset / "manifest.parquet")
    report = verify_dataset(dataset)
    assert problems_of(report.missing) == [(ghost["shard"], ghost["key"])]
    assert "in no complete shard" in report.missing[0].reason
    assert not report.extra and not report.corrupt_samples


def test_manifest_row_naming_another_shard_is_a_corrupt_sample(dataset: Path) -> None:
    table = pq.read_table(dataset / "manifest.parquet")
    rows = table.to_pylist()
    moved = rows[0]
    other = next(r["shard"] for r in rows if r["shard"] != moved["shard"])
    rows[0] = {**moved, "shard": other}
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), dataset / "manifest.parquet")
    report = verify_dataset(dataset)
    assert problems_of(report.corrupt_samples) == [(moved["shard"], moved["key"])]
    assert f"manifest row names shard {other!r}" in report.corrupt_samples[0].reason


def test_unsafe_member_name_is_a_corrupt_shard(dataset: Path) -> None:
    shard = sorted((dataset / "shards").glob("wood-*.tar"))[0]
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("../escape.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    report = verify_dataset(dataset)
    assert [p.shard for p in report.corrupt_shards] == [shard.name]
    assert "'../escape.png' refused" in report.corrupt_shards[0].reason
    assert not report.missing  # the rest of the shard reads to the end


def test_missing_manifest_and_card_are_reported(dataset: Path) -> None:
    (dataset / "manifest.parquet").unlink()
    (dataset / "dataset.json").write_text("{not json")
    report = verify_dataset(dataset)
    reasons = [p.reason for p in report.dataset]
    assert "manifest.parquet is missing" in reasons
    assert any(r.startswith("dataset.json is unreadable") for r in reasons)
    assert report.manifest_rows is None and "manifest unreadable" in report.format()


def test_not_a_dataset_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such dataset directory"):
        verify_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a dataset"):
        verify_dataset(tmp_path)


def _members(**changes: bytes | None) -> ShardSample:
    encoded = encode_sample(make_sample(1, "wood", 1))
    members = dict(encoded.members)
    for name, data in changes.items():
        extension = {"png": "png", "mask": "mask.png", "json": "json"}[name]
        if data is None:
            members.pop(extension)
        else:
            members[extension] = data
    if "json" not in changes:  # keep digests right, so each case shows its own problem
        digests = {k: hashlib.sha256(v).hexdigest() for k, v in members.items() if k != "json"}
        meta = {**json.loads(members["json"]), "digests": digests}
        members["json"] = json.dumps(meta).encode()
    return ShardSample(key=encoded.key, shard="wood-perlin-000000.tar", members=members)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"mask": None}, "missing member"),
        ({"mask": _png(np.full((SIZE, SIZE), 128, np.uint8))}, "values other than 0 and 255 (128)"),
        ({"mask": encode_png(np.ones((SIZE, SIZE + 2), bool))}, "differs from the image's"),
        ({"mask": _png(np.zeros((SIZE, SIZE, 3), np.uint8))}, "must be single-channel 8-bit"),
        ({"png": _png(np.zeros((SIZE, SIZE, 4), np.uint8))}, "must be HxWx3 uint8 RGB"),
        ({"png": b"\x89PNG\r\n\x1a\n garbage"}, "does not decode as PNG"),
        ({"json": b"{not json"}, "invalid JSON"),
        ({"json": b'{"key": "x"}'}, "invalid metadata"),
    ],
)
def test_check_sample_names_each_content_problem(changes: dict[str, bytes | None], needle: str) -> None:
    reasons, _ = check_sample(_members(**changes))
    assert any(needle in reason for reason in reasons), reasons


def test_check_sample_accepts_a_good_sample() -> None:
    reasons, meta = check_sample(_members())
    assert reasons == [] and meta is not None and meta["product"] == "wood"


# --- export ---------------------------------------------------------------------------------------


def read_keys_csv(product_dir: Path) -> list[dict[str, str]]:
    with (product_dir / "keys.csv").open() as handle:
        return list(csv.DictReader(handle))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_export_anomalib_folder_pairs_images_and_masks(written: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, samples = written
    result = export_anomalib_folder(root, tmp_path / "out")
    passed = [s for s in samples.values() if s.metadata.qc.passed]
    assert result.samples == len(passed) and set(result.products) == {"wood", "pill"}
    for product in ("wood", "pill"):
        base = tmp_path / "out" / product
        rows = read_keys_csv(base)
        assert sorted(r["key"] for r in rows) == sorted(s.key for s in passed if s.metadata.product == product)
        for row in rows:
            sample = samples[row["key"]]
            assert np.array_equal(read_png(base / row["file"]), sample.image)
            if sample.metadata.label == 0:
                assert row["file"].startswith("normal/") and row["mask"] == ""
                continue
            assert row["file"] == f"abnormal/{sample.metadata.defect_type}/{Path(row['file']).stem}.png"
            assert row["mask"] == f"mask/{sample.metadata.defect_type}/{Path(row['file']).stem}_mask.png"
            mask = read_png(base / row["mask"])
            assert mask.dtype == np.uint8 and np.array_equal(mask == 255, sample.mask)
        # anomalib's Folder sorts abnormal images and masks separately and pairs them by position
        images = sorted(str(p) for p in (base / "abnormal").rglob("*.png"))
        masks = sorted(str(p) for p in (base / "mask").rglob("*.png"))
        assert len(images) == len(masks) > 0
        for image, mask in zip(images, masks, strict=True):
            assert Path(image).stem in Path(mask).stem
            assert Path(image).parent.name == Path(mask).parent.name
    assert sorted(p.name for p in (tmp_path / "out/wood/normal").iterdir()) == ["000.png", "001.png", "002.png"]
    assert not (tmp_path / "out/pill/normal").exists()


def test_export_mvtec_tree_passes_the_project_readers(written: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, samples = written
    out = tmp_path / "mvtec"
    result = export_mvtec(root, out)
    assert result.counts["wood"] == {"train/good": 3, "test/crack": 6, "test/hole": 6}
    (wood,) = read_dataset(out, "mvtec", ["wood"])  # validates every image and mask
    assert len(wood.normals) == 3 and wood.defect_types == ["crack", "hole"]
    assert [r.stem for r in wood.defects_of("crack")] == [f"{i:03d}" for i in range(6)]
    # pill has no normals, so no train/good: a test-side tree, checked record by record
    assert not (out / "pill/train").exists()
    records = defect_records("pill", out / "pill", mvtec_masks)
    assert len(records) == sum(1 for s in samples.values() if s.metadata.product == "pill" and s.metadata.qc.passed)
    by_file = {r["file"]: samples[r["key"]] for r in read_keys_csv(out / "pill")}
    for record in records:
        item = load_item(record)
        sample = by_file[str(record.path.relative_to(out / "pill"))]
        assert np.array_equal(item.image, sample.image) and np.array_equal(item.gt_mask, sample.mask)
    # numbered in key order within each product and type
    crack = [r for r in read_keys_csv(out / "pill") if r["defect_type"] == "crack"]
    assert [r["key"] for r in sorted(crack, key=lambda r: r["file"])] == sorted(r["key"] for r in crack)


def test_export_filters(written: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, samples = written
    result = export_mvtec(root, tmp_path / "a", products=["pill"], defect_types=["crack"], qc_passed_only=False)
    expected = [s for s in samples.values() if s.metadata.product == "pill" and s.metadata.defect_type == "crack"]
    assert result.counts == {"pill": {"test/crack": len(expected)}}
    assert any(not s.metadata.qc.passed for s in expected)  # the rejected one came along
    with pytest.raises(ValueError, match="unknown product"):
        export_mvtec(root, tmp_path / "b", products=["nope"])


def test_export_refuses_a_non_empty_product_dir(written: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, _ = written
    (tmp_path / "out/pill").mkdir(parents=True)
    (tmp_path / "out/pill/old.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"{tmp_path / 'out/pill'}: output product directory is not empty"):
        export_anomalib_folder(root, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pill"]  # nothing else written


def test_export_reads_through_a_pyarrow_filesystem(written: tuple[Path, dict[str, Sample]], tmp_path: Path) -> None:
    root, _ = written
    filesystem = pafs.SubTreeFileSystem(str(root.parent), pafs.LocalFileSystem())
    result = export_mvtec("data", tmp_path / "out", products=["wood"], filesystem=filesystem)
    assert result.samples == 15 and (tmp_path / "out/wood/keys.csv").is_file()


def test_export_stops_on_a_corrupt_member(dataset: Path, tmp_path: Path) -> None:
    shard = sorted((dataset / "shards").glob("pill-*.tar"))[0]
    member = next(m for m in shard_members(shard) if m.name.endswith(".mask.png"))
    with shard.open("r+b") as handle:
        handle.seek(member.offset_data + 40)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ShardError, match=f"{shard.name}: sample {member.name.split('.')[0]}: mask.png differs"):
        export_mvtec(dataset, tmp_path / "out", qc_passed_only=False)
    assert not any((tmp_path / "out").iterdir())  # staging removed, nothing half-written left
