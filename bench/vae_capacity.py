"""How much of a thin defect's contrast the tiny base's VAE keeps, against its training length and width.

Trains the tiny VAE alone, in this process (one thread), on a config's training side as ``jobs.pretrain``
does (training normals plus generator-training defects, flips and crops, the generic prior's marks when
``diffusion.tiny.prior_marks`` is set), and at each of ``--steps`` measures every generator-training defect
through it with ``bench/base_defects.py``'s ``vae_check``: contrast kept (1 = all of it), in-mask MAE and the
drawn masks' IoU, per defect type (with ``diffusion.tiny.vae_whole_image_steps``, the last steps before the last
checkpoint train on whole images); and every training normal, per product: PSNR of the whole reconstruction and
its mean RGB shift (a tint: the four-product base turned grey washers pink), and how each image's own mean colour
comes back (``colour_kept``; on crops alone every image comes back in its product's one colour); and per latent
channel, how far the normals' posterior means spread against the posterior's noise (``latent_signal``). The last
line is one JSON object:
``{"checkpoints": [{step, by_type, normals, latent_signal}], "seconds"}``.

Usage:
    .venv/bin/python bench/vae_capacity.py --config configs/benchmark.yaml --set products=[wood,pill] \\
        --steps 100,300,600 [--channels 16,32,64]
    .venv/bin/python bench/vae_capacity.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from aar import DEMO_CONFIG  # bench/aar.py, next to this script
from base_defects import (  # bench/base_defects.py, next to this script
    QUICK,
    colour_kept,
    corner_errors,
    latent_signal,
    round_trip,
    training_normals,
    vae_check,
)

from defectsynth.core.masked_similarity import psnr_in
from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.generic_prior import apply_generic_prior
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import augment, random_square_crop, rotate_hue, vae_crop_at, vae_loss
from defectsynth.diffusion.preview import to_uint8
from defectsynth.generators.training_pairs import load_training_defects, to_model_range
from defectsynth.platform.config import Config, load_config
from defectsynth.platform.prepare import prepare_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", default="100,300,600", help="checkpoints, comma-separated")
    parser.add_argument("--channels", default=None, help="VAE block widths, e.g. 16,32,64 (default: the config's)")
    parser.add_argument("--decay", action="store_true", help="the rate decays to 0 by the last checkpoint (cosine)")
    parser.add_argument("--quick", action="store_true", help="32 px, steps 1,2: the smoke test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        if args.quick:  # a 32-px demo wood written to a temporary directory
            overrides = [*QUICK, f"data.root={Path(tmp) / 'data'}", f"workdir={Path(tmp) / 'run'}", *overrides]
            args.steps = "1,2"
        measure(load_config(args.config, overrides), args)


def normals_check(model: DiffusionModel, normals: dict[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    """Per product: PSNR (dB) of the normals' VAE reconstructions, their mean RGB (source, rebuilt), error by corner."""
    found = {}
    for product, images in normals.items():
        sources, rebuilts = np.stack(to_uint8(images)), np.stack(to_uint8(round_trip(model, images)))
        source, rebuilt = np.concatenate(sources), np.concatenate(rebuilts)
        whole = np.ones(source.shape[:2], dtype=bool)  # the images stacked as rows of one tall image
        found[product] = {
            "psnr": round(psnr_in(rebuilt, source, whole), 2),
            "mean_rgb": [round(float(v), 1) for v in source.reshape(-1, 3).mean(0)],
            "rebuilt_rgb": [round(float(v), 1) for v in rebuilt.reshape(-1, 3).mean(0)],
            **colour_kept(sources, rebuilts),
            "corner_error": {k: round(e, 1) for k, e in corner_errors(rebuilts, sources).items()},
        }
    return found


def measure(cfg: Config, args: argparse.Namespace) -> None:
    """Train the VAE to each checkpoint of ``args.steps`` and print what it keeps of the defects."""
    settings = cfg.diffusion.tiny
    if args.channels:
        settings = settings.model_copy(update={"vae_channels": tuple(int(c) for c in args.channels.split(","))})
    prepared = prepare_dataset(cfg)
    pairs = [(p, prepared.split.products[p.name]) for p in prepared.products]
    defects = load_training_defects(pairs, cfg.data.resolution)
    normals = training_normals(pairs, cfg.data.resolution)
    names = [p.name for p, s in pairs for _ in s.train_normals]
    images = torch.cat([*normals, to_model_range(defects.images)])
    names += [key[0] for key in defects.keys]
    model = build_tiny(settings, resolution=cfg.data.resolution, words=[p.name for p, _ in pairs], seed=cfg.seed)
    model.vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    started, checkpoints, done = time.perf_counter(), [], 0
    stops = sorted(int(s) for s in args.steps.split(","))
    schedule = settings.model_copy(update={"vae_steps": stops[-1]})  # the whole-image steps end at the last stop
    for stop in stops:
        for step in range(done, stop):
            if args.decay:
                optimizer.param_groups[0]["lr"] = (
                    settings.vae_learning_rate * 0.5 * (1 + math.cos(math.pi * step / stops[-1]))
                )
            generator = torch.Generator().manual_seed(step)
            pick = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
            batch = augment(images[pick], generator)
            batch = apply_generic_prior(
                batch, [names[i] for i in pick], generator, marks=settings.prior_marks, shapes=settings.prior_shapes
            ).images
            batch = rotate_hue(batch, settings.vae_hue_rotation, generator)
            batch = random_square_crop(batch, vae_crop_at(schedule, step), generator)
            loss = vae_loss(
                model, batch, generator, settings.kl_weight, settings.vae_edge_weight, settings.vae_chroma_weight
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        done = stop
        model.vae.eval()
        by_type = vae_check(model, defects)
        rebuilt = normals_check(model, {p.name: n for (p, _), n in zip(pairs, normals, strict=True)})
        model.vae.train()
        signal = latent_signal(model, torch.cat(normals))
        checkpoints.append({"step": stop, "by_type": by_type, "normals": rebuilt, "latent_signal": signal})
        kept = {k: round(v["contrast_kept"] or 0.0, 3) for k, v in sorted(by_type.items())}
        print(f"step {stop:5d}  contrast kept {kept}  ({time.perf_counter() - started:.0f} s)", flush=True)
        tints = {k: round(v["tint_kept"] or 0.0, 3) for k, v in sorted(by_type.items())}
        print(f"  tint kept {tints}", flush=True)
        print(f"  latent signal per channel (means' spread / posterior std) {signal}", flush=True)
        for product, row in rebuilt.items():
            print(f"  {product}: normals PSNR {row['psnr']} dB, mean RGB {row['mean_rgb']} -> {row['rebuilt_rgb']}")
            print(
                f"    per-image colour error {row['image_colour_error']} levels; spread of the images' colours "
                f"{row['source_colour_spread']} -> {row['rebuilt_colour_spread']}"
            )
            print(f"    error by corner (levels): {row['corner_error']}")
    print(json.dumps({"channels": list(settings.vae_channels), "checkpoints": checkpoints,
                      "seconds": round(time.perf_counter() - started, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
