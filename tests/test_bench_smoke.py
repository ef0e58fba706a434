"""Each bench script's ``--quick`` run ends with its JSON line (no timing is checked).

The quick runs are separate processes, mostly single-threaded imports and tiny loops: the module starts the
selected ones two at a time (the runner's two cores) and each test waits for its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
AT_ONCE = 2
OUT = "{out}"  # replaced by a fresh directory of the run
QUICK: dict[str, tuple[str, ...]] = {  # bench name -> the script and its arguments
    "shards": ("shards.py", "--quick", "--dir", OUT),
    "sampling": ("sampling.py", "--quick"),
    "diffusionad": ("diffusionad.py", "--quick"),
    "aar": ("aar.py", "--quick"),
    "base_defects": (
        "base_defects.py", "--quick", "--set", "diffusion.tiny.prior_marks=0.3", "--set",
        "diffusion.tiny.prior_shapes=0.15", "--out", f"{OUT}/samples.png",
    ),
    "base_prompts": ("base_prompts.py", "--quick", "--samples", "2"),
    "vae_capacity": ("vae_capacity.py", "--quick"),
    "latent_factor": ("latent_factor.py", "--resolution", "32", "--repeats", "1"),
    "batch_norm": ("batch_norm.py", "--quick"),
    "tier_detector": ("tier_detector.py", "--quick"),
    "detector_spread": ("detector_spread.py", "--quick", "evaluate.weight_average=0.5", "--seeds", "0", "1"),
    "cadiff_intensity": ("cadiff_intensity.py", "--quick", "--out", OUT),
    "cadiff_control": ("cadiff_control.py", "--quick"),
    "base_attention": ("base_attention.py", "--quick", "--timesteps", "500"),
    "gpu_scale": ("gpu_scale.py", "--quick", "--out", OUT),
}  # fmt: skip
RATIOS = ("write_ratio_128", "read_ratio_128", "write_ratio_512", "read_ratio_512")
SAMPLING_KEYS = ("ddim_vs_diffusers_ratio", "record_overhead", "reweight_overhead")
BASE_KEYS = {
    "contrast_kept", "contrast_kept_by_type", "mask_iou_by_type", "mask_binary_share", "finetune", "seconds",
}  # fmt: skip


def run_quick(name: str, out: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run bench ``name``'s quick command with ``out`` as its output directory; the process and ``out``."""
    script, *args = QUICK[name]
    command = [sys.executable, str(BENCH_DIR / script), *(a.replace(OUT, str(out)) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False), out


@pytest.fixture(scope="module")
def quick(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """The quick runs of the benches the session's selected tests name (``@pytest.mark.bench``), AT_ONCE at a time."""
    names = sorted({m.args[0] for item in request.session.items for m in item.iter_markers("bench")})
    with ThreadPoolExecutor(AT_ONCE) as pool:
        runs = {name: pool.submit(run_quick, name, tmp_path_factory.mktemp(name)) for name in names}
        yield runs
        for run in runs.values():
            run.cancel()


def summary_of(quick: dict[str, Future], name: str) -> tuple[dict, Path]:
    """Wait for bench ``name``'s quick run and check it exited 0: its last line's JSON object and its directory."""
    run, out = quick[name].result()
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), out


@pytest.mark.bench("shards")
def test_shards_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    summary, out = summary_of(quick, "shards")
    assert set(RATIOS) <= set(summary)
    for size in (128, 512):
        assert summary[f"write_samples_per_s_{size}"] > 0
        assert summary[f"baseline_write_samples_per_s_{size}"] > 0
        assert summary[f"baseline_read_samples_per_s_{size}"] > 0
    assert list(out.iterdir()) == []  # the benchmark cleans up after itself


@pytest.mark.bench("sampling")
def test_sampling_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    summary, _ = summary_of(quick, "sampling")
    assert set(SAMPLING_KEYS) <= set(summary)
    for name in ("diffusers", "ours", "record", "reweight"):
        assert summary[f"ms_per_image_{name}"] > 0


@pytest.mark.bench("diffusionad")
def test_diffusionad_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    summary, _ = summary_of(quick, "diffusionad")
    assert {"pixel_auroc_last", "pixel_ap_ratio_vs_demo_steps", "s_per_train_step"} <= set(summary)
    assert summary["s_per_train_step"] > 0 and summary["ms_per_test_image"] > 0


@pytest.mark.bench("aar")
def test_aar_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    summary, _ = summary_of(quick, "aar")
    assert set(summary) >= {"off", "code", "latent", "paper", "real"}
    for variant in ("off", "code", "latent", "paper"):
        assert 0 < summary[variant]["ms_per_image"] < float("inf") and summary[variant]["samples"] > 0
        assert 0 <= summary[variant]["coverage"] <= 1 and 0 <= summary[variant]["alignment"] <= 1
    assert summary["off"]["peak_weight"] == 1.0, "without AAR there is no map"
    assert 1.0 <= summary["code"]["peak_weight"] <= 1.5, "the authors' clamp"
    assert summary["latent"]["peak_weight"] > 1.0, "unclamped, a map averaging 1 over the mask peaks above it"


@pytest.mark.bench("base_defects")
def test_base_defects_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    summary, _ = summary_of(quick, "base_defects")
    assert set(summary) >= BASE_KEYS
    assert all({"step", "contrast_ratio", "appearance_distance"} <= set(row) for row in summary["finetune"])


@pytest.mark.bench("base_prompts")
def test_base_prompts_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    (row,) = summary_of(quick, "base_prompts")[0].values()
    assert set(row["prompt_effect"]) == {"black_spot/white_spot", "product/black_spot"}
    assert all(-1 <= v <= 1 for v in row["word_similarity"].values()) and len(row["colour_hits"]) == 12
    assert row["colour_hit_rate"] == pytest.approx(sum(row["colour_hits"].values()) / 12)
    assert -1 <= row["paint_lightness"] <= 1


@pytest.mark.bench("vae_capacity")
def test_vae_capacity_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    result, _ = summary_of(quick, "vae_capacity")
    assert [c["step"] for c in result["checkpoints"]] == [1, 2] and "crack" in result["checkpoints"][0]["by_type"]
    corners = next(iter(result["checkpoints"][0]["normals"].values()))["corner_error"]
    assert set(corners) == {"top-left", "top-right", "bottom-left", "bottom-right", "inside"}


@pytest.mark.bench("latent_factor")
def test_latent_factor_bench_quick_prints_json_last(quick: dict[str, Future]) -> None:
    result, _ = summary_of(quick, "latent_factor")
    assert {"vae_step_ratio", "unet_step_ratio"} <= set(result)


@pytest.mark.bench("batch_norm")
def test_batch_norm_bench_quick_prints_paired_scores_last(quick: dict[str, Future]) -> None:
    result, _ = summary_of(quick, "batch_norm")
    checkpoints = [c for run in result["runs"] for c in run["checkpoints"]]
    assert [c["step"] for c in checkpoints] == [2, 4, 2, 4]
    assert all(0 <= c[key] <= 1 for c in checkpoints for key in ("val_running", "test_recomputed"))


@pytest.mark.bench("tier_detector")
def test_tier_detector_bench_quick_prints_the_curve_last(quick: dict[str, Future]) -> None:
    (run,) = summary_of(quick, "tier_detector")[0]["runs"]
    assert list(run["curve"]) == ["2", "4"] and run["selected_step"] in (2, 4)
    assert all(0 <= point[key] <= 1 for point in run["curve"].values() for key in ("val_pixel_ap", "test_pixel_ap"))
    assert {"noise_loss", "mask_loss"} <= set(run["selected"]), "DiffusionAD's two loss terms are reported"


@pytest.mark.bench("detector_spread")
def test_detector_spread_bench_quick_gives_each_score_a_mean_and_spread(quick: dict[str, Future]) -> None:
    result, _ = summary_of(quick, "detector_spread")
    assert result["seeds"] == [0, 1] and result["overrides"] == ["evaluate.weight_average=0.5"]
    for score in ("test_pixel_ap", "test_type_mean"):
        assert 0 <= result["over_products"][score]["mean"] <= 1 and result["over_products"][score]["std"] >= 0


@pytest.mark.bench("cadiff_intensity")
def test_cadiff_intensity_bench_quick_sweeps_every_level(quick: dict[str, Future]) -> None:
    result, out = summary_of(quick, "cadiff_intensity")
    assert list(result["levels"]) == ["-1.0", "0.0", "0.5", "1.0", "1.5", "2.0"]
    assert all(0 <= level["in_mask_change"] <= 1 for level in result["levels"].values())
    assert isinstance(result["monotonic"], bool) and (out / "cadiff_intensity_wood.png").is_file()


@pytest.mark.bench("cadiff_control")
def test_cadiff_control_bench_quick_measures_the_controlnet_and_the_tokens(quick: dict[str, Future]) -> None:
    result, _ = summary_of(quick, "cadiff_control")
    assert 0 <= result["controlnet_change"] <= 1 and 0 <= result["controlnet_focus_change"] <= 1
    assert "uniform" in result["token_probability"] and len(result["token_probability"]) > 1


@pytest.mark.bench("base_attention")
def test_base_attention_bench_quick_measures_the_spread_and_the_mark_words(quick: dict[str, Future]) -> None:
    result, _ = summary_of(quick, "base_attention")
    measures = result["500"]
    assert 0 < measures["entropy"] <= 1 and measures["uniform"] <= measures["max"] <= 1
    assert measures["words_inside"] > 0 and measures["words_ratio"] > 0


@pytest.mark.bench("gpu_scale")
def test_gpu_scale_bench_quick_runs_every_section(quick: dict[str, Future]) -> None:
    summary, out = summary_of(quick, "gpu_scale")
    for section in ("load", "sampling", "controlnet", "anomalydiffusion", "diffusionad"):
        assert "error" not in summary[section], summary[section].get("trace")
    assert summary["anomalydiffusion"]["samples"] == 2
    assert (out / "gpu_scale.json").is_file() and (out / "anomalydiffusion_sd_scale.png").is_file()
