"""x0_clamp across the diffusion generators: the fit records its latent range, generation clamps to it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defectsynth.diffusion.latent_range import LatentRange
from defectsynth.generators.base import ARTIFACT_FILE, FitContext, generator_class
from defectsynth.generators.fit_units import product_generator
from helpers.generator_contract import PRODUCTS, demo_product, make_requests
from helpers.tiny_diffusion import tiny_model
from test_anomalydiffusion_contract import TINY as ANOMALYDIFFUSION
from test_badg_contract import TINY as BADG
from test_cadiff_contract import TINY as CADIFF
from test_seas_contract import TINY as SEAS

SIDE = 32
METHODS = {"anomalydiffusion": ANOMALYDIFFUSION, "badg": BADG, "cadiff": CADIFF, "seas": SEAS}


@pytest.fixture(scope="module")
def product_split(tmp_path_factory: pytest.TempPathFactory):
    return demo_product(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_model(resolution=SIDE, words=PRODUCTS).save(tmp_path_factory.mktemp("base")))


def unit_manifests(artifacts: Path) -> list[Path]:
    """The ``generator.json`` of each fitted unit: the product's own, or one per defect type."""
    units = sorted(artifacts.glob(f"units/*/{ARTIFACT_FILE}"))
    return units or [artifacts / ARTIFACT_FILE]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_x0_clamp_records_the_range_and_bounds_generation(method: str, product_split, base: str, tmp_path: Path):
    product, split = product_split
    settings = {**METHODS[method], "x0_clamp": True}
    generator = product_generator(method, settings)
    artifacts = generator.fit(product, split, FitContext(output_dir=tmp_path, max_steps=1, base_model=base))
    for manifest in unit_manifests(artifacts):
        bounds = LatentRange.from_json(json.loads(manifest.read_text())["latent_range"])
        assert bounds.low.shape == (4,) and bool((bounds.low < bounds.high).all())

    sources = generator_class(method).mask_sources
    requests = make_requests(product, split, method, 2, "real" if "real" in sources else sources[0], resolution=SIDE)
    generator = product_generator(method, settings)
    generator.load(artifacts)
    recorded = [s.image for s in generator.generate(requests)]
    units = getattr(generator, "units", {None: generator}).values()
    for unit in units:  # a range narrower than anything the latents reach must change what is painted
        unit.latent_range = LatentRange(low=torch.full((4,), -0.05), high=torch.full((4,), 0.05))
    narrowed = [s.image for s in generator.generate(requests)]
    assert any(not np.array_equal(a, b) for a, b in zip(recorded, narrowed, strict=True))

    manifest = unit_manifests(artifacts)[0]
    fields = json.loads(manifest.read_text())
    del fields["latent_range"]
    manifest.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="latent_range"):
        product_generator(method, settings).load(artifacts)
