"""badg against the generator contract, on a tiny seeded base at 32 px: one fit per defect type, its own masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from defectsynth.diffusion.factory import load_base_model
from defectsynth.generators.badg.generator import UNET_FILE
from helpers.generator_contract import PRODUCTS, GeneratorContract
from helpers.tiny_diffusion import tiny_model

SIDE = 32
TINY = {"steps": None, "batch_size": 2, "learning_rate": 1e-4, "sampling_steps": 3, "mask_threshold": 0.05}


class TestBADGContract(GeneratorContract):
    method = "badg"
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

    def test_background_measures_are_in_the_qc_scores(self, samples: list) -> None:
        for sample in samples:
            scores = sample.metadata.qc.scores
            assert scores["background_psnr"] > 0 and -1 <= scores["background_ssim"] <= 1

    def test_each_fit_holds_its_fine_tuned_unet(self, artifacts: Path, base_model: str) -> None:
        base = load_base_model(base_model).unet.state_dict()
        fitted = sorted(artifacts.rglob(UNET_FILE))
        assert fitted, f"no {UNET_FILE} under the artifacts"
        for path in fitted:
            state = load_file(str(path))
            assert state.keys() == base.keys()
            changed = [k for k in state if not torch.equal(state[k], base[k])]
            assert changed, f"{path}: the fit left every U-Net weight as the base's"
