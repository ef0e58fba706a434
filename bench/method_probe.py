"""A quick look at one method on one product of a finished run: fit it on the run's base, generate, sheet.

Loads the run's resolved config (``--config runs/<run>/config.resolved.yaml``) and its tiny base
(``<workdir>/pretrain/*/model``, or ``--base``), fits ``--method`` with the run's settings for it overridden by
``--settings`` (JSON) on ``--product`` (only ``--types`` for a method fitted per defect type), generates the generate
job's requests (``--per-type`` per type; real masks, or the method's own where it takes none, as SeaS's) and writes a
contact sheet to ``--out``: per type, two real training defects, then the samples, then their masks. Per type it
prints the fit's seconds, ms per image, how each sample keeps its source normal's mean colour (``colour_kept``: a
method that redraws the product may draw every one in the same colour), the samples' mean ``strength``, the share of
the conditioning mask the sample's mask covers, and the mean of every other QC score (BADG's ``background_psnr`` and
``background_ssim``). The last line is one JSON object, with ``fidelity``: the quality tier's mask-shape and
appearance distances of the samples to the product's generator-training defects, per type and overall
(``evaluation.fidelity``). ``--variant`` (JSON of generation settings) generates the same requests again from the same
fits with those settings changed (``x0_clamp``, ``guidance_scale``), measured alike: its sheet is
``sheet-variant.png`` and its measures the JSON's ``variant``. ``--profile N`` prints, before each unit's measures,
the N functions with the most cumulative time in its fit and in its generation (cProfile): where a method's time goes.
``--reuse`` loads the fits an earlier probe left under ``--out`` instead of fitting again: a generation setting tried
in seconds.

Usage:
    .venv/bin/python bench/method_probe.py --config runs/tier-wp/config.resolved.yaml --product wood --method badg \\
        --types crack,hole --settings '{"steps": 100, "learning_rate": 1e-3}' --out /tmp/badg
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from aar import training_defect_features  # bench/aar.py, next to this script
from base_defects import colour_kept  # bench/base_defects.py
from PIL import Image

from defectsynth.core.resize import resize_image
from defectsynth.evaluation.fidelity import DefectFeatures, fidelity_distances
from defectsynth.generators.base import FitContext, build_generator, generator_class
from defectsynth.generators.fit_units import FitUnit, unit_view
from defectsynth.generators.masks import load_source
from defectsynth.jobs.generate import product_requests
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.storage.imageio import load_item

SIDE_CELLS = 2  # real defects shown per type


def probe_type(
    args: argparse.Namespace, settings: dict, product, split, requests, base: str, unit: FitUnit
) -> tuple[dict, dict | None]:
    """Fit one unit (the product, or one type), generate its requests; its measures, then the variant's (or None).

    The variant (``--variant``) generates the same requests again from the same fit, its generation settings changed.
    """
    data, view = unit_view(product, split, unit)
    out = args.out / (unit.defect_type or "product")
    started = time.perf_counter()
    context = FitContext(output_dir=out, max_steps=args.steps, base_model=base, seed=args.fit_seed)
    reused = args.reuse and (out / "generator.json").exists()
    if not reused:
        with profiled(f"fit of {unit.defect_type or 'product'}", args.profile):
            build_generator(args.method, settings).fit(data, view, context)
    generator = build_generator(args.method, settings)
    generator.load(out)
    fit_s = None if reused else round(time.perf_counter() - started, 1)  # a reused fit's time is not measured here
    measured = {"fit_s": fit_s, **generation_measures(generator, requests, args.profile)}
    if not args.variant:
        return measured, None
    generator.settings = generator.settings.model_copy(update=json.loads(args.variant))
    return measured, {"fit_s": fit_s, **generation_measures(generator, requests, args.profile)}


@contextmanager
def profiled(label: str, top: int) -> Iterator[None]:
    """Profile the block and print its ``top`` functions by cumulative time; a plain block when ``top`` is 0."""
    if not top:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        print(f"-- {label}: the {top} functions with the most cumulative time", flush=True)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(top)


def generation_measures(generator, requests, profile: int = 0) -> dict:
    """Generate ``requests``: ms per image, how each source's colour comes back, the mask's cover of the conditioning
    mask, QC means, and the samples."""
    started = time.perf_counter()
    with profiled(f"generation of {len(requests)} requests", profile):
        samples = generator.generate(requests)
    made = time.perf_counter()
    scores: dict[str, list[float]] = {}
    for sample in samples:
        for key, value in sample.metadata.qc.scores.items():
            scores.setdefault(key, []).append(value)
    cover = [s.mask.sum() / max(s.cond_mask.sum(), 1) for s in samples if s.cond_mask is not None]
    sources = np.stack([resize_image(load_source(r), s.image.shape[0]) for r, s in zip(requests, samples, strict=True)])
    return {
        **colour_kept(sources, np.stack([s.image for s in samples])),
        "ms_per_image": round(1000 * (made - started) / len(samples)),
        "mask_cover": round(float(np.mean(cover)), 3) if cover else None,
        **{key: round(float(np.mean(values)), 3) for key, values in scores.items()},
        "_samples": samples,
    }


def sheet_row(product, split, defect_type: str, samples: list, side: int) -> np.ndarray:
    """Real training defects of the type, the samples, their masks: one row of the sheet."""
    real = [resize_image(load_item(product.record(i)).image, side) for i in split.generator_train[defect_type]]
    real = (real + [np.zeros((side, side, 3), np.uint8)] * SIDE_CELLS)[:SIDE_CELLS]
    masks = [np.repeat(s.mask[..., None], 3, axis=-1).astype(np.uint8) * 255 for s in samples]
    return np.concatenate([*real, *(s.image for s in samples), *masks], axis=1)


def fidelity(product, split, samples: list, side: int) -> dict[str, float]:
    """The tier's distances of the samples to the product's generator-training defects (all types' scales)."""
    real, made = training_defect_features(product, split, side), DefectFeatures()
    for sample in samples:
        made.add(sample.metadata.defect_type, sample.image, sample.mask)
    return {key: round(value, 3) for key, value in fidelity_distances(made, real).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a finished run's config.resolved.yaml")
    parser.add_argument("--product", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--types", help="comma-separated defect types (default: all of the product's)")
    parser.add_argument("--settings", default="{}", help="JSON overriding the run's settings of the method")
    parser.add_argument("--steps", type=int, default=300, help="FitContext.max_steps (finetune.max_steps)")
    parser.add_argument("--fit-seed", type=int, default=0, help="FitContext.seed (the job passes the run's seed)")
    parser.add_argument("--per-type", type=int, default=4)
    parser.add_argument("--base", help="the base model directory (default: the run's pretrained tiny base)")
    parser.add_argument("--variant", help="JSON of generation settings for a second generation from the same fits")
    parser.add_argument("--reuse", action="store_true", help="load the fits already under --out instead of refitting")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest functions of fit and generation")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"products=[{args.product}]", f"generate.per_type={args.per_type}"])
    prepared = prepare_dataset(cfg)
    product, split = prepared.products[0], prepared.split.products[args.product]
    settings = {**cfg.generators.get(args.method, {}), **json.loads(args.settings)}
    base = args.base or str(next((cfg.workdir / "pretrain").glob("*/model")))
    cls = generator_class(args.method)
    requests = product_requests(cfg, product, split, "real" if "real" in cls.mask_sources else cls.mask_sources[0], cls)
    types = args.types.split(",") if args.types else list(product.defect_types)
    runs = {"": ProbeRun()} | ({"variant": ProbeRun()} if args.variant else {})
    units = [FitUnit(t) for t in types] if cls.fit_unit == "defect_type" else [FitUnit()]
    for unit in units:
        chosen = [r for r in requests if r.defect_type in ([unit.defect_type] if unit.defect_type else types)]
        measures = probe_type(args, settings, product, split, chosen, base, unit)
        for (name, run), measured in zip(runs.items(), measures, strict=False):
            run.add(unit, measured, product, split, types, cfg.data.resolution)
            print(f"{name} {unit.defect_type or 'product'}".strip(), measured, flush=True)
    summary = {"method": args.method, "product": args.product, "settings": settings}
    for name, run in runs.items():
        Image.fromarray(np.concatenate(run.rows, axis=0)).save(args.out / f"sheet{'-' + name if name else ''}.png")
        distances = fidelity(product, split, run.samples, cfg.data.resolution)
        print(f"{name} fidelity".strip(), distances, flush=True)
        measured = {"units": run.results, "fidelity": distances}
        summary |= measured if not name else {name: {"settings": json.loads(args.variant), **measured}}
    print(json.dumps(summary))


@dataclass
class ProbeRun:
    """One generation's per-unit measures, sheet rows and samples."""

    results: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    samples: list = field(default_factory=list)

    def add(self, unit: FitUnit, measured: dict, product, split, types: list[str], side: int) -> None:
        """Keep one unit's measures (its samples apart) and a sheet row per defect type."""
        samples = measured.pop("_samples")
        self.samples += samples
        for defect_type in [unit.defect_type] if unit.defect_type else types:
            of_type = [s for s in samples if s.metadata.defect_type == defect_type]
            self.rows.append(sheet_row(product, split, defect_type, of_type, side))
        self.results[unit.defect_type or "product"] = measured


if __name__ == "__main__":
    main()
