"""CADiff's intensity w (Eq. 11): does a larger w make a stronger change inside the mask?

Loads a run's registered ``defectsynth-<product>-cadiff`` (alias ``candidate``; ``--config`` and the overrides
name the run, e.g. ``make benchmark``'s; ``--artifacts`` loads a fitted directory instead), draws the generate
job's real-mask requests for the product and generates each of them once per level of w with the same seed and
mask. Per level, over the samples:

- ``in_mask_change``: the mean absolute change (0-1) inside the conditioning mask (``measured_strength``);
- ``coverage``: the share of the conditioning mask the image changed by more than the refine threshold.

``--settings`` changes generation settings first (e.g. ``{"delayed_focus": false}``; ``--suffix`` names its
figures). ``monotonic`` says whether ``in_mask_change`` rises with every step of w. The sweep is logged to the
run's MLflow store (experiment ``intensity-sweep``: one metric per level, the plot as an artifact) and the plot
and a contact sheet (one row per level) are written to ``--out``. The last line is one JSON object.

Usage:
    .venv/bin/python bench/cadiff_intensity.py --config configs/benchmark.yaml --product wood --out docs
    .venv/bin/python bench/cadiff_intensity.py --quick   # a random tiny base fitted for 2 steps (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from defectsynth.diffusion.factory import build_tiny  # noqa: E402
from defectsynth.diffusion.settings import TinyModelSettings  # noqa: E402
from defectsynth.generators.base import FitContext, Generator, Request, build_generator  # noqa: E402
from defectsynth.generators.masks import load_source  # noqa: E402
from defectsynth.generators.refine import measured_strength, refine_by_change  # noqa: E402
from defectsynth.jobs.generate import product_requests  # noqa: E402
from defectsynth.platform.config import load_config  # noqa: E402
from defectsynth.platform.prepare import prepare_dataset  # noqa: E402
from defectsynth.platform.tracking import load_generator, model_name, registry_uri, setup_tracking  # noqa: E402

METHOD = "cadiff"
LEVELS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0)
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
QUICK_SIZES = TinyModelSettings(
    vae_channels=(16, 32), unet_channels=(32, 32, 32), norm_groups=8, text_width=32, text_layers=1, text_heads=2,
    attention_heads=2, max_prompt_length=16,
)  # fmt: skip
QUICK_SETTINGS = {"batch_size": 2, "saim_heads": 2, "sampling_steps": 3, "guidance_scale": 2.0}


def run_generator(
    config: Path, overrides: list[str], product_name: str, per_type: int, artifacts: Path | None = None
) -> tuple[Generator, list]:
    """The run's registered cadiff model of the product (or ``artifacts``) and ``per_type`` requests per type."""
    cfg = load_config(config, [*overrides, f"generate.per_type={per_type}"])
    setup_tracking(cfg)
    prepared = prepare_dataset(cfg)
    product = next((p for p in prepared.products if p.name == product_name), None)
    if product is None:
        msg = f"--product {product_name!r}: not among {[p.name for p in prepared.products]}"
        raise SystemExit(msg)
    if artifacts is None:
        generator = load_generator(registry_uri(model_name(product_name, METHOD), "candidate"))
    else:
        generator = build_generator(METHOD)
        generator.load(artifacts)
    split = prepared.split.products[product_name]
    return generator, product_requests(cfg, product, split, "real", type(generator))


def quick_generator(root: Path) -> tuple[Generator, list[Request]]:
    """A random tiny base, cadiff fitted on it for 2 steps, and one request per defect type: mechanics only."""
    overrides = [f"data.root={root / 'data'}", f"workdir={root / 'run'}", "products=[wood]", "data.resolution=32"]
    overrides += ["data.demo.size=32", "data.demo.train_good=3", "data.demo.test_good=1", "data.demo.per_defect=3"]
    cfg = load_config(DEMO_CONFIG, [*overrides, "generate.per_type=1"])
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    prepared = prepare_dataset(cfg)
    product = prepared.products[0]
    base = build_tiny(QUICK_SIZES, resolution=32, words=[product.name]).save(root / "base")
    generator = build_generator(METHOD, QUICK_SETTINGS)
    split = prepared.split.products[product.name]
    generator.fit(product, split, FitContext(output_dir=root / "artifacts", max_steps=2, base_model=str(base)))
    return generator, product_requests(cfg, product, split, "real", type(generator))


def sweep(generator: Generator, requests: list[Request], levels: list[float]) -> tuple[dict, dict]:
    """Per level, the measures over the requests (same seeds and masks) and the generated images."""
    threshold = generator.settings.refine_threshold
    results, images = {}, {}
    for w in levels:
        samples = generator.generate([dataclasses.replace(r, intensity=w) for r in requests])
        change, coverage = [], []
        for request, sample in zip(requests, samples, strict=True):
            source, cond = load_source(request), sample.cond_mask.astype(bool)
            change.append(measured_strength(source, sample.image, cond))
            refined = refine_by_change(source, sample.image, cond, threshold=threshold)
            coverage.append(refined.sum() / max(cond.sum(), 1))
        results[w] = {"in_mask_change": float(np.mean(change)), "coverage": float(np.mean(coverage))}
        images[w] = [sample.image for sample in samples]
        print(f"w {w:+.2f}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[w].items()), flush=True)
    return results, images


def plot(results: dict, product: str, path: Path) -> plt.Figure:
    """In-mask change (left axis) and coverage (right axis) against w, each on its own scale, saved to ``path``."""
    levels = sorted(results)
    figure, change_axis = plt.subplots(figsize=(5, 3.2))
    coverage_axis = change_axis.twinx()
    change_axis.plot(levels, [results[w]["in_mask_change"] for w in levels], "o-", color="tab:blue")
    coverage_axis.plot(levels, [results[w]["coverage"] for w in levels], "s--", color="tab:orange")
    change_axis.set(xlabel="intensity w", title=f"cadiff on {product}: IAR intensity sweep")
    change_axis.set_ylabel("in-mask change (0-1)", color="tab:blue")
    coverage_axis.set_ylabel("share of the mask changed", color="tab:orange")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def sheet(images: dict, sources: list[np.ndarray], path: Path, columns: int = 6) -> None:
    """One row per level (the sources first), ``columns`` samples each."""
    rows = [np.concatenate(sources[:columns], axis=1)]
    rows += [np.concatenate(images[w][:columns], axis=1) for w in sorted(images)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--product", default="wood")
    parser.add_argument("--per-type", type=int, default=4)
    parser.add_argument("--levels", default=",".join(str(w) for w in LEVELS))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--artifacts", type=Path, help="a fitted cadiff directory instead of the registered model")
    parser.add_argument("--settings", default="{}", help="JSON of generation settings to change, e.g. ablations")
    parser.add_argument("--suffix", default="", help="appended to the names of the written figures")
    parser.add_argument("--quick", action="store_true", help="a random tiny base, seconds (smoke test)")
    parser.add_argument("overrides", nargs="*", help="config overrides naming the run, e.g. workdir=runs/benchmark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    levels = [float(w) for w in args.levels.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            generator, requests = quick_generator(Path(tmp))
        else:
            generator, requests = run_generator(
                Path(args.config), args.overrides, args.product, args.per_type, args.artifacts
            )
        product = requests[0].product
        generator.settings = generator.settings.model_copy(update=json.loads(args.settings))
        results, images = sweep(generator, requests, levels)
        ordered = [results[w]["in_mask_change"] for w in sorted(results)]
        monotonic = all(b > a for a, b in zip(ordered, ordered[1:], strict=False))
        stem = f"cadiff_intensity_{product}{args.suffix}"
        figure = plot(results, product, out / f"{stem}.png")
        sheet(images, [load_source(r) for r in requests], out / f"{stem}_sheet.png")
        mlflow.set_experiment("intensity-sweep")
        with mlflow.start_run(run_name=f"cadiff-{product}"):
            mlflow.log_params(
                {"product": product, "levels": args.levels, "requests": len(requests), "settings": args.settings}
            )
            for index, w in enumerate(sorted(results)):
                mlflow.log_metrics({f"{k}": v for k, v in results[w].items()} | {"w": w}, step=index)
            mlflow.log_metric("monotonic", float(monotonic))
            mlflow.log_figure(figure, f"{stem}.png")
    print(json.dumps({"product": product, "requests": len(requests), "monotonic": monotonic, "levels": results}))


if __name__ == "__main__":
    main()
