"""What reaches a fitted cadiff's samples: its ControlNet (through SAIM) and its anomaly tokens' attention.

Loads a run's registered ``defectsynth-<product>-cadiff`` as ``bench/cadiff_intensity.py`` does (``--artifacts``: a
fitted directory instead, e.g. one ``bench/method_probe.py`` left) and generates the generate job's real-mask requests
(``--per-type`` per type) at w = ``--intensity``:

- ``controlnet_change``: the mean absolute change (0-1) inside the masks when the ControlNet's fused residuals are
  removed (every SAIM's zero-initialised projection set to zero, so the U-Net runs alone);
- ``controlnet_focus_change``: the same when IAR also re-weights the ControlNet's cross-attention
  (``focus_controlnet``), against the samples as fitted;
- ``token_probability``: per re-weighted layer, the anomaly tokens' mean softmax probability inside the masks, and
  ``uniform``, 1 / the text positions the softmax spans: a token the layer reads for the defect takes more than that.

The last line is one JSON object.

Usage:
    .venv/bin/python bench/cadiff_control.py --config configs/benchmark.yaml --product wood workdir=runs/benchmark
    .venv/bin/python bench/cadiff_control.py --quick   # a random tiny base fitted for 2 steps (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from cadiff_intensity import DEMO_CONFIG, quick_generator, run_generator  # bench/cadiff_intensity.py

from defectsynth.diffusion.attention_rules import MaskedReweight, pixel_map
from defectsynth.generators.base import Generator, Request
from defectsynth.generators.refine import measured_strength


def in_mask_change(first: list, second: list) -> float:
    """Mean absolute difference (0-1) of two sample lists inside their conditioning masks."""
    pairs = zip(first, second, strict=True)
    return float(np.mean([measured_strength(a.image, b.image, a.cond_mask) for a, b in pairs]))


def token_probabilities(generator: Generator, requests: list[Request]) -> dict[str, float]:
    """Per layer IAR re-weights, the anomaly tokens' mean probability inside the masks over a generation; and
    ``uniform``, 1 / the number of text positions the softmax spans."""
    seen: dict[str, list[float]] = defaultdict(list)
    edit = MaskedReweight.edit

    def recording(self: MaskedReweight, scores: torch.Tensor, probs: torch.Tensor, call) -> torch.Tensor:
        inside = pixel_map(self.mask, call.side, probs.shape[0], probs.device)[:, 0, :, 0] > 0.5
        tokens = probs[..., list(self.tokens)].mean(dim=(1, -1))  # (B, N): over heads and tokens
        if inside.any():
            seen[call.layer.path.split(".transformer")[0]].append(float(tokens[inside].mean()))
            seen["uniform"].append(1 / probs.shape[-1])
        return edit(self, scores, probs, call)

    MaskedReweight.edit = recording
    try:
        generator.generate(requests)
    finally:
        MaskedReweight.edit = edit
    return {layer: round(float(np.mean(values)), 4) for layer, values in seen.items()}


def measure(generator: Generator, requests: list[Request], intensity: float) -> dict:
    """The three measures of the module's docstring on ``requests`` at w = ``intensity``."""
    requests = [dataclasses.replace(r, intensity=intensity) for r in requests]
    fitted = generator.generate(requests)
    settings = generator.settings
    generator.settings = settings.model_copy(update={"focus_controlnet": True})
    focused = generator.generate(requests)
    generator.settings = settings
    probabilities = token_probabilities(generator, requests)
    with torch.no_grad():
        for saim in [*generator.fusion.down, generator.fusion.mid]:
            saim.proj.weight.zero_()
            saim.proj.bias.zero_()
    alone = generator.generate(requests)
    return {
        "requests": len(requests),
        "intensity": intensity,
        "controlnet_change": round(in_mask_change(fitted, alone), 5),
        "controlnet_focus_change": round(in_mask_change(fitted, focused), 5),
        "token_probability": probabilities,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--product", default="wood")
    parser.add_argument("--per-type", type=int, default=2)
    parser.add_argument("--intensity", type=float, default=1.0)
    parser.add_argument("--artifacts", type=Path, help="a fitted cadiff directory instead of the registered model")
    parser.add_argument("--quick", action="store_true", help="a random tiny base, seconds (smoke test)")
    parser.add_argument("overrides", nargs="*", help="config overrides naming the run, e.g. workdir=runs/benchmark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            generator, requests = quick_generator(Path(tmp))
        else:
            generator, requests = run_generator(
                Path(args.config), args.overrides, args.product, args.per_type, args.artifacts
            )
        result = {"product": requests[0].product, **measure(generator, requests, args.intensity)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
