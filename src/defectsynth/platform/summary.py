"""Plain-text summaries of datasets and splits for the terminal (``defectsynth data inspect``)."""

from __future__ import annotations

from defectsynth.storage.records import ProductData
from defectsynth.storage.split import SplitManifest


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def table(header: list[str], rows: list[list[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = ["-" * w for w in widths]
    return "\n".join(_row(r, widths) for r in [header, rule, *rows])


def product_summary(product: ProductData, manifest: SplitManifest) -> str:
    """Counts of one product per defect type, and how the split divides them."""
    split = manifest.products[product.name]
    fg = ", foreground masks" if product.has_foreground else ""
    lines = [f"{product.name}  ({product.layout}, {product.root}{fg})"]
    rows = [
        [
            "good",
            str(len(product.normals) + len(product.test_normals)),
            f"{len(split.train_normals)} train + {len(split.val_normals)} val",
            str(len(split.test_normals)),
        ]
    ]
    for defect_type in product.defect_types:
        train = split.generator_train[defect_type]
        rows.append(
            [
                defect_type,
                str(len(product.defects_of(defect_type))),
                f"{len(train)}: {', '.join(i.rsplit('/', 1)[-1] for i in train)}",
                str(len(split.test_defects[defect_type])),
            ]
        )
    lines.append(table(["type", "images", "generator train (ids)", "test"], rows))
    return "\n".join(lines)


def dataset_summary(products: list[ProductData], manifest: SplitManifest) -> str:
    """The summary of every product, headed by the split protocol and the manifest digest."""
    settings = manifest.settings
    protocol = settings.protocol + (
        f" (k={settings.k})" if settings.k else f" (fold {settings.fold})" if settings.fold else ""
    )
    head = f"{len(products)} product(s); split protocol {protocol}, digest {manifest.digest()[:12]}"
    return "\n\n".join([head, *(product_summary(p, manifest) for p in products)])
