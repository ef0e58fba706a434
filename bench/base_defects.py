"""Can the tiny diffusion base express the real defects? Its VAE, its samples, and a masked fine-tune.

For one config (``--config``, ``--set key=value`` as the jobs take them), on the training side of the split only:

1. The base: ``jobs.pretrain.pretrain`` trains and registers it, or reuses the version with the same digest;
   it is loaded back with ``load_base_model``.
2. VAE round trip (posterior mean) of every generator-training defect of every product: ``contrast_kept``,
   mean |luminance contrast in the mask vs its ring| (``fidelity.appearance_features``) of the reconstructions
   over the same mean of the originals (1 = the defects keep all their contrast), per defect type pooled over
   products and overall; the in-mask MAE (0-1); and the real masks drawn as images (white on black) through the
   VAE, binarised at 0.5: their IoU with the mask (can the VAE carry the thin masks a mask generator draws?).
3. Base samples: ``--samples`` of ``a photo of <product>`` per product and, with the generic prior on,
   ``... with a line`` (``prior_marks``) and ``a mask`` (``prior_shapes``), 25 DDIM steps, guidance 3, as one
   PNG grid at ``--out``; ``mask_binary_share`` is the share of "a mask" pixels within 0.1 of 0 or 1.
4. Masked fine-tune for ``--product``/``--defect``: textual inversion of AnomalyDiffusion's e_a tokens (its
   ``EmbeddingLoss``: masked ε-loss, pairs augmented by ``augment_pair``; ``--tune unet`` also trains the
   U-Net's cross-attention, ``--tune all`` the whole U-Net), and at each of ``--steps`` ``--samples`` defects
   painted by blended latent diffusion (``AnomalyDiffusionGenerator.inpaint``, AAR and spatial tokens off, 20 DDIM
   steps, classifier-free guidance ``--guidance``) into the type's
   real training masks on training normals: ``contrast_ratio`` (painted over real, as in 2) and
   ``appearance_distance`` (``fidelity_distances`` of the painted set to the real set of the type).

A table, then as the last line one JSON object: ``contrast_kept``, ``contrast_kept_by_type``, ``tint_kept_by_type``
(the in-mask colour against the ring, its grey part removed, that the reconstruction keeps in its direction),
``tint_by_type`` (its size in the originals, levels), ``mask_iou_by_type``, ``mae_by_type``, ``mask_binary_share``
(null without ``prior_shapes``), ``latent_signal`` (per latent channel, the training normals' posterior means' spread
against the posterior's std: under 1 the channel is noise), ``finetune`` (``{step, contrast_ratio,
appearance_distance, loss}`` per checkpoint) and ``seconds``.

Usage:
    .venv/bin/python bench/base_defects.py --config configs/benchmark.yaml --set products=[wood,pill]
    .venv/bin/python bench/base_defects.py --quick   # a random tiny base, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from aar import DEMO_CONFIG, QUICK_SIZES  # bench/aar.py, next to this script
from PIL import Image

from defectsynth.core.figures import grid
from defectsynth.core.resize import resize_image
from defectsynth.diffusion.factory import build_tiny, load_base_model
from defectsynth.diffusion.generic_prior import SHAPE_PROMPT
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import generic_prompt
from defectsynth.diffusion.preview import sample_prompts, to_uint8
from defectsynth.diffusion.settings import TinyModelSettings
from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.evaluation.data import load_real
from defectsynth.evaluation.fidelity import DefectFeatures, appearance_features, fidelity_distances
from defectsynth.evaluation.mask_checks import mask_iou
from defectsynth.generators.anomalydiffusion.generator import (
    AnomalyDiffusionGenerator,
    AnomalyDiffusionSettings,
    Conditioner,
    EmbeddingLoss,
    anomaly_group,
)
from defectsynth.generators.anomalydiffusion.mask_generator import images_to_masks, masks_to_images
from defectsynth.generators.training_pairs import TrainingDefects, augment_pair, load_training_defects, to_model_range
from defectsynth.platform.config import Config, load_config
from defectsynth.platform.prepare import PreparedData, prepare_dataset
from defectsynth.storage.imageio import load_item
from defectsynth.storage.records import ProductData
from defectsynth.storage.split import ProductSplit

QUICK = [
    "products=[wood]", "data.resolution=32", "data.demo.size=32", "data.demo.train_good=3",
    "data.demo.test_good=1", "data.demo.per_defect=3",
]  # fmt: skip
SAMPLE_STEPS, SAMPLE_GUIDANCE, PAINT_STEPS = 25, 3.0, 20
UNET_RATE = 1e-4  # U-Net parameters with --tune unet or all
BATCH = 16  # images per VAE call


CORNER = 4  # px


def corner_errors(images: np.ndarray, sources: np.ndarray) -> dict[str, float]:
    """Mean absolute error (levels) of (N, H, W, 3) ``images`` against ``sources`` per image corner and inside."""
    error = np.abs(images.astype(np.float32) - sources.astype(np.float32)).mean(axis=(0, 3))
    c = CORNER
    return {
        "top-left": float(error[:c, :c].mean()),
        "top-right": float(error[:c, -c:].mean()),
        "bottom-left": float(error[-c:, :c].mean()),
        "bottom-right": float(error[-c:, -c:].mean()),
        "inside": float(error[2 * c : -2 * c, 2 * c : -2 * c].mean()),
    }


def abs_contrast(image: np.ndarray, mask: np.ndarray) -> float | None:
    """|mean luminance in the mask - mean in its ring| (0-255), or None when undefined."""
    features = appearance_features(image, mask)
    return None if features is None else abs(features["luminance_contrast"])


def colour_kept(sources: np.ndarray, rebuilts: np.ndarray) -> dict[str, float]:
    """How each image's own mean colour comes back: the error of the per-image mean RGB (levels, RMS over images
    and channels), against the spread of the sources' per-image means (what a decoder drawing one colour for all
    would err by), and the rebuilt means' spread."""
    source_means = sources.reshape(len(sources), -1, 3).mean(1)
    rebuilt_means = rebuilts.reshape(len(rebuilts), -1, 3).mean(1)
    return {
        "image_colour_error": round(float(np.sqrt(((rebuilt_means - source_means) ** 2).mean())), 2),
        "source_colour_spread": round(float(np.sqrt(source_means.var(0).mean())), 2),
        "rebuilt_colour_spread": round(float(np.sqrt(rebuilt_means.var(0).mean())), 2),
    }


def tint(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The mask's mean colour against its ring with the grey part removed (R, G, B summing to 0), or None."""
    features = appearance_features(image, mask)
    if features is None:
        return None
    delta = np.array([features["delta_red"], features["delta_green"], features["delta_blue"]])
    return delta - delta.mean()


def tint_kept(before: np.ndarray, after: np.ndarray) -> float:
    """How much of ``before``'s tint ``after`` has, in its direction (levels): the projection of one on the other."""
    return float(after @ before / max(float(np.linalg.norm(before)), 1e-9))


def contrasts(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[float]:
    """``abs_contrast`` of each defect, the undefined ones left out."""
    values = (abs_contrast(image, mask) for image, mask in zip(images, masks, strict=True))
    return [value for value in values if value is not None]


def ratio(made: Sequence[float], real: Sequence[float]) -> float | None:
    """mean(made) / mean(real), None without values."""
    return float(np.mean(made) / max(np.mean(real), 1e-9)) if len(real) else None


@torch.no_grad()
def round_trip(model: DiffusionModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] through the VAE (posterior mean), ``BATCH`` at a time."""
    parts = [images[i : i + BATCH] for i in range(0, len(images), BATCH)]
    return torch.cat([model.decode_latents(model.encode_images(part)) for part in parts])


def training_normals(pairs: Sequence[tuple[ProductData, ProductSplit]], resolution: int) -> list[torch.Tensor]:
    """Each product's training normals as a batch in [-1, 1], in ``pairs``' order."""
    return [load_real(product, split.train_normals, resolution).images * 2 - 1 for product, split in pairs]


@torch.no_grad()
def latent_signal(model: DiffusionModel, images: torch.Tensor) -> list[float]:
    """Per latent channel, the spread of the posterior means over the images against the posterior's own std.

    Under 1 a channel is mostly the posterior's noise: the decoder cannot read it, and the U-Net, which trains on
    posterior samples, learns to denoise noise there.
    """
    posteriors = [model.vae.encode(images[i : i + BATCH]).latent_dist for i in range(0, len(images), BATCH)]
    means, stds = torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])
    return [round(float(v), 2) for v in means.std(dim=(0, 2, 3)) / stds.mean(dim=(0, 2, 3))]


def vae_check(model: DiffusionModel, defects: TrainingDefects) -> dict[str, dict[str, float | None]]:
    """Contrast kept, tint kept (its size in levels), in-mask MAE and drawn-mask IoU per type (pooled) and ``all``."""
    rebuilt = to_uint8(round_trip(model, to_model_range(defects.images)))
    drawn = images_to_masks(round_trip(model, masks_to_images(defects.masks)), 0.5)
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for image, out, mask, carried, (_, kind) in zip(
        defects.images, rebuilt, defects.masks, drawn, defects.keys, strict=True
    ):
        before, after = abs_contrast(image, mask), abs_contrast(out, mask)
        tinted, retinted = tint(image, mask), tint(out, mask)
        for row in (values[kind], values["all"]):
            if before is not None and after is not None:
                row["before"].append(before)
                row["after"].append(after)
            if tinted is not None and retinted is not None:
                row["tint"].append(float(np.linalg.norm(tinted)))
                row["tint_after"].append(tint_kept(tinted, retinted))
            row["mae"].append(float(np.abs(out.astype(np.float32) - image)[mask].mean() / 255))
            row["iou"].append(mask_iou(carried, mask))
    return {
        kind: {
            "contrast_kept": ratio(row["after"], row["before"]),
            "tint_kept": ratio(row["tint_after"], row["tint"]),
            "tint": float(np.mean(row["tint"])) if row["tint"] else None,
            "mae": float(np.mean(row["mae"])),
            "mask_iou": float(np.mean(row["iou"])),
        }
        for kind, row in values.items()
    }


def base_samples(
    model: DiffusionModel, products: list[str], tiny: TinyModelSettings, count: int, out: Path
) -> float | None:
    """The grid of base samples at ``out``; the binary share of the "a mask" samples (None without shapes)."""
    prompts = []
    for name in products:
        prompts += [generic_prompt(name)] + ([f"{generic_prompt(name)} with a line"] if tiny.prior_marks else [])
    prompts += [SHAPE_PROMPT] if tiny.prior_shapes else []
    rows = [
        sample_prompts(model, [p] * count, seeds=range(count), steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE)
        for p in prompts
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(rows)).save(out)
    print(f"base samples: {out} (rows: {', '.join(prompts)})", flush=True)
    if not tiny.prior_shapes:
        return None
    gray = np.stack(rows[-1]).astype(np.float32).mean(axis=-1) / 255
    return float(((gray <= 0.1) | (gray >= 0.9)).mean())


def finetune(model: DiffusionModel, prepared: PreparedData, args: argparse.Namespace, quick: bool) -> list[dict]:
    """Masked textual inversion (and cross-attention with ``--tune unet``), measured at each of ``args.steps``."""
    product = next((p for p in prepared.products if p.name == args.product), None)
    if product is None:
        msg = f"--product {args.product!r}: not among {[p.name for p in prepared.products]}"
        raise SystemExit(msg)
    split = prepared.split.products[product.name]
    every = load_training_defects([(product, split)], model.resolution)
    key = (product.name, args.defect)
    chosen = [i for i, k in enumerate(every.keys) if k == key]
    if not chosen:
        msg = f"--defect {args.defect!r}: no training defects of {product.name} ({sorted(split.generator_train)})"
        raise SystemExit(msg)
    images, masks = [every.images[i] for i in chosen], [every.masks[i] for i in chosen]
    # every type of the product: the distances' scales are product-wide
    real = DefectFeatures.of_defects(every.images, every.masks, [t for _, t in every.keys])
    real_contrast = contrasts(images, masks)
    normals = [resize_image(load_item(product.record(i)).image, model.resolution) for i in split.train_normals]
    n = args.samples
    sources, paint_masks = [normals[i % len(normals)] for i in range(n)], [masks[i % len(masks)] for i in range(n)]

    settings = AnomalyDiffusionSettings(
        aar=False,
        spatial_embedding=False,
        sampling_steps=PAINT_STEPS,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
    )
    settings = settings.model_copy(update={"anomaly_tokens": 2} if quick else {})
    tokens = PlaceholderTokens(model)
    tokens.add(anomaly_group(key), count=settings.anomaly_tokens, initializer=args.init)
    painter = AnomalyDiffusionGenerator(settings)
    painter.model, painter.tokens = model, tokens
    painter.conditioner = conditioner = Conditioner(model, tokens, None)
    loss_fn = EmbeddingLoss(conditioner, masked=True)
    groups = [{"params": [tokens.trainable_rows()], "lr": settings.learning_rate}]
    if args.tune != "tokens":  # unet: the cross-attention only; all: every U-Net weight
        tuned = [p for name, p in model.unet.named_parameters() if args.tune == "all" or ".attn2." in name]
        groups.append({"params": [p.requires_grad_(True) for p in tuned], "lr": UNET_RATE})
    optimizer = torch.optim.Adam(groups, weight_decay=0.0)
    results, losses = [], []
    for step in range(max(args.steps) + 1):
        if step in args.steps:
            painted = painter.inpaint(sources, paint_masks, [key] * n, seeds=list(range(n)))
            made = DefectFeatures()
            for image, mask in zip(painted, paint_masks, strict=True):
                made.add(args.defect, image, mask)
            distance = fidelity_distances(made, real).get(f"appearance_distance.{args.defect}")
            results.append({
                "step": step, "contrast_ratio": ratio(contrasts(painted, paint_masks), real_contrast),
                "appearance_distance": distance, "loss": float(np.mean(losses)) if losses else None,
            })  # fmt: skip
            print(f"  finetune step {step}: {results[-1]}", flush=True)
            losses = []
        if step == max(args.steps):
            break
        rng = np.random.default_rng([args.seed, step])
        generator = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        picks = rng.integers(len(images), size=settings.batch_size)
        pairs = [augment_pair(images[i], masks[i], rng, settings.crop_range) for i in picks]
        batch = to_model_range([p[0] for p in pairs])
        pair_masks = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.float32))
        loss = loss_fn(batch, pair_masks, [key] * len(picks), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens.restore_frozen_rows()
        losses.append(float(loss.detach()))
    return results


def real_base(cfg: Config) -> tuple[DiffusionModel, PreparedData]:
    """The configured base, pretrained (or reused) and registered by the pretrain job, and the run's data."""
    import ray

    from defectsynth.jobs.common import start
    from defectsynth.jobs.pretrain import pretrain
    from defectsynth.platform.logs import setup_logging

    setup_logging(False)
    prepared = start(cfg)  # saves the config, joins Ray, sets up MLflow tracking, prepares data and split
    ref = pretrain(cfg, prepared)
    ray.shutdown()  # the rest runs in this process
    print(f"base model: {ref.uri} ({'reused' if ref.reused else 'trained'})", flush=True)
    return load_base_model(ref.uri, resolution=cfg.data.resolution).eval(), prepared


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--product", default="wood")
    parser.add_argument("--defect", default="crack")
    parser.add_argument(
        "--tune",
        default="tokens",
        choices=["tokens", "unet", "all"],
        help="unet: also cross-attention; all: the whole U-Net",
    )
    parser.add_argument("--steps", default=None, help="fine-tune checkpoints (default 0,50,100,200; quick 0,2)")
    parser.add_argument("--samples", type=int, default=None, help="per prompt and checkpoint (default 8; quick 2)")
    parser.add_argument("--init", default="line", help="word whose embedding starts the fine-tuned tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of the painting")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="φ of guidance rescale (0: off)")
    parser.add_argument("--out", default=None, help="PNG grid of base samples (default <workdir>/bench/...)")
    parser.add_argument("--quick", action="store_true", help="a random tiny base, seconds (smoke test)")
    args = parser.parse_args()
    args.steps = sorted({int(s) for s in (args.steps or ("0,2" if args.quick else "0,50,100,200")).split(",")})
    args.samples = args.samples or (2 if args.quick else 8)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            paths = [f"data.root={Path(tmp) / 'data'}", f"workdir={Path(tmp) / 'run'}"]
            cfg = load_config(args.config, [*QUICK, *paths, *args.set])
            prepared = prepare_dataset(cfg)
            names = [p.name for p in prepared.products]
            model = build_tiny(QUICK_SIZES, resolution=cfg.data.resolution, words=names, seed=cfg.seed)
        else:
            cfg = load_config(args.config, args.set)
            model, prepared = real_base(cfg)
        tiny = cfg.diffusion.tiny
        pairs = [(p, prepared.split.products[p.name]) for p in prepared.products]
        vae = vae_check(model, load_training_defects(pairs, model.resolution))
        signal = latent_signal(model, torch.cat(training_normals(pairs, model.resolution)))
        out = Path(args.out) if args.out else cfg.workdir / "bench" / "base_samples.png"
        binary = base_samples(model, [p.name for p in prepared.products], tiny, args.samples, out)
        tuned = finetune(model, prepared, args, args.quick)
    print(f"\nprior_marks {tiny.prior_marks}, prior_shapes {tiny.prior_shapes}, {model.resolution} px")
    print(f"{'defect type':<16}{'contrast kept':>14}{'tint kept':>11}{'tint':>7}{'in-mask MAE':>13}{'mask IoU':>10}")
    for kind in sorted(vae, key=lambda k: (k == "all", k)):
        row = vae[kind]
        cells = [fmt(row[k]) for k in ("contrast_kept", "tint_kept", "tint", "mae", "mask_iou")]
        print(f"{kind:<16}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (14, 11, 7, 13, 10), strict=True)))
    print(f"'a mask' samples, binary share: {fmt(binary)}")
    print(f"latent signal per channel (means' spread / posterior std, training normals): {signal}")
    print(f"\nfine-tune of {args.product}/{args.defect} ({args.tune}); real |contrast| is the ratio's 1")
    print(f"{'step':>6}{'contrast ratio':>16}{'appearance d':>14}{'loss':>8}")
    for row in tuned:
        cells = (fmt(row[k]) for k in ("contrast_ratio", "appearance_distance", "loss"))
        print(f"{row['step']:>6}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (16, 14, 8), strict=True)))
    types = {k: v for k, v in vae.items() if k != "all"}
    print(json.dumps({
        "contrast_kept": vae["all"]["contrast_kept"],
        "contrast_kept_by_type": {k: v["contrast_kept"] for k, v in types.items()},
        "tint_kept_by_type": {k: v["tint_kept"] for k, v in types.items()},
        "tint_by_type": {k: v["tint"] for k, v in types.items()},
        "mask_iou_by_type": {k: v["mask_iou"] for k, v in types.items()},
        "mae_by_type": {k: v["mae"] for k, v in types.items()},
        "mask_binary_share": binary,
        "latent_signal": signal,
        "finetune": tuned,
        "seconds": round(time.perf_counter() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
