"""Whether a base's cross-attention reads a word for a place: its spread over the text, and a mark's words on the mark.

Stable Diffusion puts a word's attention on the region the word names, which the methods build on (SeaS's and
CADiff's attention losses, BADG's attention-refined masks, CADiff's re-weighting). For a base (``--base``, a saved
model directory) and the products of ``--config`` (``--set key=value`` as the jobs take them), this noises the first
``--samples`` training normals of each product (the split's training side) at each ``--timesteps`` value and runs its
U-Net once, recording every cross-attention layer's head-averaged probabilities over the text positions:

- ``entropy``: their entropy over the positions against a uniform spread's (1: every position read alike), and
  ``max``, the largest position's probability (uniform: 1 / positions);
- on the same normals with one of the generic prior's marks drawn in and captioned (``a photo of wood with a
  line``), ``words_inside`` and ``words_outside``: the summed probability of the mark's words inside the mark and
  outside it, and ``words_ratio`` between them (1: the words are read everywhere alike).

The last line is one JSON object: per timestep, the means over layers and images.

Usage:
    .venv/bin/python bench/base_attention.py --base runs/benchmark/pretrain/<digest>/model --config \\
        configs/benchmark.yaml --set "products=[wood,pill]"
    .venv/bin/python bench/base_attention.py --quick   # a random tiny base on random images (smoke test)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from defectsynth.diffusion.attention import AttentionControl, Select, installed
from defectsynth.diffusion.factory import build_tiny, load_base_model
from defectsynth.diffusion.generic_prior import apply_generic_prior
from defectsynth.diffusion.grounding import mark_word_positions
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import generic_prompt
from defectsynth.diffusion.settings import TinyModelSettings
from defectsynth.evaluation.data import load_real
from defectsynth.platform.config import Config, load_config
from defectsynth.platform.prepare import prepare_dataset


def training_normals(cfg: Config, samples: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``samples`` training normals of each of the config's products, in [-1, 1], and their products."""
    prepared = prepare_dataset(cfg)
    images, products = [], []
    for product in prepared.products:
        ids = prepared.split.products[product.name].train_normals[:samples]
        images.append(load_real(product, ids, cfg.data.resolution).images * 2 - 1)
        products += [product.name] * len(ids)
    return torch.cat(images), products


def attention_maps(model: DiffusionModel, images: torch.Tensor, captions: list[str], t: int) -> list[torch.Tensor]:
    """Every cross-attention layer's head-averaged maps (B, positions, s, s) at timestep ``t``, fixed noise."""
    with torch.no_grad():
        latents = model.encode_images(images, torch.Generator().manual_seed(0))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        noisy = model.scheduler.add_noise(latents, noise, torch.tensor([t]))
        control = AttentionControl()
        recorder = control.record(Select())
        control.begin_step(0, t)
        with installed(model.unet, control):
            model.unet(noisy, torch.full((len(images),), t), encoder_hidden_states=model.encode_prompt(captions))
    return list(recorder.maps(0).values())


def spread(maps: list[torch.Tensor]) -> dict[str, float]:
    """Entropy over the text positions against uniform's, and the largest position's probability, means."""
    entropies, largest = [], []
    for layer in maps:
        p = layer.flatten(2).clamp_min(1e-12)  # (B, positions, pixels)
        entropies.append(float((-(p * p.log()).sum(dim=1)).mean() / np.log(p.shape[1])))
        largest.append(float(p.max(dim=1).values.mean()))
    return {"entropy": float(np.mean(entropies)), "max": float(np.mean(largest)), "uniform": 1 / maps[0].shape[1]}


def mark_words(model: DiffusionModel, maps: list[torch.Tensor], captions: list[str], marks: torch.Tensor) -> dict:
    """The mark's words' summed probability inside and outside the mark, means over layers and images."""
    positions = [mark_word_positions(caption, model.tokenizer) for caption in captions]
    inside, outside = [], []
    for layer in maps:
        cells = torch.nn.functional.adaptive_max_pool2d(marks, layer.shape[-1])[:, 0] > 0.5
        for row, words in enumerate(positions):
            summed = layer[row, words].sum(dim=0)
            if cells[row].any() and (~cells[row]).any():
                inside.append(float(summed[cells[row]].mean()))
                outside.append(float(summed[~cells[row]].mean()))
    words_in, words_out = float(np.mean(inside)), float(np.mean(outside))
    return {"words_inside": words_in, "words_outside": words_out, "words_ratio": words_in / max(words_out, 1e-9)}


def measure(model: DiffusionModel, images: torch.Tensor, products: list[str], timesteps: list[int]) -> dict:
    """Per timestep: the spread on the plain normals, and the mark words' inside and outside on marked ones."""
    prior = apply_generic_prior(images, products, torch.Generator().manual_seed(0), marks=1.0, shapes=0.0)
    plain = [generic_prompt(product) for product in products]
    result = {}
    for t in timesteps:
        marked = attention_maps(model, prior.images, prior.captions, t)
        result[str(t)] = {
            **spread(attention_maps(model, images, plain, t)),
            **mark_words(model, marked, prior.captions, prior.marks),
        }
    return {key: {k: round(v, 4) for k, v in values.items()} for key, values in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="a saved base model directory")
    parser.add_argument("--config", default="configs/benchmark.yaml", help="names the data, its split and products")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--samples", type=int, default=8, help="training normals per product")
    parser.add_argument("--timesteps", default="200,500,800")
    parser.add_argument("--quick", action="store_true", help="a random tiny base on random images (smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    if args.quick:
        model = build_tiny(TinyModelSettings(), resolution=32, words=["wood"], seed=0)
        images, products = torch.rand(4, 3, 32, 32) * 2 - 1, ["wood"] * 4
    else:
        if args.base is None:
            parser.error("--base is required without --quick")
        model = load_base_model(str(args.base)).eval()
        images, products = training_normals(load_config(args.config, args.set), args.samples)
    print(json.dumps({"base": str(args.base), **measure(model, images, products, timesteps)}))


if __name__ == "__main__":
    main()
