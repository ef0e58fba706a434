"""Stable Diffusion scale on a GPU: the loader, the sampler, anomalydiffusion and DiffusionAD at SD-1.5 sizes.

No weights can be downloaded, so the base is a randomly initialised model of Stable Diffusion 1.5's
architecture (U-Net 320-640-1280-1280 with 768-wide cross-attention, VAE 128-256-512-512, a 12-layer
CLIP text encoder over the offline tokenizer). Speed and memory do not depend on the weights; what the
samples look like does, so the sheet shows only that the whole path runs. Sections, each recorded on
its own (an error is recorded as that section's result and the others still run):

1. ``load``: the model written in diffusers' layout and read back with ``load_base_model``;
2. ``sampling``: our loop (``denoise`` + decode) against diffusers' ``StableDiffusionPipeline`` on the
   same parts, in bf16, 25 DDIM steps, guidance 7.5, at 256 and 512 px; ``ratio`` is ours / diffusers,
   the median of the per-repeat ratios;
3. ``anomalydiffusion``: ``fit`` (e_a and E, then e_m per type) and ``generate`` on demo wood at 256 px,
   float32, through the generator's own code (one process, no Ray: Ray is not on the GPU machine);
4. ``controlnet``: a ControlNet copied from that U-Net as the model's extra part: saved and loaded back in
   diffusers' layout, sampling through ``ControlNetPredictor`` against the plain U-Net (bf16, 512 px, batch 8;
   ``overhead`` = ControlNet / plain, paired per repeat), and seconds per training step of the ControlNet
   alone (AdamW, batch 4, bf16 autocast, the base frozen), what CADiff will train;
5. ``diffusionad``: ``DiffusionADConfig.paper()`` at 256 px: seconds per training step and ms per test image.

Usage (the GPU machine has torch; diffusers and pydantic travel as wheels, see bench/README.md):
    python bench/gpu_scale.py --out OUT_DIR
    python bench/gpu_scale.py --out OUT_DIR --quick    # CPU, tiny sizes, seconds: the smoke test
The last line printed is one JSON object, also written to OUT_DIR/gpu_scale.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from sampling import diffusers_pipeline  # bench/sampling.py, next to this script
from transformers import CLIPTextConfig, CLIPTextModel

from defectsynth.core.figures import sample_grid
from defectsynth.diffusion.controlnet import PART, ControlNetPredictor, mask_image, new_controlnet
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.model import DiffusionModel, stable_diffusion_schedule
from defectsynth.diffusion.sampling import denoise, generators_from_seeds, initial_noise
from defectsynth.diffusion.tokenizer import build_offline_tokenizer
from defectsynth.evaluation.data import load_real
from defectsynth.evaluation.detectors import DetectorContext, DiffusionADDetector
from defectsynth.evaluation.settings import DiffusionADConfig
from defectsynth.generators.base import FitContext, Request, build_generator
from defectsynth.storage.demo import write_demo
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import ProductSplit, SplitSettings, split_product

SD15 = {"unet": (320, 640, 1280, 1280), "vae": (128, 256, 512, 512), "text": (768, 12, 12, 3072), "heads": 8}
QUICK = {"unet": (32, 64), "vae": (32, 64), "text": (32, 2, 2, 64), "heads": 4}
GUIDANCE = 7.5
PROMPT = "a photo of wood with a crack"


def build_base(sizes: dict[str, Any], resolution: int) -> DiffusionModel:
    """A randomly initialised model of SD-1.5's architecture (or the quick sizes) at ``resolution``."""
    torch.manual_seed(0)
    tokenizer = build_offline_tokenizer(["wood"], max_length=77)
    width, layers, heads, ffn = sizes["text"]
    vae_widths, unet_widths = sizes["vae"], sizes["unet"]
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(vae_widths),
        block_out_channels=vae_widths,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=0.18215,
    )
    scale = 2 ** (len(vae_widths) - 1)
    unet = UNet2DConditionModel(
        sample_size=resolution // scale,
        down_block_types=("CrossAttnDownBlock2D",) * (len(unet_widths) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(unet_widths) - 1),
        block_out_channels=unet_widths,
        layers_per_block=2,
        cross_attention_dim=width,
        attention_head_dim=sizes["heads"],
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return DiffusionModel.from_parts(
        vae=vae, unet=unet, text_encoder=text, tokenizer=tokenizer, scheduler=stable_diffusion_schedule()
    )


def synchronize() -> None:
    """Wait for queued GPU work, so wall times cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run: Callable[[], object]) -> float:
    """Wall seconds of one call, GPU work included."""
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - started


def peak_gib() -> float | None:
    """Peak GPU memory since the last reset, GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    """Start a new peak-memory window."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def section_load(base_dir: Path, resolution: int) -> tuple[dict[str, Any], DiffusionModel]:
    """Read the saved base back through the project's loader."""
    started = time.perf_counter()
    model = load_base_model(str(base_dir))
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.unet.parameters())
    figures = {"seconds": round(seconds, 1), "unet_params_m": round(params / 1e6, 1), "resolution": model.resolution}
    return figures, model


def ours(
    model: DiffusionModel, cond: torch.Tensor, uncond: torch.Tensor, steps: int, batch: int, predictor=None
) -> torch.Tensor:
    """Our loop: seeded noise on the model's device, DDIM with guidance (through ``predictor`` if given), decode."""
    sampler = DDIMSampler.from_model(model)
    sampler.set_timesteps(steps)
    latents = initial_noise(model.latent_shape, generators_from_seeds(range(batch)), device=model.device)
    extra = {"predictor": predictor} if predictor is not None else {}
    latents = denoise(model, latents, cond, sampler=sampler, uncond=uncond, guidance_scale=GUIDANCE, **extra)
    return model.decode_latents(latents)


@torch.no_grad()
def section_sampling(model: DiffusionModel, resolutions: list[int], batch: int, steps: int, repeats: int) -> dict:
    """ms per image of both loops in bf16 at each resolution, and their paired ratio."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model.to(model.device, dtype)
    cond, uncond = model.encode_prompt([PROMPT]), model.encode_prompt([""])
    out = {}
    for resolution in resolutions:
        model.resolution = resolution
        runs = {
            "ours": lambda: ours(model, cond, uncond, steps, batch),
            "diffusers": lambda: diffusers_pipeline(model, cond, uncond, steps, batch, GUIDANCE),
        }
        for run in runs.values():
            run()  # warm-up: kernels, cuDNN autotuning
        times: dict[str, list[float]] = {name: [] for name in runs}
        reset_peak()
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(timed(run))
        out[str(resolution)] = {
            **{f"ms_per_image_{name}": round(1000 * min(t) / batch, 1) for name, t in times.items()},
            "ratio_ours_vs_diffusers": round(
                statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)), 3
            ),
            "peak_gib": peak_gib(),
        }
    model.to(model.device, torch.float32)
    return {"batch": batch, "steps": steps, "repeats": repeats, "dtype": str(dtype), "by_resolution": out}


def section_controlnet(model: DiffusionModel, work: Path, batch: int, steps: int, repeats: int) -> dict:
    """A ControlNet part: diffusers-layout round trip, sampling overhead and training step."""
    model.resolution = 512 if torch.cuda.is_available() else model.resolution
    model.parts[PART] = new_controlnet(model)
    started = time.perf_counter()
    model.save(work / "with_controlnet")
    reloaded = load_base_model(str(work / "with_controlnet"))
    round_trip = time.perf_counter() - started
    same = all(
        torch.equal(a.cpu(), b)
        for a, b in zip(model.part(PART).state_dict().values(), reloaded.part(PART).state_dict().values(), strict=True)
    )
    del reloaded
    side = model.resolution
    masks = torch.zeros(batch, 1, side, side, device=model.device)
    masks[:, :, side // 4 : side // 2, side // 4 : side // 2] = 1
    predictor = ControlNetPredictor(image=mask_image(masks))
    controlnet_params = sum(p.numel() for p in model.part(PART).parameters())
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model.to(model.device, dtype)
    with torch.no_grad():
        cond, uncond = model.encode_prompt([PROMPT]), model.encode_prompt([""])
        runs = {
            "plain": lambda: ours(model, cond, uncond, steps, batch),
            "controlnet": lambda: ours(model, cond, uncond, steps, batch, predictor),
        }
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        reset_peak()
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(timed(run))
        sampling_peak = peak_gib()
    model.to(model.device, torch.float32)
    return {
        "controlnet_params_m": round(controlnet_params / 1e6, 1),
        "save_load_seconds": round(round_trip, 1),
        "reloaded_weights_equal": same,
        "resolution": side,
        **{f"ms_per_image_{name}": round(1000 * min(t) / batch, 1) for name, t in times.items()},
        "overhead": round(
            statistics.median(a / b for a, b in zip(times["controlnet"], times["plain"], strict=True)), 3
        ),
        "sampling_peak_gib": sampling_peak,
        **controlnet_training(model, predictor, cond),
    }


def controlnet_training(model: DiffusionModel, predictor: ControlNetPredictor, cond: torch.Tensor) -> dict:
    """Seconds per AdamW step of the ControlNet alone on the ε loss (batch 4, bf16 autocast on the GPU)."""
    controlnet = model.part(PART).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    batch = 4
    side = model.latent_shape[-1]
    image = predictor.image[:batch]
    cuda = torch.cuda.is_available()

    def step() -> None:
        latents = torch.randn(batch, 4, side, side, device=model.device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=model.device)
        noisy = model.scheduler.add_noise(latents, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = ControlNetPredictor(image=image)(model, noisy, t, cond.expand(batch, -1, -1))
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    reset_peak()
    seconds = timed(lambda: [step() for _ in range(5)])
    controlnet.eval().requires_grad_(False)
    return {"train_batch": batch, "s_per_train_step": round(seconds / 5, 3), "train_peak_gib": peak_gib()}


def profile_sampling(model: DiffusionModel, resolution: int, batch: int, steps: int, out: Path) -> dict:
    """torch.profiler tables of both loops (bf16), written to ``out``: where ours spends what diffusers does not."""
    from torch.profiler import ProfilerActivity, profile

    model.to(model.device, torch.bfloat16)
    model.resolution = resolution
    with torch.no_grad():
        cond, uncond = model.encode_prompt([PROMPT]), model.encode_prompt([""])
        runs = {
            "ours": lambda: ours(model, cond, uncond, steps, batch),
            "diffusers": lambda: diffusers_pipeline(model, cond, uncond, steps, batch, GUIDANCE),
        }
        figures = {}
        for name, run in runs.items():
            run()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                synchronize()
            events = prof.key_averages()
            table = events.table(sort_by="cpu_time_total", row_limit=40)
            (out / f"profile_{name}.txt").write_text(table)
            by_name = {e.key: e for e in events}
            figures[name] = {
                key: by_name[key].count
                for key in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel", "aten::copy_", "aten::to")
                if key in by_name
            }
    model.to(model.device, torch.float32)
    return figures


def demo_product(root: Path, size: int) -> tuple[ProductData, ProductSplit]:
    """Demo wood written at ``size`` px, read back, split."""
    write_demo(root, size=size, train_good=8, test_good=4, per_defect=4, products=["wood"], progress=False)
    product = read_dataset(root, "mvtec", ["wood"])[0]
    return product, split_product(product, SplitSettings())


def real_mask_requests(product: ProductData, split: ProductSplit, n: int, resolution: int) -> list[Request]:
    """``n`` requests over the types with training defects, on training normals, each with its type's real mask."""
    types = sorted(t for t, ids in split.generator_train.items() if ids)
    requests = []
    for i in range(n):
        defect_type = types[i % len(types)]
        source = product.record(split.train_normals[i % len(split.train_normals)])
        mask = product.record(split.generator_train[defect_type][0])
        requests.append(
            Request(
                product=product.name,
                defect_type=defect_type,
                sample_index=i,
                seed=i,
                resolution=resolution,
                source_image=source.image_id,
                source_path=str(source.path),
                mask_source="real",
                mask_image=mask.image_id,
                mask_paths=tuple(str(p) for p in mask.mask_paths),
            )
        )
    return requests


def section_anomalydiffusion(
    base_dir: Path, product: ProductData, split: ProductSplit, work: Path, out: Path, steps: int, samples: int
) -> dict:
    """Fit on the GPU through the generator's own code, then load the artifacts and generate."""
    settings = {"mask_generator": {"steps": max(2, steps // 3)}, "generation_batch": samples}
    generator = build_generator("anomalydiffusion", settings)
    context = FitContext(output_dir=work / "artifacts", max_steps=steps, base_model=str(base_dir))
    reset_peak()
    fit_seconds = timed(lambda: generator.fit(product, split, context))
    fit_peak = peak_gib()
    loaded = build_generator("anomalydiffusion", settings)
    loaded.load(work / "artifacts")
    requests = real_mask_requests(product, split, samples, loaded.model.resolution)
    loaded.generate(requests[:1])  # warm-up
    reset_peak()
    result: list = []
    seconds = timed(lambda: result.extend(loaded.generate(requests)))
    Image.fromarray(sample_grid([s.image for s in result], [s.mask for s in result], per_row=4)).save(
        out / "anomalydiffusion_sd_scale.png"
    )
    return {
        "device": str(loaded.model.device),
        "fit_steps": steps,
        "fit_seconds": round(fit_seconds, 1),
        "fit_peak_gib": fit_peak,
        "samples": len(result),
        "ms_per_sample": round(1000 * seconds / len(result), 1),
        "generate_peak_gib": peak_gib(),
        "sampling_steps": loaded.settings.sampling_steps,
    }


def section_diffusionad(product: ProductData, split: ProductSplit, resolution: int, steps: int, quick: bool) -> dict:
    """DiffusionAD's paper architecture: training steps and test-time scoring on the GPU."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    settings = DiffusionADConfig(block_out_channels=(8, 16), seg_base_width=8) if quick else DiffusionADConfig.paper()
    context = DetectorContext(resolution, sorted(split.generator_train), 8 if quick else 16, 0.5)
    detector = DiffusionADDetector(settings, context)
    model = detector.build().to(device)
    optimizer = detector.optimizer(model)
    normals = load_real(product, split.train_normals, resolution)
    test = load_real(product, split.test, resolution)
    rng = np.random.default_rng(0)

    def train_step() -> None:
        model.train()
        batch = detector.training_batch(normals, None, rng)
        loss = detector.loss(model(*(t.to(device) for t in batch.inputs)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()  # warm-up
    reset_peak()
    train_seconds = timed(lambda: [train_step() for _ in range(steps)])
    train_peak = peak_gib()
    model.eval()
    detector.predict(model, test)  # warm-up
    predict_seconds = timed(lambda: detector.predict(model, test))
    params = sum(p.numel() for p in model.parameters())
    return {
        "params_m": round(params / 1e6, 1),
        "batch": context.batch_size,
        "s_per_train_step": round(train_seconds / steps, 3),
        "train_peak_gib": train_peak,
        "ms_per_test_image": round(1000 * predict_seconds / len(test), 1),
    }


def run_section(results: dict, name: str, run: Callable[[], Any]) -> Any:
    """Run one section, recording its figures or its error; returns what it returned (None on error)."""
    started = time.perf_counter()
    try:
        value = run()
    except Exception as error:  # noqa: BLE001 - a bench records a failing section and goes on
        results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        print(results[name]["trace"], flush=True)
        return None
    figures = value[0] if isinstance(value, tuple) else value
    results[name] = {**figures, "section_seconds": round(time.perf_counter() - started, 1)}
    print(name, json.dumps(results[name]), flush=True)
    return value


def main(argv: list[str] | None = None) -> dict:
    """Run every section; print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--fit-steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU-sized model and steps: the smoke test")
    parser.add_argument("--profile", action="store_true", help="only profile both sampling loops at --resolution")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else SD15
    if args.quick:
        args.resolution, args.fit_steps, args.samples, args.repeats = 32, 2, 2, 1
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "sizes": "quick" if args.quick else "sd15",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_seconds = timed(lambda: build_base(sizes, args.resolution).save(work / "base"))
        results["build_and_save_seconds"] = round(build_seconds, 1)
        loaded = run_section(results, "load", lambda: section_load(work / "base", args.resolution))
        if loaded is not None:
            model = loaded[1].to("cuda" if torch.cuda.is_available() else "cpu")
            resolutions = [args.resolution] if args.quick else [256, 512]
            steps = 2 if args.quick else 25
            batch = 2 if args.quick else 8
            if args.profile:
                run_section(
                    results, "profile", lambda: profile_sampling(model, args.resolution, batch, steps, args.out)
                )
                print(json.dumps(results))
                return results
            run_section(results, "sampling", lambda: section_sampling(model, resolutions, batch, steps, args.repeats))
            run_section(results, "controlnet", lambda: section_controlnet(model, work, batch, steps, args.repeats))
            del model, loaded
        product, split = demo_product(work / "data", max(64, min(args.resolution, 128)))
        fit_and_generate = partial(section_anomalydiffusion, work / "base", product, split, work, args.out)
        run_section(results, "anomalydiffusion", lambda: fit_and_generate(args.fit_steps, args.samples))
        run_section(
            results, "diffusionad", lambda: section_diffusionad(product, split, args.resolution, 10, args.quick)
        )
    (args.out / "gpu_scale.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
