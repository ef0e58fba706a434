"""cadiff against the generator contract, on a tiny seeded base at 32 px: it paints inside the mask, records w."""

from __future__ import annotations

import pytest

from helpers.generator_contract import PRODUCTS, GeneratorContract
from helpers.tiny_diffusion import tiny_model

SIDE = 32
TINY = {
    "batch_size": 2,
    "saim_heads": 2,
    "sampling_steps": 3,
    "guidance_scale": 2.0,
    "learning_rate": 1e-3,
    "token_learning_rate": 1e-2,
    "focus_threshold": 0.5,
}


class TestCADiffContract(GeneratorContract):
    method = "cadiff"
    settings = TINY
    requests_per_source = 3
    resolution = SIDE
    sampler = "ddim"

    @pytest.fixture(scope="class")
    @classmethod
    def base_model(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        base = tiny_model(resolution=SIDE, words=PRODUCTS)
        return str(base.save(tmp_path_factory.mktemp("base")))

    def test_steps_are_its_sampling_steps(self, samples: list) -> None:
        assert {sample.metadata.steps for sample in samples} == {TINY["sampling_steps"]}

    def test_intensity_is_the_default_draw(self, samples: list) -> None:
        assert all(0.5 <= sample.metadata.intensity <= 1.5 for sample in samples)
