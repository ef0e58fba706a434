"""Does a base keep a product when a normal is noised and denoised (SeaS's SDEdit start), before any fine-tune?

For each ``--product``: the first ``--count`` training normals of ``--data`` (an MVTec tree), the base's VAE
reconstruction of them, and the base's denoising from ``--start`` (20 DDIM steps, "a photo of <product>") at each
of ``--guidance``, one row each, in ``<out>/<product>.png``. Prints per row the PSNR to the sources, the mean RGB, and
how each image's own mean colour comes back (``base_defects.colour_kept``), and
the mean absolute error (0-255 levels) in each 4-px corner of the images against their interior: a decoder that
never learned its borders shows there.
A method that remakes the whole image (SeaS) can draw a product no better than the bare base does here.

Usage:
    .venv/bin/python bench/base_sdedit.py --base <run>/pretrain/<digest>/model --data data/benchmark \\
        --products wood,pill --out /tmp/sdedit
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from base_defects import colour_kept, corner_errors  # bench/base_defects.py, next to this script
from PIL import Image

from defectsynth.core.masked_similarity import psnr_in
from defectsynth.core.resize import resize_image
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import denoise, generators_from_seeds, noised_start
from defectsynth.generators.training_pairs import to_model_range
from defectsynth.storage.imageio import read_image


def rows_of(model: DiffusionModel, product: str, sources: np.ndarray, start: int, guidance: list[float]) -> dict:
    """The VAE reconstruction and one SDEdit row per guidance scale, each (N, H, W, 3) uint8."""
    rows = {}
    with torch.no_grad():
        latents = model.encode_images(to_model_range(list(sources)))
        rows["vae"] = np.stack(list(to_uint8(model.decode_latents(latents))))
        prompt = model.encode_prompt([f"a photo of {product}"] * len(sources))
        uncond = model.encode_prompt([""])
        for scale in guidance:
            sampler = DDIMSampler.from_model(model)
            sampler.set_timesteps(20)
            generators = generators_from_seeds(list(range(len(sources))))
            noisy, index = noised_start(sampler, latents, timestep=start, generators=generators)
            final = denoise(
                model,
                noisy,
                prompt,
                sampler=sampler,
                uncond=uncond,
                guidance_scale=scale,
                start_index=index,
                generators=generators,
            )
            rows[f"guidance {scale:g}"] = np.stack(list(to_uint8(model.decode_latents(final))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a tiny base model directory")
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout tree")
    parser.add_argument("--products", default="wood,pill")
    parser.add_argument("--start", type=int, default=600, help="the timestep the normals are noised to")
    parser.add_argument("--guidance", default="1,3,8")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = load_base_model(args.base).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    for product in args.products.split(","):
        files = sorted((args.data / product / "train" / "good").glob("*.png"))[: args.count]
        sources = np.stack([resize_image(read_image(f), args.resolution) for f in files])
        rows = rows_of(model, product, sources, args.start, [float(g) for g in args.guidance.split(",")])
        strip = np.concatenate(list(sources), axis=1)  # the images side by side: one row of the sheet
        everywhere = np.ones(strip.shape[:2], dtype=bool)
        print(f"{product}: sources mean RGB {strip.reshape(-1, 3).mean(0).round(0).tolist()}")
        strips = [strip]
        for name, images in rows.items():
            strips.append(np.concatenate(list(images), axis=1))
            colour = strips[-1].reshape(-1, 3).mean(0).round(0).tolist()
            print(f"  {name}: PSNR {psnr_in(strips[-1], strip, everywhere):.1f} dB, mean RGB {colour}")
            kept = colour_kept(sources, images)
            print(
                f"    per-image colour error {kept['image_colour_error']} levels; spread of the images' colours "
                f"{kept['source_colour_spread']} -> {kept['rebuilt_colour_spread']}"
            )
            corners = ", ".join(f"{k} {v:.1f}" for k, v in corner_errors(images, sources).items())
            print(f"    error by corner (levels): {corners}")
        Image.fromarray(np.concatenate(strips, axis=0)).save(args.out / f"{product}.png")


if __name__ == "__main__":
    main()
