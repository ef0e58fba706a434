"""AnomalyDiffusion's AAR (Eq. 7-8): which form makes the defect fill its mask, and what each costs.

Loads the demo's fitted ``defectsynth-<product>-anomalydiffusion`` (alias ``candidate``) from the MLflow
registry of a finished ``make demo`` (``--config``), draws the generate job's requests for the product and
generates them once per variant with the same seeds: AAR off (the baseline of the ratios), the authors'
code (latent form, weights clamped to [1, 1.5]), the latent form unclamped, and the paper's form (decoded x̂0,
softmax of 1/distance); ``--variants`` picks some. ``--config`` may be a finished quality-tier run's
``config.resolved.yaml``: its registry holds its fits. The decoded image is measured as generated
(``paste_background: off``), so the change outside the mask counts. Per variant, over the samples:

- ``ms_per_image`` of the painting alone (the conditioning masks are drawn once, before, for every
  variant; one untimed warm-up chunk first) and its ratio to AAR off (one torch thread,
  ``generation_batch`` as fitted);
- ``coverage``: the share of the conditioning mask the image actually changed (refined / conditioning
  mask area), what AAR is meant to raise;
- ``alignment``: the share of the whole change that lies inside the conditioning mask;
- ``strength``: the mean absolute change inside the conditioning mask (0-1);
- ``peak_weight``: the largest AAR weight of a sample's map, averaged over samples and steps (1 without AAR);
- ``appearance_distance`` overall and per type: the quality tier's distance of the samples (source pixels kept
  outside the conditioning mask, the refined mask, as the generate job writes them) to the product's
  generator-training defects; ``luminance_contrast.<type>``: the samples' mean in-mask luminance minus the ring's
  (0-255), beside the real defects' (``real``).

The last line is one JSON object.

Usage:
    .venv/bin/python bench/aar.py --config configs/demo.yaml --product wood   # after make demo
    .venv/bin/python bench/aar.py --quick      # a random tiny base fitted for 2 steps (smoke test)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.settings import TinyModelSettings
from defectsynth.evaluation.fidelity import DefectFeatures, fidelity_distances
from defectsynth.evaluation.mask_checks import AlignmentAccumulator
from defectsynth.generators.anomalydiffusion import aar
from defectsynth.generators.anomalydiffusion.generator import AnomalyDiffusionGenerator
from defectsynth.generators.base import FitContext, Generator, Request, build_generator
from defectsynth.generators.masks import load_source
from defectsynth.generators.refine import measured_strength, refine_by_change
from defectsynth.generators.training_pairs import load_training_defects
from defectsynth.jobs.generate import product_requests
from defectsynth.platform.config import Config, load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.platform.tracking import load_generator, model_name, registry_uri, setup_tracking
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import ProductSplit

METHOD = "anomalydiffusion"
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
VARIANTS = {
    "off": {"aar": False},
    "code": {"aar": True, "aar_form": "code"},
    "latent": {"aar": True, "aar_form": "latent"},
    "paper": {"aar": True, "aar_form": "paper"},
}
QUICK_SIZES = TinyModelSettings(
    vae_channels=(16, 32), unet_channels=(32, 32, 32), norm_groups=8, text_width=32, text_layers=1, text_heads=2,
    attention_heads=2, max_prompt_length=16,
)  # fmt: skip
QUICK_SETTINGS = {
    "anomaly_tokens": 2,
    "spatial": {"depth": 18, "width": 8, "fpn_channels": 16},
    "mask_generator": {"steps": 2, "sampling_steps": 2, "batch_size": 2},
    "sampling_steps": 3,
    "batch_size": 2,
}


@dataclass(frozen=True)
class Inputs:
    """What every variant paints: the sources, their conditioning masks (drawn once), keys and seeds."""

    sources: list[np.ndarray]
    masks: list[np.ndarray]
    keys: list[tuple[str, str]]
    seeds: list[int]


def prepare_inputs(generator: AnomalyDiffusionGenerator, requests: list[Request]) -> Inputs:
    """Draw the requests' conditioning masks once; requests whose mask came out empty are left out."""
    masks = generator.conditioning_masks(requests)
    kept = [i for i, mask in enumerate(masks) if mask.any()]
    return Inputs(
        sources=[load_source(requests[i]) for i in kept],
        masks=[masks[i] for i in kept],
        keys=[(requests[i].product, requests[i].defect_type) for i in kept],
        seeds=[requests[i].seed for i in kept],
    )


def paint(generator: AnomalyDiffusionGenerator, inputs: Inputs, count: int) -> list[np.ndarray]:
    """The first ``count`` inputs painted as ``generate`` paints them, ``generation_batch`` at a time."""
    part = slice(0, count)
    return generator.inpaint_in_batches(inputs.sources[part], inputs.masks[part], inputs.keys[part], inputs.seeds[part])


class PeakWeights:
    """Records, while open, each AAR map's per-sample maximum (``AARUpdater.weight_map`` wrapped)."""

    def __init__(self) -> None:
        self.peaks: list[float] = []

    def __enter__(self) -> PeakWeights:
        original = self.original = aar.AARUpdater.weight_map

        def recorded(updater: aar.AARUpdater, *args: object) -> torch.Tensor:
            weights = original(updater, *args)
            self.peaks += weights.flatten(1).max(dim=1).values.tolist()
            return weights

        aar.AARUpdater.weight_map = recorded
        return self

    def __exit__(self, *exc: object) -> None:
        aar.AARUpdater.weight_map = self.original

    def mean(self) -> float:
        """The mean recorded peak, 1 when AAR never ran (every weight is then 1)."""
        return float(np.mean(self.peaks)) if self.peaks else 1.0


def type_contrasts(features: DefectFeatures) -> dict[str, float]:
    """Per type, the mean in-mask luminance contrast against the ring (0-255)."""
    return {f"luminance_contrast.{t}": float(features.of(t, "luminance_contrast").mean()) for t in features.values}


def measure(generator: AnomalyDiffusionGenerator, inputs: Inputs, real: DefectFeatures) -> dict[str, float]:
    """Time the painting alone (after one untimed warm-up chunk), then the mask and appearance measures."""
    paint(generator, inputs, generator.settings.generation_batch)  # warm-up
    started = time.perf_counter()
    with PeakWeights() as peaks:
        images = paint(generator, inputs, len(inputs.seeds))
    seconds = time.perf_counter() - started
    checks, strength, made = AlignmentAccumulator(), [], DefectFeatures()
    for source, image, cond, (_, defect_type) in zip(inputs.sources, images, inputs.masks, inputs.keys, strict=True):
        checks.add(image, source, cond)
        refined = refine_by_change(source, image, cond, threshold=generator.settings.refine_threshold)
        checks.add_conditioning(refined, cond)
        strength.append(measured_strength(source, image, cond))
        made.add(defect_type, np.where(cond[..., None], image, source), refined)
    result = checks.result()
    appearance = {k: v for k, v in fidelity_distances(made, real).items() if k.startswith("appearance")}
    return {
        "ms_per_image": 1000 * seconds / len(images),
        "coverage": result.get("refined_cond_coverage", float("nan")),
        "alignment": result.get("mask_alignment", float("nan")),
        "strength": float(np.mean(strength)),
        "peak_weight": peaks.mean(),
        "samples": float(len(images)),
        **appearance,
        **type_contrasts(made),
    }


def training_defect_features(product: ProductData, split: ProductSplit, side: int) -> DefectFeatures:
    """Fidelity features of the product's generator-training defects at ``side`` px: the real side of the distances."""
    defects = load_training_defects([(product, split)], side)
    return DefectFeatures.of_defects(defects.images, defects.masks, [t for _, t in defects.keys])


def demo_generator(cfg: Config, product_name: str, mask_source: str) -> tuple[Generator, list[Request], DefectFeatures]:
    """The run's registered generator for ``product_name``, the generate job's requests, the real defects' features."""
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    product = next((p for p in prepared.products if p.name == product_name), None)
    if product is None:
        msg = f"--product {product_name!r}: not among {[p.name for p in prepared.products]}"
        raise SystemExit(msg)
    generator = load_generator(registry_uri(model_name(product_name, METHOD), "candidate"))
    split = prepared.split.products[product_name]
    real = training_defect_features(product, split, cfg.data.resolution)
    return generator, product_requests(cfg, product, split, mask_source, type(generator)), real


def quick_generator(root: Path, mask_source: str) -> tuple[Generator, list[Request], DefectFeatures]:
    """A random tiny base, anomalydiffusion fitted on it for 2 steps, and 4 requests: mechanics only."""
    overrides = [f"data.root={root / 'data'}", f"workdir={root / 'run'}", "products=[wood]", "data.resolution=32"]
    overrides += ["data.demo.size=32", "data.demo.train_good=3", "data.demo.test_good=1", "data.demo.per_defect=3"]
    cfg = load_config(DEMO_CONFIG, [*overrides, "generate.per_type=1"])
    prepared = prepare_dataset(cfg)
    product = prepared.products[0]
    base = build_tiny(QUICK_SIZES, resolution=32, words=[product.name]).save(root / "base")
    generator = build_generator(METHOD, QUICK_SETTINGS)
    split = prepared.split.products[product.name]
    generator.fit(product, split, FitContext(output_dir=root / "artifacts", max_steps=2, base_model=str(base)))
    real = training_defect_features(product, split, 32)
    return generator, product_requests(cfg, product, split, mask_source, type(generator)), real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--product", default="wood")
    parser.add_argument("--mask-source", default="learned", choices=["learned", "real", "perlin"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="a random tiny base, seconds (smoke test)")
    args = parser.parse_args()
    variants = ["off"] + [v for v in args.variants.split(",") if v != "off"]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        msg = f"--variants: unknown {sorted(unknown)}; known {list(VARIANTS)}"
        raise SystemExit(msg)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            generator, requests, real = quick_generator(Path(tmp), args.mask_source)
        else:
            generator, requests, real = demo_generator(load_config(args.config), args.product, args.mask_source)
        inputs = prepare_inputs(generator, requests)
        fitted = generator.settings.model_copy(update={"paste_background": "off"})  # measure the change as made
        results = {}
        for name in variants:
            generator.settings = fitted.model_copy(update=VARIANTS[name])
            results[name] = measure(generator, inputs, real)
            print(f"{name:>7}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    for name in variants:
        results[name]["ms_ratio_to_off"] = results[name]["ms_per_image"] / results["off"]["ms_per_image"]
    product = requests[0].product
    summary = {"product": product, "mask_source": args.mask_source, "requests": len(requests)}
    summary["real"] = type_contrasts(real)
    print(json.dumps(summary | results))


if __name__ == "__main__":
    main()
