"""seas against the generator contract, on a tiny seeded base at 32 px: it remakes whole images and makes normals."""

from __future__ import annotations

import pytest

from helpers.generator_contract import PRODUCTS, GeneratorContract
from helpers.tiny_diffusion import tiny_model

SIDE = 32
TINY = {
    "steps_per_type": None,  # finetune.max_steps, as the contract sets it
    "mask_steps_per_type": None,
    "anomaly_tokens": 2,
    "normal_images": 4,
    "alignment_blocks": [0, 1],  # the test base has cross-attention in its first two down blocks
    "mask_unet_blocks": [0, 1],
    "mask_vae_blocks": [0, 1],  # its VAE decoder has two up blocks
    "mask": {
        "coarse_channels": [16, 8],
        "transformer_layers": 1,
        "attention_heads": 2,
        "refine_channels": 16,
        "norm_groups": 8,
    },
    "sampling_steps": 3,
    "mask_average_steps": 2,
    "guidance_scale": 2.0,
}


class TestSeaSContract(GeneratorContract):
    method = "seas"
    settings = TINY
    requests_per_source = 4
    resolution = SIDE
    sampler = "dpm_solver++"

    @pytest.fixture(scope="class")
    @classmethod
    def base_model(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        base = tiny_model(resolution=SIDE, words=PRODUCTS)
        return str(base.save(tmp_path_factory.mktemp("base")))

    def test_steps_are_its_sampling_steps(self, samples: list) -> None:
        assert {sample.metadata.steps for sample in samples} == {TINY["sampling_steps"]}
