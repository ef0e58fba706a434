"""SeaS's RMP normalisation: a fitted SeaS model's masks on the real training defects, as fitted and refitted.

Loads a fitted SeaS model's artifacts (``generator.json`` and weights, e.g. a run's registered model under
``<workdir>/mlartifacts``), scores its RMP on the product's generator-training defects noised to t = 1, 51 and
101 (the last DDIM steps the RMP reads at generation): mean defect probability inside and outside the real
masks and the share of pixels above τ. Then it refits the RMP alone with ``--normalization`` on the same frozen
generator (``mask_steps_per_type`` x types steps) and scores it again. ``--fitted-normalization`` names what the
artifacts were fitted with (``batch`` for models fitted before GroupNorm became the default).

Usage:
    .venv/bin/python bench/seas_rmp_norm.py --artifacts <dir with generator.json> --product pill \\
        --config configs/benchmark.yaml products=[pill] workdir=runs/tier-wp
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectsynth.diffusion.features import FeatureTaps
from defectsynth.generators.base import FitContext
from defectsynth.generators.seas.generator import (
    SeaSGenerator,
    SeaSSettings,
    decoder_features,
    load_normals,
    new_mask_prediction,
    previous_latents,
)
from defectsynth.generators.training_pairs import load_training_defects, to_model_range
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import setup_tracking


def separation(generator: SeaSGenerator, defects, label: str) -> None:
    """Print the RMP's defect probability inside and outside the real masks, and the share flagged at τ."""
    model, settings, rmp = generator.model, generator.settings, generator.rmp.eval()
    images, masks = to_model_range(defects.images), torch.from_numpy(np.stack(defects.masks)).bool()
    context = model.encode_prompt([generator.prompts.abnormal(key[1]).text for key in defects.keys])
    for t in (1, 51, 101):
        with torch.no_grad():
            latents = model.encode_images(images)
            steps = torch.full((len(latents),), t)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
            noisy = model.scheduler.add_noise(latents, noise, steps)
            taps = FeatureTaps(unet_blocks=settings.mask_unet_blocks)
            with taps.attached(model):
                output = model.unet(noisy, steps, encoder_hidden_states=context).sample
            features = [taps.unet_features(block)[-1] for block in settings.mask_unet_blocks]
            vae = decoder_features(model, previous_latents(model, noisy, output, steps), settings.mask_vae_blocks)
            defect = rmp(features, vae, model.resolution).refined[:, 1]
        flagged = (defect > settings.mask.threshold).float().mean()
        print(
            f"{label}: t {t} inside {defect[masks].mean():.3f} outside {defect[~masks].mean():.3f} "
            f"flagged {flagged:.3f} (defect share {masks.float().mean():.3f})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--product", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--fitted-normalization", default="batch")
    parser.add_argument("--normalization", default="group")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    setup_tracking(cfg)  # the artifacts name their base by its registry URI
    prepared = prepare_dataset(cfg)
    product = next(p for p in prepared.products if p.name == args.product)
    split = prepared.split.products[product.name]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "artifacts"
        shutil.copytree(args.artifacts, artifacts)
        manifest = json.loads((artifacts / "generator.json").read_text())
        manifest["settings"]["mask"]["normalization"] = args.fitted_normalization
        (artifacts / "generator.json").write_text(json.dumps(manifest))
        generator = SeaSGenerator(SeaSSettings.model_validate(manifest["settings"]))
        generator.load(artifacts)
        model = generator.model
        defects = load_training_defects([(product, split)], model.resolution)
        separation(generator, defects, f"{args.fitted_normalization} (as fitted)")
        mask = generator.settings.mask.model_copy(update={"normalization": args.normalization})
        generator.settings = generator.settings.model_copy(update={"mask": mask})
        torch.manual_seed(0)
        generator.rmp = new_mask_prediction(model, generator.settings)
        normals = load_normals(product, split, generator.settings.normal_images, model.resolution)
        steps = generator._steps(len(generator.defect_types), cfg.finetune.max_steps)[1]
        started = time.perf_counter()
        generator._fit_mask_prediction(
            defects, normals, FitContext(output_dir=Path(tmp), max_steps=steps), 0, steps, {}
        )
        print(f"refitted {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
        separation(generator, defects, f"{args.normalization} (refitted)")


if __name__ == "__main__":
    main()
