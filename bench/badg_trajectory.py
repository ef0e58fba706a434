"""When does a badg fit decide what it paints? The x0 prediction inside the mask, step by step, on its own defects.

Loads a fitted badg unit (``--artifacts``, e.g. ``method_probe.py``'s ``<out>/<type>``), grows a defect on each of
its training defect images with the image's own mask (the inversion blanks the defect, so the fit must paint it
back), and prints, at every ``--every``-th sampling step, the mean RGB of the decoded x0 prediction inside each mask,
then the real defects' means, then each latent channel's 2nd, 50th and 98th percentile inside the masks at the
end beside the range of the fit's training latents (where ``--clamp``, ``x0_clamp``, holds the x0 prediction).
The sheet (``--out``) stacks the real images over the predictions of those steps.

Usage:
    .venv/bin/python bench/badg_trajectory.py --config runs/tier-wp/config.resolved.yaml \\
        --artifacts /tmp/badg/contamination --guidance 7.5 --out /tmp/trajectory.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import StepTrace
from defectsynth.generators.base import build_generator
from defectsynth.generators.fit_units import FitUnit, unit_view
from defectsynth.generators.training_pairs import latent_mask, load_training_defects
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset


def in_mask_means(images: np.ndarray, masks: list[np.ndarray]) -> list[list[int]]:
    """Per image, the mean RGB inside its mask, rounded."""
    pairs = zip(images, masks, strict=True)
    return [np.round(image[mask.astype(bool)].mean(axis=0)).astype(int).tolist() for image, mask in pairs]


def latent_masks(generator, masks: list[np.ndarray]) -> torch.Tensor:
    """The image masks at the latent side, as the sampler sees them: (B, h, w) booleans."""
    side = generator.model.latent_shape[-1]
    return latent_mask(torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)), side)[:, 0] > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the run's config.resolved.yaml (data, split)")
    parser.add_argument("--artifacts", type=Path, required=True, help="one fitted badg unit (one defect type)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance_scale of the C1 branch")
    parser.add_argument("--clamp", action="store_true", help="x0_clamp: clamp the C1 branch to the fit's range")
    parser.add_argument("--every", type=int, default=3, help="print every n-th sampling step (and the last)")
    parser.add_argument("--out", type=Path, required=True, help="the sheet's PNG path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = build_generator("badg", {})
    generator.load(args.artifacts)
    generator.settings = generator.settings.model_copy(update={"guidance_scale": args.guidance, "x0_clamp": args.clamp})
    cfg = load_config(args.config, [f"products=[{generator.product}]"])
    prepared = prepare_dataset(cfg)
    product, split = prepared.products[0], prepared.split.products[generator.product]
    data, view = unit_view(product, split, FitUnit(generator.defect_type))
    defects = load_training_defects([(data, view)], generator.model.resolution)
    trace = StepTrace()
    generator.grow(defects.images, defects.masks, seeds=list(range(len(defects.images))), on_step=trace)
    predictions = list(zip(trace.indices, trace.timesteps, trace.pred_x0, strict=True))
    shown = predictions[:: args.every] + ([predictions[-1]] if (len(predictions) - 1) % args.every else [])
    rows = [np.concatenate(defects.images, axis=1)]
    with torch.no_grad():
        for index, timestep, pred_x0 in shown:
            decoded = to_uint8(generator.model.decode_latents(pred_x0))
            print(f"step {index} t={timestep}: {in_mask_means(decoded, defects.masks)}", flush=True)
            rows.append(np.concatenate(list(decoded), axis=1))
    print(f"real: {in_mask_means(np.stack(defects.images), defects.masks)}")
    inside = trace.latents[-1].permute(1, 0, 2, 3)[:, latent_masks(generator, defects.masks)]  # (C, cells)
    percentiles = torch.quantile(inside, torch.tensor([0.02, 0.5, 0.98]), dim=1).T
    bounds = generator.latent_range
    for channel, (low, mid, high) in enumerate(percentiles.tolist()):
        fit = f"[{bounds.low[channel]:+.2f}, {bounds.high[channel]:+.2f}]" if bounds is not None else "(not recorded)"
        print(f"latent channel {channel}: in the masks {low:+.2f} / {mid:+.2f} / {high:+.2f}, training latents {fit}")
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)


if __name__ == "__main__":
    main()
