"""How far apart a fitted SeaS model keeps its defect types: what its U-Net reads from each type's prompt.

Loads a fitted seas artifact directory (``bench/method_probe.py --method seas`` writes one under ``<out>/product``)
and prints, over every pair of the product's defect types, the cosine similarity of the text encoder's output at the
<df> positions of their Unbalanced Abnormal prompts (averaged over the N tokens), and of the learned <df> rows
themselves. Near 1, the U-Net is asked for nearly the same thing whatever the type.

Usage:
    .venv/bin/python bench/seas_tokens.py /tmp/seas-wood/product
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from defectsynth.generators.base import build_generator
from defectsynth.generators.seas.prompt import anomaly_group


def mean_cosine(vectors: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean and minimum cosine similarity over every pair of ``vectors``."""
    pairs = [float(torch.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors.values(), 2)]
    return sum(pairs) / len(pairs), min(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    args = parser.parse_args()
    generator = build_generator("seas", {})
    generator.load(args.artifacts)
    model, prompts, tokens = generator.model, generator.prompts, generator.tokens
    if tokens is None:
        msg = "seas: this fit uses the generic prompt; it has no learned <df> rows"
        raise SystemExit(msg)
    contexts, rows = {}, {}
    with torch.no_grad():
        for defect_type in generator.defect_types:
            layout = prompts.abnormal(defect_type)
            contexts[defect_type] = model.encode_prompt([layout.text])[0].float()[list(layout.anomaly)].mean(dim=0)
            ids = tokens.ids(anomaly_group(generator.product, defect_type))
            rows[defect_type] = tokens.embedding.weight[ids].float().mean(dim=0)
    context_mean, context_min = mean_cosine(contexts)
    row_mean, row_min = mean_cosine(rows)
    print(f"{generator.product} ({len(contexts)} types): encoded <df> positions cosine mean {context_mean:.3f}")
    print(f"  min {context_min:.3f}; learned <df> rows cosine mean {row_mean:.3f}, min {row_min:.3f}")


if __name__ == "__main__":
    main()
