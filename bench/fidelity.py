"""Fidelity of each method's generated defects to the real ones of their type, per product, method and type.

Measures the datasets a run wrote (``generate``, under the config's workdir or ``generate.output``) with
``evaluation.dataset_quality.measure_dataset``, the call ``jobs.evaluate`` makes, the generator-training defects
of the split as references, and prints ``mask_shape_distance`` and ``appearance_distance``
(``evaluation/fidelity.py``: 0 = the real defects' feature distributions, 1 = about one product-wide std away)
per defect type and their mean over types. A method without a dataset is skipped with a line saying so.
The last line is one JSON object: ``{"distances": {product: {method: {key: value}}}, "seconds": ...}``.

Usage:
    .venv/bin/python bench/fidelity.py --config configs/demo.yaml   # after make demo (or its generate step)
    .venv/bin/python bench/fidelity.py --quick   # a tiny demo product, perlin and croppaste generated here
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from defectsynth.evaluation.dataset_quality import measure_dataset
from defectsynth.evaluation.settings import QualitySettings
from defectsynth.generators.base import FitContext, generator_class
from defectsynth.generators.fit_units import product_generator
from defectsynth.jobs.generate import product_requests
from defectsynth.platform.config import Config, load_config
from defectsynth.platform.prepare import PreparedData, prepare_dataset
from defectsynth.storage.dataset_writer import DatasetWriter

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
KEYS = ("mask_shape_distance", "appearance_distance")
QUICK = [
    "products=[wood]", "methods=[perlin,croppaste]", "data.resolution=32", "data.demo.size=32",
    "data.demo.train_good=4", "data.demo.test_good=1", "data.demo.per_defect=6", "generate.per_type=4",
]  # fmt: skip


def quick_overrides(root: Path) -> list[str]:
    """``QUICK`` with the demo data and the run's workdir under ``root``: where every bench's ``--quick`` starts."""
    return [*QUICK, f"data.root={root / 'data'}", f"workdir={root / 'run'}"]


def quick_datasets(cfg: Config, prepared: PreparedData, root: Path) -> None:
    """Fit each of ``cfg.methods`` (baselines: no training) and write its samples where ``generate`` would."""
    for method in cfg.methods:
        cls = generator_class(method)
        mask_source = cls.mask_sources[0] if cfg.generate.mask_source == "auto" else cfg.generate.mask_source
        with DatasetWriter(cfg.generate.dataset_uri(cfg.workdir, method)) as writer:
            for product in prepared.products:
                split = prepared.split.products[product.name]
                generator = product_generator(method, cfg.generators.get(method))  # per-type units too
                generator.fit(product, split, FitContext(output_dir=root / method / product.name, max_steps=1))
                for sample in generator.generate(product_requests(cfg, product, split, mask_source, cls)):
                    writer.write(sample)


def measure(cfg: Config, prepared: PreparedData) -> dict[str, dict[str, dict[str, float]]]:
    """The fidelity keys of every (product, method) with a dataset, printed per type as they come."""
    settings = QualitySettings()  # no feature networks: only the network-free metrics run
    results: dict[str, dict[str, dict[str, float]]] = {}
    for product in prepared.products:
        references = [i for ids in prepared.split.products[product.name].generator_train.values() for i in ids]
        for method in cfg.methods:
            uri = cfg.generate.dataset_uri(cfg.workdir, method)
            try:
                metrics = measure_dataset(
                    uri, product, method=method, resolution=cfg.data.resolution, reference_ids=references,
                    settings=settings,
                ).metrics  # fmt: skip
            except (FileNotFoundError, ValueError) as err:
                print(f"{product.name:>10} {method:>16}: skipped ({err})", flush=True)
                continue
            found = {key: value for key, value in metrics.items() if key.split(".")[0] in KEYS}
            results.setdefault(product.name, {})[method] = found
            for suffix in sorted({key.partition(".")[2] for key in found}, key=lambda s: (s == "", s)):
                names = [f"{key}.{suffix}" if suffix else key for key in KEYS]
                values = ", ".join(f"{name.split('.')[0]} {found.get(name, float('nan')):.3f}" for name in names)
                print(f"{product.name:>10} {method:>16} {suffix or 'mean':>14}: {values}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. workdir=runs/demo")
    parser.add_argument("--quick", action="store_true", help="a tiny demo product and the baselines, seconds")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            root = Path(tmp)
            cfg = load_config(DEMO_CONFIG, quick_overrides(root))
            prepared = prepare_dataset(cfg)
            quick_datasets(cfg, prepared, root / "artifacts")
        else:
            cfg = load_config(args.config, args.overrides)
            prepared = prepare_dataset(cfg)
        results = measure(cfg, prepared)
    print(json.dumps({"distances": results, "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
