"""anomalydiffusion against the generator contract the baselines meet, on a tiny seeded base at 32 px."""

from __future__ import annotations

import pytest

from helpers.generator_contract import PRODUCTS, GeneratorContract
from helpers.tiny_diffusion import tiny_model

SIDE = 32
PROMPT_LENGTH = 24  # "a photo of washer with" and six placeholder tokens take 19 positions
TINY = {
    "anomaly_tokens": 2,
    "spatial": {"depth": 18, "width": 8, "fpn_channels": 16},
    "mask_generator": {"steps": 3, "sampling_steps": 3, "batch_size": 2},
    "sampling_steps": 3,
    "batch_size": 2,
}


class TestAnomalyDiffusionContract(GeneratorContract):
    method = "anomalydiffusion"
    settings = TINY
    requests_per_source = 3
    resolution = SIDE
    sampler = "ddim"

    @pytest.fixture(scope="class")
    @classmethod
    def base_model(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        base = tiny_model(resolution=SIDE, words=PRODUCTS, prompt_length=PROMPT_LENGTH)
        return str(base.save(tmp_path_factory.mktemp("base")))

    def test_steps_are_its_sampling_steps(self, samples: list) -> None:
        assert {sample.metadata.steps for sample in samples} == {TINY["sampling_steps"]}
