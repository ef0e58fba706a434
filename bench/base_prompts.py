"""Does a tiny base follow its prompt, or only its seed? Text-encoder separation, prompt effect, colour words.

For each base in ``--base`` (comma-separated: a saved model directory such as ``<workdir>/pretrain/<digest>/model``,
or the ``progress.pt`` of a pretraining checkpoint, whose weights go into the text encoder and tokenizer of the
first directory given), with the training normals of ``--config``'s first product:

1. Text encoder: for prompt pairs (two products; a black and a white spot; no spot and a black one), the cosine
   similarity of their contexts where their tokens first differ (1: the U-Net cannot tell the words apart there).
2. Prompt effect: ``--samples`` seeds of every prompt of ``prompts``, sampled (25 DDIM steps, guidance 3); for each
   pair, the mean absolute pixel difference between the two prompts at the same seed over the mean difference
   between two seeds of the same prompt (0: the prompt changes nothing; 1: as much as the seed).
3. Colour words: ``a photo of <product> with a <colour> spot`` for each colour name of the generic prior, painted
   (blended latent diffusion, guidance ``--guidance``) into ``--samples`` spots on training normals; a hit is a
   sample whose in-mask mean colour lies nearest the named colour's centre among all names' centres (chance 1/12).

Per base a line of numbers; the last line is one JSON object keyed by base.

Usage:
    .venv/bin/python bench/base_prompts.py --config configs/benchmark.yaml --set products=[wood,pill] \\
        --base runs/benchmark/pretrain/<digest>/model
    .venv/bin/python bench/base_prompts.py --quick   # a random tiny base on 32-px demo data, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import colorsys
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from aar import QUICK_SIZES  # bench/aar.py, next to this script
from base_defects import QUICK

from defectsynth.core.resize import resize_image
from defectsynth.diffusion.factory import build_tiny, load_base_model
from defectsynth.diffusion.generic_prior import COLOUR_RANGES, draw_region
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import generic_prompt
from defectsynth.diffusion.preview import sample_prompts
from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.anomalydiffusion.generator import (
    AnomalyDiffusionGenerator,
    AnomalyDiffusionSettings,
    Conditioner,
    DefectKey,
)
from defectsynth.platform.config import load_config
from defectsynth.platform.prepare import prepare_dataset
from defectsynth.storage.imageio import load_item

SAMPLE_STEPS, SAMPLE_GUIDANCE, PAINT_STEPS = 25, 3.0, 20


def prompts(products: list[str]) -> dict[str, str]:
    """The prompts compared: the first product, the second (if any), the first with a black and with a white spot."""
    named = {"product": generic_prompt(products[0])}
    named |= {"other_product": generic_prompt(products[1])} if len(products) > 1 else {}
    return named | {f"{c}_spot": f"{generic_prompt(products[0])} with a {c} spot" for c in ("black", "white")}


def pairs(named: dict[str, str]) -> list[tuple[str, str]]:
    """The compared pairs: products, spot colours, a spot or none (the products only when there are two)."""
    wanted = [("product", "other_product"), ("black_spot", "white_spot"), ("product", "black_spot")]
    return [(a, b) for a, b in wanted if a in named and b in named]


def word_similarity(model: DiffusionModel, first: str, second: str) -> float:
    """Cosine similarity of two one-word-apart prompts' contexts at the first position where their tokens differ."""
    ids = [model.tokenizer(p).input_ids for p in (first, second)]
    position = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    with torch.no_grad():
        a, b = model.encode_prompt([first, second])
    return float(torch.nn.functional.cosine_similarity(a[position], b[position], dim=0))


def prompt_effects(model: DiffusionModel, named: dict[str, str], count: int) -> dict[str, float]:
    """Per pair of ``pairs``: pixel change between the prompts at one seed over the change between seeds."""
    samples = {
        name: np.stack(
            sample_prompts(model, [p] * count, seeds=range(count), steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE)
        ).astype(np.float32)
        for name, p in named.items()
    }
    between_seeds = np.mean([
        np.abs(images[s] - images[t]).mean() for images in samples.values()
        for s, t in itertools.combinations(range(count), 2)
    ])  # fmt: skip
    return {f"{a}/{b}": float(np.abs(samples[a] - samples[b]).mean() / between_seeds) for a, b in pairs(named)}


class WordedConditioner(Conditioner):
    """The context of ``a photo of <product> with a <words>`` for a key (product, words): the base's own words."""

    def prompt(self, key: DefectKey) -> str:
        return f"{generic_prompt(key[0])} with a {key[1]}"


def colour_centre(name: str) -> np.ndarray:
    """The RGB (0-1) at the middle of a colour name's hue, saturation and value ranges."""
    hue, saturation, value = COLOUR_RANGES[name]
    mid_hue = np.mean(hue) % 360 if hue else 0.0
    return np.asarray(colorsys.hsv_to_rgb(mid_hue / 360, np.mean(saturation), np.mean(value)))


def colour_hits_and_lightness(
    model: DiffusionModel, product: str, normals: list[np.ndarray], count: int, guidance: float
) -> tuple[dict, float]:
    """Per colour name, the share of painted ``<colour> spot`` samples whose in-mask colour is nearest that name;
    and the mean in-mask lightness change over all of them (0-1, below 0: the base paints darker than the part)."""
    rng = np.random.default_rng(0)
    masks = [draw_region(rng, model.resolution, "spot") for _ in range(count)]
    sources = [normals[i % len(normals)] for i in range(count)]
    settings = AnomalyDiffusionSettings(
        aar=False, spatial_embedding=False, sampling_steps=PAINT_STEPS, guidance_scale=guidance
    )
    painter = AnomalyDiffusionGenerator(settings)
    painter.model, painter.tokens = model, PlaceholderTokens(model)
    painter.conditioner = WordedConditioner(model, painter.tokens, None)
    centres = {name: colour_centre(name) for name in COLOUR_RANGES}
    before = [source[mask].mean() / 255 for source, mask in zip(sources, masks, strict=True)]
    hits, shifts = {}, []
    for name in COLOUR_RANGES:
        painted = painter.inpaint(sources, masks, [(product, f"{name} spot")] * count, seeds=list(range(count)))
        means = [image[mask].mean(0) / 255 for image, mask in zip(painted, masks, strict=True)]
        nearest = [min(centres, key=lambda n, m=m: float(np.linalg.norm(centres[n] - m))) for m in means]
        hits[name] = nearest.count(name) / count
        shifts += [float(m.mean() - b) for m, b in zip(means, before, strict=True)]
    return hits, float(np.mean(shifts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/benchmark.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--base", help="saved base model directories, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a random tiny base on 32-px demo data (smoke test)")
    parser.add_argument("--samples", type=int, default=6, help="seeds per prompt and colour")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the painted spots")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.set = [*QUICK, f"data.root={Path(tmp) / 'data'}", f"workdir={Path(tmp) / 'run'}", *args.set]
            args.base = str(build_tiny(QUICK_SIZES, resolution=32, words=["wood"]).save(Path(tmp) / "base"))
        elif not args.base:
            parser.error("--base is required without --quick")
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Measure every base of ``args.base`` on ``args.config``'s data; print a line each, then the JSON object."""
    cfg = load_config(args.config, args.set)
    prepared = prepare_dataset(cfg)
    product = prepared.products[0]
    split = prepared.split.products[product.name]
    named = prompts([p.name for p in prepared.products])
    normals = [resize_image(load_item(product.record(i)).image, cfg.data.resolution) for i in split.train_normals]
    results = {}
    bases = args.base.split(",")
    directory = next(b for b in bases if not b.endswith(".pt"))
    for base in bases:
        model = load_base_model(directory if base.endswith(".pt") else base, resolution=cfg.data.resolution).eval()
        if base.endswith(".pt"):  # a pretraining checkpoint: its weights (jobs.pretrain's Progress state)
            state = torch.load(base, weights_only=True)
            model.vae.load_state_dict(state["vae"])
            model.unet.load_state_dict(state["unet"])
            model.vae.register_to_config(scaling_factor=state["scaling_factor"])
        hits, lightness = colour_hits_and_lightness(model, product.name, normals, args.samples, args.guidance)
        results[base] = {
            "word_similarity": {f"{a}/{b}": word_similarity(model, named[a], named[b]) for a, b in pairs(named)},
            "prompt_effect": prompt_effects(model, named, args.samples),
            "colour_hits": hits,
            "colour_hit_rate": float(np.mean(list(hits.values()))),
            "paint_lightness": lightness,
        }
        row = results[base]
        similar, effect = ([f"{k} {v:.3f}" for k, v in row[p].items()] for p in ("word_similarity", "prompt_effect"))
        print(
            f"{Path(base)}: word similarity {', '.join(similar)}; prompt effect {', '.join(effect)};"
            f" colour hit rate {row['colour_hit_rate']:.3f}; paint lightness {lightness:+.3f}",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
