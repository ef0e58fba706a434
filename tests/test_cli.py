"""The ``defectsynth`` console script, run as a user runs it (subprocesses of the installed script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from defectsynth.platform.cli import main

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
        (["demo"], "split manifest"),
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


def test_demo_command_writes_config_and_split(demo_root: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    result = run(
        "demo",
        "--config",
        str(Path(__file__).parents[1] / "configs/demo.yaml"),
        "--set",
        f"data.root={demo_root}",
        "--set",
        f"workdir={workdir}",
        "--set",
        "products=[washer]",
    )
    assert result.returncode == 0, result.stderr
    assert "# resolved config" in result.stdout and "Not built yet" in result.stdout
    assert (workdir / "config.resolved.yaml").is_file()
    split = json.loads((workdir / "split.json").read_text())
    assert list(split["products"]) == ["washer"]


def test_demo_command_reports_config_errors(tmp_path: Path) -> None:
    result = run("demo", "--set", "data.resolution=100", cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert "data.resolution: Value error, must be a multiple of 8" in result.stderr
