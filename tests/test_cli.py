"""The ``defectsynth`` console script, run as a user runs it (subprocesses of the installed script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from defectsynth.cli import main

SCRIPT = Path(sys.executable).parent / "defectsynth"
SMALL = ["--size", "32", "--train-good", "4", "--test-good", "2", "--per-defect", "3"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = run("data", "make-demo", "--out", str(out), *SMALL, "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 demo product(s)" in result.stdout
    return out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "make, inspect and convert datasets"),
        (["data"], "make-demo"),
        (["data", "make-demo"], "Deterministic for a seed"),
        (["data", "inspect"], "few-shot split"),
        (["data", "convert-visa"], "MVTec AD tree"),
        (["demo"], "run the pipeline on Ray"),
    ],
)
def test_help_explains_each_command(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    assert needle in " ".join(capsys.readouterr().out.split())


def test_make_demo_then_inspect(demo_root: Path) -> None:
    assert (demo_root / "contact_sheet.png").is_file()
    result = run("data", "inspect", str(demo_root))
    assert result.returncode == 0, result.stderr
    for product in ("fabric", "wood", "washer", "pill"):
        assert f"\n{product}  (mvtec" in result.stdout
    assert "split protocol third" in result.stdout
    assert "generator train (ids)" in result.stdout
    assert "1: 000" in result.stdout  # ceil(3 / 3) = 1 training image per type: the lowest id
    assert "checking fabric" in result.stderr  # the progress bar


def test_inspect_kshot(demo_root: Path) -> None:
    result = run("data", "inspect", str(demo_root), "--protocol", "kshot", "--k", "2", "--products", "pill")
    assert result.returncode == 0, result.stderr
    assert "split protocol kshot (k=2)" in result.stdout and "2: 000, 001" in result.stdout


def test_inspect_names_the_bad_file(demo_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(demo_root), str(broken)], check=True)
    mask = broken / "wood/ground_truth/crack/001_mask.png"
    mask.unlink()
    result = run("data", "inspect", str(broken))
    assert result.returncode == 2
    assert f"error: {mask}: missing mask for test/crack/001.png" in result.stderr
    assert "Traceback" not in result.stderr


def test_make_demo_refuses_bad_values(tmp_path: Path) -> None:
    result = run("data", "make-demo", "--out", str(tmp_path / "d"), "--size", "8")
    assert result.returncode == 2 and "size" in result.stderr and "Traceback" not in result.stderr


def test_demo_command_reports_config_errors(tmp_path: Path) -> None:
    result = run("demo", "--set", "data.resolution=100", cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert "data.resolution: Value error, must be a multiple of 8" in result.stderr


# --- defectsynth shards inspect | verify | export ---------------------------------------------------


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defectsynth.storage.dataset_writer import DatasetWriter
    from helpers.samples import make_sample

    root = tmp_path_factory.mktemp("shards") / "data"
    with DatasetWriter(root, maxcount=5) as writer:
        for index in range(20):
            writer.write(make_sample(index, size=24))
    return root


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["shards"], "Inspect, verify and export generated datasets"),
        (["shards", "inspect"], "mask_area quartiles"),
        (["shards", "verify"], "0 when everything is intact, 1 when problems were found, 2 on a usage error"),
        (["shards", "export"], "normal_dir='normal', abnormal_dir='abnormal', mask_dir='mask'"),
    ],
)
def test_help_explains_shards_commands(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    assert needle in " ".join(capsys.readouterr().out.split())


def test_shards_inspect(shard_root: Path) -> None:
    result = run("shards", "inspect", str(shard_root))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "samples 20, qc rejected 3" in out and "4 shard(s)" in out and "digest " in out
    assert "wood     crack    7" in out and "wood-perlin-000003.tar  5" in out
    assert "perlin" in out and "intensity: 0." in out and "mask_area (anomalous, pixels)" in out
    assert "qc rejected: 3 of 20" in out


def test_shards_verify_exit_codes(shard_root: Path, tmp_path: Path) -> None:
    result = run("shards", "verify", str(shard_root))
    assert result.returncode == 0, result.stderr
    assert "OK: every manifest row" in result.stdout

    import shutil

    broken = Path(shutil.copytree(shard_root, tmp_path / "broken"))
    shard = broken / "shards" / "wood-perlin-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run("shards", "verify", str(broken))
    assert result.returncode == 1, result.stderr
    assert "1 corrupt shard" in result.stdout and "5 missing" in result.stdout
    assert "wood-perlin-000001.tar" in result.stdout

    result = run("shards", "verify", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "no such dataset directory" in result.stderr and "Traceback" not in result.stderr


def test_shards_export_both_formats(shard_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mvtec"
    result = run("shards", "export", "--format", "mvtec", str(shard_root), str(out))
    assert result.returncode == 0, result.stderr
    assert "exported 17 sample(s)" in result.stdout
    assert (out / "wood/test/crack/000.png").is_file() and (out / "wood/ground_truth/crack/000_mask.png").is_file()
    assert (out / "wood/keys.csv").is_file()

    out = tmp_path / "folder"
    args = ["--products", "wood", "--defect-types", "hole,scratch", "--include-rejected"]
    result = run("shards", "export", "--format", "anomalib-folder", str(shard_root), str(out), *args)
    assert result.returncode == 0, result.stderr
    images = sorted(p.relative_to(out).as_posix() for p in (out / "wood/abnormal").rglob("*.png"))
    masks = sorted(p.relative_to(out).as_posix() for p in (out / "wood/mask").rglob("*.png"))
    assert len(images) == len(masks) == 13 and images[0] == "wood/abnormal/hole/000.png"
    assert masks[0] == "wood/mask/hole/000_mask.png"

    result = run("shards", "export", "--format", "anomalib-folder", str(shard_root), str(out))
    assert result.returncode == 2
    assert f"{out / 'wood'}: output product directory is not empty" in result.stderr
