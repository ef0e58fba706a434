"""``bench/shards.py --quick`` runs end to end and ends with its JSON line (no timing is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "shards.py"
RATIOS = ("write_ratio_128", "read_ratio_128", "write_ratio_512", "read_ratio_512")


def quick_json(script: Path, *args: str) -> dict:
    """Run a bench script, check it exited 0, and return the JSON object of its last line."""
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_bench_quick_prints_json_last(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(RATIOS) <= set(summary)
    for size in (128, 512):
        assert summary[f"write_samples_per_s_{size}"] > 0
        assert summary[f"baseline_write_samples_per_s_{size}"] > 0
        assert summary[f"baseline_read_samples_per_s_{size}"] > 0
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up after itself


SAMPLING = Path(__file__).resolve().parents[1] / "bench" / "sampling.py"
SAMPLING_KEYS = ("ddim_vs_diffusers_ratio", "record_overhead", "reweight_overhead")


@pytest.mark.integration
def test_sampling_bench_quick_prints_json_last() -> None:
    run = subprocess.run(
        [sys.executable, str(SAMPLING), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(SAMPLING_KEYS) <= set(summary)
    for name in ("diffusers", "ours", "record", "reweight"):
        assert summary[f"ms_per_image_{name}"] > 0


DIFFUSIONAD = Path(__file__).resolve().parents[1] / "bench" / "diffusionad.py"


@pytest.mark.integration
def test_diffusionad_bench_quick_prints_json_last() -> None:
    run = subprocess.run(
        [sys.executable, str(DIFFUSIONAD), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"pixel_auroc_last", "pixel_ap_ratio_vs_demo_steps", "s_per_train_step"} <= set(summary)
    assert summary["s_per_train_step"] > 0 and summary["ms_per_test_image"] > 0


AAR = Path(__file__).resolve().parents[1] / "bench" / "aar.py"


@pytest.mark.integration
def test_aar_bench_quick_prints_json_last() -> None:
    run = subprocess.run(
        [sys.executable, str(AAR), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"off", "code", "latent", "paper", "real"}
    for variant in ("off", "code", "latent", "paper"):
        assert 0 < summary[variant]["ms_per_image"] < float("inf") and summary[variant]["samples"] > 0
        assert 0 <= summary[variant]["coverage"] <= 1 and 0 <= summary[variant]["alignment"] <= 1
    assert summary["off"]["peak_weight"] == 1.0, "without AAR there is no map"
    assert 1.0 <= summary["code"]["peak_weight"] <= 1.5, "the authors' clamp"
    assert summary["latent"]["peak_weight"] > 1.0, "unclamped, a map averaging 1 over the mask peaks above it"


BASE_DEFECTS = Path(__file__).resolve().parents[1] / "bench" / "base_defects.py"
BASE_KEYS = {
    "contrast_kept", "contrast_kept_by_type", "mask_iou_by_type", "mask_binary_share", "finetune", "seconds",
}  # fmt: skip


@pytest.mark.integration
def test_base_defects_bench_quick_prints_json_last(tmp_path: Path) -> None:
    prior = ["--set", "diffusion.tiny.prior_marks=0.3", "--set", "diffusion.tiny.prior_shapes=0.15"]
    run = subprocess.run(
        [sys.executable, str(BASE_DEFECTS), "--quick", *prior, "--out", str(tmp_path / "samples.png")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) >= BASE_KEYS
    assert all({"step", "contrast_ratio", "appearance_distance"} <= set(row) for row in summary["finetune"])


@pytest.mark.integration
def test_base_prompts_bench_quick_prints_json_last() -> None:
    (row,) = quick_json(BENCH.parent / "base_prompts.py", "--quick", "--samples", "2").values()
    assert set(row["prompt_effect"]) == {"black_spot/white_spot", "product/black_spot"}
    assert all(-1 <= v <= 1 for v in row["word_similarity"].values()) and len(row["colour_hits"]) == 12
    assert row["colour_hit_rate"] == pytest.approx(sum(row["colour_hits"].values()) / 12)
    assert -1 <= row["paint_lightness"] <= 1


@pytest.mark.integration
def test_vae_capacity_bench_quick_prints_json_last() -> None:
    result = quick_json(BENCH.parent / "vae_capacity.py", "--quick")
    assert [c["step"] for c in result["checkpoints"]] == [1, 2] and "crack" in result["checkpoints"][0]["by_type"]
    corners = next(iter(result["checkpoints"][0]["normals"].values()))["corner_error"]
    assert set(corners) == {"top-left", "top-right", "bottom-left", "bottom-right", "inside"}


def test_latent_factor_bench_quick_prints_json_last() -> None:
    result = quick_json(BENCH.parent / "latent_factor.py", "--resolution", "32", "--repeats", "1")
    assert {"vae_step_ratio", "unet_step_ratio"} <= set(result)


@pytest.mark.integration
def test_batch_norm_bench_quick_prints_paired_scores_last() -> None:
    result = quick_json(BENCH.parent / "batch_norm.py", "--quick")
    checkpoints = [c for run in result["runs"] for c in run["checkpoints"]]
    assert [c["step"] for c in checkpoints] == [2, 4, 2, 4]
    assert all(0 <= c[key] <= 1 for c in checkpoints for key in ("val_running", "test_recomputed"))


@pytest.mark.integration
def test_tier_detector_bench_quick_prints_the_curve_last() -> None:
    result = quick_json(BENCH.parent / "tier_detector.py", "--quick")
    (run,) = result["runs"]
    assert list(run["curve"]) == ["2", "4"] and run["selected_step"] in (2, 4)
    assert all(0 <= point[key] <= 1 for point in run["curve"].values() for key in ("val_pixel_ap", "test_pixel_ap"))
    assert {"noise_loss", "mask_loss"} <= set(run["selected"]), "DiffusionAD's two loss terms are reported"


@pytest.mark.integration
def test_detector_spread_bench_quick_gives_each_score_a_mean_and_spread() -> None:
    result = quick_json(
        BENCH.parent / "detector_spread.py", "--quick", "evaluate.weight_average=0.5", "--seeds", "0", "1"
    )
    assert result["seeds"] == [0, 1] and result["overrides"] == ["evaluate.weight_average=0.5"]
    for score in ("test_pixel_ap", "test_type_mean"):
        assert 0 <= result["over_products"][score]["mean"] <= 1 and result["over_products"][score]["std"] >= 0


@pytest.mark.integration
def test_cadiff_intensity_bench_quick_sweeps_every_level(tmp_path: Path) -> None:
    result = quick_json(BENCH.parent / "cadiff_intensity.py", "--quick", "--out", str(tmp_path))
    assert list(result["levels"]) == ["-1.0", "0.0", "0.5", "1.0", "1.5", "2.0"]
    assert all(0 <= level["in_mask_change"] <= 1 for level in result["levels"].values())
    assert isinstance(result["monotonic"], bool) and (tmp_path / "cadiff_intensity_wood.png").is_file()


GPU_SCALE = Path(__file__).resolve().parents[1] / "bench" / "gpu_scale.py"


@pytest.mark.integration
def test_gpu_scale_bench_quick_runs_every_section(tmp_path: Path) -> None:
    summary = quick_json(GPU_SCALE, "--quick", "--out", str(tmp_path))
    for section in ("load", "sampling", "controlnet", "anomalydiffusion", "diffusionad"):
        assert "error" not in summary[section], summary[section].get("trace")
    assert summary["anomalydiffusion"]["samples"] == 2
    assert (tmp_path / "gpu_scale.json").is_file() and (tmp_path / "anomalydiffusion_sd_scale.png").is_file()
