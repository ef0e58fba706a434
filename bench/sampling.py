"""Sampling speed: the project's DDIM loop against diffusers' ``StableDiffusionPipeline``, and attention control's cost.

Four timed runs per repeat, on one tiny latent diffusion model (random weights: speed does not
depend on them), the same prompt embeddings, steps, guidance scale and batch, VAE decode included:

* diffusers: ``StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...)`` with the
  model's ``DDIMScheduler``, ``output_type="pt"``;
* ours: ``denoise`` (``DDIMSampler``, guidance on the doubled batch) then ``decode_latents``;
* ours + recording: the same with an ``AttentionControl`` recording the conditional half's maps of
  four tokens at every cross-attention layer of the middle resolution, every step (what SeaS's
  DA loss and CADiff's gate read);
* ours + re-weighting: the same with AnomalyDiffusion's spatial re-weighting on every
  cross-attention layer at every step, its weight map updated after each step from the x0 prediction.

Runs are interleaved per repeat. Each ratio is the median over repeats of the two runs' times in
the same repeat (a shared machine's speed drifts over minutes): ``ddim_vs_diffusers_ratio`` =
ours / diffusers (goal <= 1.05); ``record_overhead`` and ``reweight_overhead`` = controlled / plain
ours (goal <= 1.15); ``ms_per_image_<run>`` is each run's best; the ``cpu_*`` keys are the same
ratios from this process's CPU time. One torch thread. The last line is one JSON object.

Usage:
    .venv/bin/python bench/sampling.py            # the real figures (about two minutes)
    .venv/bin/python bench/sampling.py --quick    # seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from defectsynth.diffusion.attention import AttentionControl, Select, installed
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.sampling import denoise, generators_from_seeds, initial_noise
from defectsynth.diffusion.settings import TinyModelSettings

GUIDANCE = 5.0
PROMPT = "a photo of wood with a crack"


def build_model(resolution: int) -> DiffusionModel:
    """The default tiny model (random weights) at ``resolution``."""
    return build_tiny(TinyModelSettings(), resolution=resolution, words=["wood"], seed=0)


def ours(model: DiffusionModel, cond: torch.Tensor, uncond: torch.Tensor, steps: int, batch: int, control=None):
    """Our loop: seeded noise, DDIM with guidance, decode."""
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(steps)
    latents = initial_noise(model.latent_shape, generators_from_seeds(range(batch)))
    on_step = None
    if control is not None and control.reweights:
        side = model.latent_shape[-1]

        def on_step(index: int, timestep: int, latents: torch.Tensor, pred_x0: torch.Tensor) -> None:
            distance = (pred_x0 - latents).pow(2).mean(dim=1, keepdim=True).clamp_min(1e-6)
            weight = (1.0 / distance).flatten(1).softmax(dim=-1).view_as(distance) * side * side  # mean 1 per image
            control.set_weight_map(weight.reshape(batch, 1, side, side))

    latents = denoise(
        model, latents, cond, sampler=sampler, uncond=uncond, guidance_scale=GUIDANCE, control=control, on_step=on_step
    )
    return model.decode_latents(latents)


def diffusers_pipeline(
    model: DiffusionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    batch: int,
    guidance: float = GUIDANCE,
):
    """diffusers' own pipeline on the same parts and inputs, at the model's resolution."""
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt_embeds=cond.expand(batch, -1, -1),
        negative_prompt_embeds=uncond.expand(batch, -1, -1),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators_from_seeds(range(batch)),
        height=model.resolution,
        width=model.resolution,
        output_type="pt",
    ).images


def recording_control(model: DiffusionModel) -> AttentionControl:
    """Record 4 tokens' maps (conditional half) at the middle attention resolution, every step."""
    side = model.latent_shape[-1] // 2
    control = AttentionControl()
    control.record(Select(resolutions={side}, batch="cond"), tokens=[1, 2, 3, 4])
    return control


def reweighting_control(model: DiffusionModel, batch: int) -> AttentionControl:
    """AnomalyDiffusion's spatial re-weighting on every cross-attention layer, every step."""
    side = model.latent_shape[-1]
    control = AttentionControl()
    control.reweight(torch.ones(batch, 1, side, side))
    return control


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over repeats of one run's time over the other's from the same repeat (robust to drift)."""
    return round(statistics.median(a / b for a, b in zip(numerator, denominator, strict=True)), 3)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64, help="the demo's resolution")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.steps, args.batch, args.repeats = 32, 2, 2, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = build_model(args.resolution)
    with torch.no_grad():
        cond, uncond = model.encode_prompt([PROMPT]), model.encode_prompt([""])
    runs: dict[str, Callable[[], object]] = {
        "diffusers": lambda: diffusers_pipeline(model, cond, uncond, args.steps, args.batch),
        "ours": lambda: ours(model, cond, uncond, args.steps, args.batch),
    }
    record, reweight = recording_control(model), reweighting_control(model, args.batch)

    def with_control(control: AttentionControl) -> Callable[[], object]:
        def run() -> object:
            control.reset()  # recorded maps of the previous run are dropped, as a generator would
            with installed(model.unet, control):
                return ours(model, cond, uncond, args.steps, args.batch, control)

        return run

    runs["record"], runs["reweight"] = with_control(record), with_control(reweight)
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                wall, cpu = timed(run)
                walls[name].append(wall)
                cpus[name].append(cpu)
    per_image = {name: min(seconds) / args.batch * 1000 for name, seconds in walls.items()}
    summary = {
        "ddim_vs_diffusers_ratio": paired_ratio(walls["ours"], walls["diffusers"]),
        "record_overhead": paired_ratio(walls["record"], walls["ours"]),
        "reweight_overhead": paired_ratio(walls["reweight"], walls["ours"]),
        "cpu_ddim_vs_diffusers_ratio": paired_ratio(cpus["ours"], cpus["diffusers"]),
        "cpu_record_overhead": paired_ratio(cpus["record"], cpus["ours"]),
        "cpu_reweight_overhead": paired_ratio(cpus["reweight"], cpus["ours"]),
        **{f"ms_per_image_{name}": round(ms, 2) for name, ms in per_image.items()},
        "resolution": args.resolution,
        "latent_side": model.latent_shape[-1],
        "steps": args.steps,
        "batch": args.batch,
        "guidance_scale": GUIDANCE,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
