"""Imports run one way only, from the top layer down: the import-linter contracts of pyproject.toml."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(source: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the package under ``source`` with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=source,
        env=env,
        timeout=300,
        check=False,
    )


def test_the_package_keeps_its_layers():
    run = lint_imports(ROOT / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_an_import_that_runs_back_up_or_across_breaks_the_contracts(tmp_path: Path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "defectsynth", source / "defectsynth", ignore=shutil.ignore_patterns("__pycache__"))
    resize = source / "defectsynth" / "core" / "resize.py"
    # a function-level import counts as much as one at the top of a module
    resize.write_text(resize.read_text() + "\n\ndef _config():\n    from defectsynth.platform import config\n")
    masks = source / "defectsynth" / "generators" / "masks.py"
    masks.write_text(masks.read_text() + "\nfrom defectsynth.evaluation import metrics\n")
    run = lint_imports(source)
    assert run.returncode != 0
    assert "defectsynth.core.resize -> defectsynth.platform.config" in run.stdout
    assert "Generators and evaluation are independent siblings BROKEN" in run.stdout
    assert "2 broken" in run.stdout


def test_base_models_registered_before_the_move_still_unpickle():
    from defectsynth.diffusion.tracking import BaseDiffusionModel

    # what MLflow's pickle of a pre-move defectsynth-base-tiny names: the class by its old module path
    old_reference = b"cdefectsynth.generators.diffusion.tracking\nBaseDiffusionModel\n."
    assert pickle.loads(old_reference) is BaseDiffusionModel


def test_the_worker_modules_of_baselines_and_detectors_leave_diffusers_unloaded():
    # every Ray worker of a generation pool or a fit imports its job module afresh: diffusers costs ~5 s each
    jobs = "defectsynth.jobs.generate, defectsynth.jobs.evaluate, defectsynth.jobs.finetune"
    probe = f"import sys, {jobs}; print('diffusers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False", "a module these jobs import at the top now imports diffusers"
