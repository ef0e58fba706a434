"""The ``defectsynth`` command line.

Every command explains itself with ``--help``. User errors (bad data, bad config) print one
message naming the file, key or value and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from defectsynth.core.tracking_errors import TrackingStoreError, is_mlflow_error
from defectsynth.platform.config import ConfigError, load_config, verbose_overrides
from defectsynth.platform.logs import setup_logging
from defectsynth.platform.prepare import ensure_demo_data
from defectsynth.platform.summary import dataset_summary, shards_summary
from defectsynth.storage.demo import DEMO_PRODUCTS, write_demo
from defectsynth.storage.errors import DatasetError
from defectsynth.storage.exporters import EXPORTERS
from defectsynth.storage.fs import resolve
from defectsynth.storage.layouts import LAYOUTS, detect_layout, read_dataset
from defectsynth.storage.layouts.visa import DEFAULT_SPLIT_CSV, convert_to_mvtec
from defectsynth.storage.manifest import read_card, read_manifest
from defectsynth.storage.redact import redact
from defectsynth.storage.split import SplitSettings, make_split
from defectsynth.storage.verify import require_dataset, verify_dataset

logger = logging.getLogger(__name__)


def _products(text: str | None) -> list[str]:
    return [p for p in (text or "").split(",") if p]


def cmd_make_demo(args: argparse.Namespace) -> int:
    """Write procedural demo products in MVTec layout."""
    names = write_demo(
        args.out,
        size=args.size,
        seed=args.seed,
        train_good=args.train_good,
        test_good=args.test_good,
        per_defect=args.per_defect,
        products=_products(args.products) or None,
        progress=True,
    )
    print(f"wrote {len(names)} demo product(s) to {args.out}: {', '.join(names)}")
    print(f"contact sheet: {args.out / 'contact_sheet.png'}")
    return 0


def _split_settings(args: argparse.Namespace) -> SplitSettings:
    try:
        return SplitSettings(
            protocol=args.protocol, k=args.k, fold=args.fold, val_fraction=args.val_fraction, seed=args.seed
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the products, defect types, counts and the split of a dataset."""
    layout = args.layout if args.layout != "auto" else detect_layout(args.path)
    settings = _split_settings(args)
    products = read_dataset(args.path, layout, _products(args.products), validate=not args.no_validate, progress=True)
    print(dataset_summary(products, make_split(products, settings)))
    return 0


def cmd_convert_visa(args: argparse.Namespace) -> int:
    """Convert a VisA tree (split CSV layout) to the MVTec AD layout."""
    products = read_dataset(args.root, "visa", _products(args.products), progress=True)
    for product in products:
        print(f"{product.name} -> {convert_to_mvtec(product, args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the pipeline (finetune, generate, evaluate) on a config and say where everything landed."""
    from defectsynth.jobs.pipeline import pipeline  # Ray, MLflow and torch load only for this command
    from defectsynth.platform.cluster import leave_ray

    cfg = load_config(args.config, verbose_overrides(args.set, args.verbose))
    ensure_demo_data(cfg, progress=True)
    try:
        result = pipeline(cfg)
    finally:
        leave_ray()
    store = redact(cfg.tracking_uri)
    print("Where things are:")
    print(f"  split manifest   {cfg.workdir / 'split.json'}")
    for uri in result.datasets:
        print(f"  shards           {redact(uri)}   (defectsynth shards inspect {redact(uri)})")
    print(f"  score table      {result.report}")
    print(f"  MLflow store     {store}")
    print(f"  MLflow UI        mlflow ui --backend-store-uri {store}   (then open http://127.0.0.1:5000)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the Markdown score report of an experiment, a run or every defectsynth experiment."""
    from defectsynth.evaluation.metrics import STABLE_METRICS
    from defectsynth.evaluation.report import print_report  # MLflow loads only inside, for this command

    if args.metric is not None and args.metric not in STABLE_METRICS:
        msg = f"--metric {args.metric}: unknown metric; known: {', '.join(STABLE_METRICS)}"
        raise ConfigError(msg)
    print_report(_store(args), args.target, args.metric)
    return 0


def _store(args: argparse.Namespace) -> str:
    """The MLflow store a command reads: ``--tracking-uri``, the ``--config``'s, or MLFLOW_TRACKING_URI."""
    if args.tracking_uri:
        return args.tracking_uri
    if args.config is not None:
        return load_config(args.config).tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    msg = "no MLflow store given: pass --tracking-uri URI or --config FILE, or set MLFLOW_TRACKING_URI"
    raise ConfigError(msg)


def cmd_config_reference(args: argparse.Namespace) -> int:
    """Print the configuration reference (every key, type, default, description) as Markdown."""
    from defectsynth.platform.config_reference import config_reference

    print(config_reference(), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the registered versions with their scores, describe one, or move an alias to one by hand."""
    from mlflow.tracking import MlflowClient  # MLflow loads only for this command

    from defectsynth.platform import model_catalog

    client = MlflowClient(_store(args))
    if args.models_command == "list":
        rows = model_catalog.list_versions(client, args.product, args.method)
        print(model_catalog.versions_table(rows, args.metric) if rows else "no defectsynth-* model is registered")
    elif args.models_command == "describe":
        print(model_catalog.describe(client, args.reference))
    else:
        print(model_catalog.promote(client, args.reference, args.alias))
    return 0


def cmd_shards_inspect(args: argparse.Namespace) -> int:
    """Print a shard dataset's card and a summary of its manifest."""
    location = resolve(args.dir)
    require_dataset(location)
    print(shards_summary(location.uri, read_card(location), read_manifest(location)))
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    """Re-read every shard against the manifest; exit 0 when intact, 1 when problems were found."""
    report = verify_dataset(args.dir, progress=True)
    print(report.format(limit=args.limit))
    return 0 if report.ok else 1


def cmd_shards_export(args: argparse.Namespace) -> int:
    """Export a shard dataset to the anomalib Folder or the MVTec AD layout."""
    result = EXPORTERS[args.format](
        args.dir,
        args.out,
        products=_products(args.products) or None,
        defect_types=_products(args.defect_types) or None,
        qc_passed_only=not args.include_rejected,
    )
    print(result.describe())
    return 0


def _add_make_demo(data: argparse._SubParsersAction) -> None:
    names = ", ".join(DEMO_PRODUCTS)
    p = data.add_parser(
        "make-demo",
        help="write procedural demo products (MVTec layout)",
        description=f"Write the procedural demo products ({names}) in MVTec AD layout, with pixel masks, "
        "foreground masks for the objects, and a contact sheet. Deterministic for a seed.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (products must not exist yet)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--train-good", type=int, default=48, help="normal training images per product")
    p.add_argument("--test-good", type=int, default=16, help="normal test images per product")
    p.add_argument("--per-defect", type=int, default=9, help="images per defect type")
    p.add_argument("--products", help=f"comma-separated subset of {names}")
    p.set_defaults(func=cmd_make_demo)


def _add_inspect(data: argparse._SubParsersAction) -> None:
    p = data.add_parser(
        "inspect",
        help="list products, defect types, counts and the split",
        description="Read and validate a dataset (every image and mask is decoded once), then print its "
        "products, defect types, image counts and how the few-shot split divides them.",
    )
    p.add_argument("path", type=Path, help="dataset root holding one directory per product")
    p.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto", help="layout (default: detect)")
    p.add_argument("--products", help="comma-separated subset of products")
    p.add_argument("--protocol", choices=("third", "kshot", "twofold"), default="third", help="split protocol")
    p.add_argument("--k", type=int, help="shots per defect type (kshot)")
    p.add_argument("--fold", type=int, choices=(1, 2), help="training fold (twofold)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of training normals for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation carve")
    p.add_argument("--no-validate", action="store_true", help="skip decoding every image (faster)")
    p.set_defaults(func=cmd_inspect)


def _add_convert_visa(data: argparse._SubParsersAction) -> None:
    p = data.add_parser(
        "convert-visa",
        help="convert VisA to the MVTec AD layout",
        description=f"Read a VisA root through {DEFAULT_SPLIT_CSV} and write each product as an MVTec AD "
        "tree: one test directory per defect type (from image_anno.csv), masks as 0/255 PNGs.",
    )
    p.add_argument("root", type=Path, help="VisA root (holding split_csv/ and the product directories)")
    p.add_argument("out", type=Path, help="output root")
    p.add_argument("--products", help="comma-separated subset of products")
    p.set_defaults(func=cmd_convert_visa)


DIR_HELP = "dataset directory holding shards/, manifest.parquet and dataset.json: a local path or a URI (s3://...)"


def _add_shards(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "shards",
        help="inspect, verify and export WebDataset shard datasets",
        description="Inspect, verify and export generated datasets: WebDataset shards with manifest.parquet and "
        "dataset.json, in a local directory or under a URI (s3://...).",
    )
    sub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "inspect",
        help="print the dataset card and a manifest summary",
        description="Print the dataset card (samples, counts per product and defect type, shards, generators, "
        "content digest) and a summary of manifest.parquet (labels, intensity range, mask_area quartiles of "
        "the anomalous samples, qc rejected). Reads no tar.",
    )
    p.add_argument("dir", help=DIR_HELP)
    p.set_defaults(func=cmd_shards_inspect)

    p = sub.add_parser(
        "verify",
        help="re-read every shard against the manifest",
        description="Re-read every shard in full and check it against manifest.parquet and dataset.json: "
        "missing samples (in the manifest, in no readable shard), extra samples (in a shard, not in the "
        "manifest), corrupt samples (sha256 differs from the json digests, PNG does not decode, wrong image "
        "shape, mask not single-channel 0/255 or sized unlike the image, invalid json, missing member, "
        "manifest row naming another shard) and corrupt shards (truncated or unreadable tars, unsafe member "
        "names). Exit status: 0 when everything is intact, 1 when problems were found, 2 on a usage error "
        "such as a directory that does not exist.",
    )
    p.add_argument("dir", help=DIR_HELP)
    p.add_argument("--limit", type=int, default=50, help="problems listed per kind (default 50)")
    p.set_defaults(func=cmd_shards_verify)

    p = sub.add_parser(
        "export",
        help="export to the anomalib Folder or MVTec AD layout",
        description="Copy samples out of the shards as plain PNG files, numbered per product and defect type "
        "in key order (NNN), with OUT/<product>/keys.csv mapping each file to its sample key. "
        "anomalib-folder: <product>/normal/NNN.png (label-0 samples), <product>/abnormal/<type>/NNN.png and "
        "<product>/mask/<type>/NNN_mask.png; read it with anomalib's Folder(root=OUT/<product>, "
        "normal_dir='normal', abnormal_dir='abnormal', mask_dir='mask'). mvtec: <product>/train/good/NNN.png "
        "(label-0 samples), <product>/test/<type>/NNN.png and <product>/ground_truth/<type>/NNN_mask.png. "
        "Samples that failed the quality check are left out unless --include-rejected. A non-empty "
        "OUT/<product> directory is refused.",
    )
    p.add_argument("--format", choices=tuple(EXPORTERS), required=True, help="output layout")
    p.add_argument("dir", help=DIR_HELP)
    p.add_argument("out", type=Path, help="local output root; one directory per product is written under it")
    p.add_argument("--products", help="comma-separated subset of products")
    p.add_argument(
        "--defect-types", help="comma-separated subset of defect types (normals pass only if their type is listed)"
    )
    p.add_argument("--include-rejected", action="store_true", help="also export samples that failed the quality check")
    p.set_defaults(func=cmd_shards_export)


def _add_report(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "report",
        help="print the score tables of evaluate runs from MLflow",
        description="Read the evaluate runs (tag job=evaluate) of TARGET from MLflow and print the score report "
        "as Markdown, as saved in scores.md: the headline (each method's mean±std over detector seeds, overall "
        "and per defect type, with which differences exceed the seeds' spread), then per detector, product x "
        "method tables with per-method means, a per-defect-type table, and the dataset-quality and fidelity "
        "tables of the generators. Of several runs of one (product, method, detector, seed) the latest counts. "
        "Missing values (metrics undefined for a run) print '-'.",
    )
    p.add_argument(
        "target",
        help="an experiment name (defectsynth-wood) or id, a run id (an evaluate run, or a report run listing "
        "evaluate runs in evaluate_runs), or 'all' for every defectsynth-* experiment",
    )
    _add_store(p)
    p.add_argument(
        "--metric",
        help="metric of the per-defect-type tables (default: pixel_ap, or image_auroc / cls_accuracy for "
        "detectors without per-type pixel_ap)",
    )
    p.set_defaults(func=cmd_report)


def _add_store(parser: argparse.ArgumentParser) -> None:
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--tracking-uri", help="MLflow tracking URI (default: the MLFLOW_TRACKING_URI variable)")
    store.add_argument("--config", type=Path, help="YAML config whose MLflow store to read")


def _add_config(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="the configuration reference", description="Configuration tools.")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser(
        "reference", help="every config key with its type, default and meaning (docs/configuration.md)"
    ).set_defaults(func=cmd_config_reference)


def _add_models(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser(
        "models",
        help="the registered generators: list, describe, promote",
        description="Read the MLflow model registry as a person would, and move an alias by hand.",
    )
    sub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    listing = sub.add_parser("list", help="every defectsynth-* version with its aliases and scores")
    listing.add_argument("--product", help="only this product's models")
    listing.add_argument("--method", help="only this method's models")
    listing.add_argument("--metric", default="pixel_ap", help="the score column (an eval.<metric> tag; pixel_ap)")
    describe = sub.add_parser("describe", help="one version: description, tags, scores, fit parameters")
    describe.add_argument("reference", help="NAME/VERSION or NAME@ALIAS, e.g. defectsynth-wood-perlin@champion")
    promote = sub.add_parser("promote", help="point an alias (champion by default) at a version")
    promote.add_argument("reference", help="NAME/VERSION or NAME@ALIAS of the version to promote")
    promote.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    for parser in (listing, describe, promote):
        _add_store(parser)
    models.set_defaults(func=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="defectsynth",
        description="Synthesize industrial anomaly datasets: few-shot defect generators on Ray, "
        "tracked in MLflow, written as WebDataset shards.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's own output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="make, inspect and convert datasets", description="Dataset tools.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    _add_make_demo(data_commands)
    _add_inspect(data_commands)
    _add_convert_visa(data_commands)

    _add_shards(commands)

    demo = commands.add_parser(
        "demo",
        help="run the main flow on the embedded default",
        description="Load the config, make the demo products if missing, then run the pipeline on Ray: "
        "finetune each generator (Ray Train), generate WebDataset shards (Ray Data), evaluate a segmenter on "
        "real + synthetic data; print the score table and where the shards, MLflow store and report are.",
    )
    demo.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="YAML config")
    demo.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    demo.set_defaults(func=cmd_demo)

    _add_report(commands)
    _add_models(commands)
    _add_config(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``defectsynth`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except (DatasetError, ConfigError, ValueError, KeyError, TrackingStoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # pyarrow filesystems: unreachable object stores, permissions, a full disk
        if args.command != "shards":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_mlflow_error(err):
            raise
        print(f"error: {TrackingStoreError(f'running {args.command}', err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
