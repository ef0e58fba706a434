"""CADiff's parts: the prompt's token positions, the loss's terms and gradients, intensity, ablations, resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defectsynth.diffusion.attention import installed
from defectsynth.diffusion.controlnet import PART, new_controlnet
from defectsynth.generators.base import FitContext, build_generator
from defectsynth.generators.cadiff.generator import CADiffSettings, ContextAwareLoss, concept_maps, maps_by_side
from defectsynth.generators.cadiff.prompt import ContextPrompts
from defectsynth.generators.cadiff.saim import SAIMFusion
from helpers.generator_contract import demo_product, make_requests
from helpers.tiny_diffusion import tiny_model
from test_cadiff_contract import SIDE, TINY

# -- prompts ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def model():
    return tiny_model(resolution=SIDE, words=("wood", "washer"))


def test_prompt_positions_are_the_learnable_tokens(model) -> None:
    prompts = ContextPrompts.add_tokens(model, "wood", ["crack", "hole"], anomaly_tokens=2)
    layout = prompts.abnormal("hole")
    assert layout.text == "a photo of <ctx_wood> with <an_wood_hole> <an_wood_hole>_1"
    ids = model.tokenize([layout.text])[0]
    assert ids[list(layout.context)].tolist() == prompts.tokens.ids("ctx_wood")
    assert ids[list(layout.anomaly)].tolist() == prompts.tokens.ids("an_wood_hole")
    assert layout.is_context == (True, False, False)
    assert prompts.abnormal("crack").anomaly == layout.anomaly  # every type's prompt has the same layout


def test_a_prompt_longer_than_the_text_encoder_is_refused() -> None:

    small = tiny_model(resolution=SIDE, words=("wood",), prompt_length=8)
    with pytest.raises(ValueError, match="text encoder holds"):
        ContextPrompts.add_tokens(small, "wood", ["crack"], anomaly_tokens=4)


def test_an_unknown_defect_type_is_an_error(model) -> None:
    prompts = ContextPrompts.add_tokens(model, "wood", ["crack"], anomaly_tokens=1)
    with pytest.raises(ValueError, match="no tokens for wood/hole"):
        prompts.abnormal("hole")


# -- the loss (Eq. 8) ------------------------------------------------------------------------------------------------


def test_maps_by_side_averages_layers_and_picks_tokens() -> None:
    first, second = torch.rand(2, 6, 4, 4), torch.rand(2, 6, 4, 4)
    by_side = maps_by_side({"a": first, "b": second, "c": torch.rand(2, 6, 2, 2)}, [1, 3])
    assert set(by_side) == {4, 2}
    torch.testing.assert_close(by_side[4], (first[:, [1, 3]] + second[:, [1, 3]]) / 2)


def test_concept_maps_average_context_and_anomaly_tokens() -> None:
    maps = torch.rand(2, 3, 4, 4)
    got = concept_maps(maps, (True, False, False))
    torch.testing.assert_close(got[:, 0], maps[:, 0])
    torch.testing.assert_close(got[:, 1], maps[:, 1:].mean(dim=1))


def loss_module(model, **settings) -> ContextAwareLoss:
    prompts = ContextPrompts.add_tokens(model, "wood", ["crack"], anomaly_tokens=1)
    model.parts[PART] = new_controlnet(model)
    s = CADiffSettings(**{"saim_heads": 2, **settings})
    fusion = SAIMFusion.for_model(model, heads=2) if s.saim else None
    return ContextAwareLoss(model, prompts, fusion, s)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = torch.zeros(2, 1, SIDE, SIDE)
    masks[..., 8:16, 8:16] = 1
    return images, masks


def run_loss(module: ContextAwareLoss) -> torch.Tensor:
    images, masks = batch()
    with installed(module.model.unet, module.control):
        return module(images, masks, "crack", torch.Generator().manual_seed(0))


def test_the_loss_has_its_three_terms_and_reaches_every_trained_part(model) -> None:
    module = loss_module(model)
    weight = module.prompts.tokens.trainable_rows()
    for part in (module.controlnet, module.fusion):
        part.requires_grad_(True)
    loss = run_loss(module)
    assert set(module.parts) == {"noise", "loc", "con"}
    parts, settings = module.parts, module.settings
    expected = parts["noise"] + settings.localization_weight * parts["loc"] + settings.contrastive_weight * parts["con"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert weight.grad[module.prompts.tokens.ids("ctx_wood")].abs().sum() > 0
    assert weight.grad[module.prompts.tokens.ids("an_wood_crack")].abs().sum() > 0
    assert module.fusion.down[0].proj.weight.grad.abs().sum() > 0  # the zero projections learn first
    assert all(p.grad is None for p in model.unet.parameters())  # the U-Net is frozen

    with torch.no_grad():  # once they are not zero (after a first step), the ControlNet's gradient flows too
        for saim in module.fusion.saims():
            saim.proj.weight.normal_(std=0.01, generator=torch.Generator().manual_seed(3))
    run_loss(module).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.controlnet.parameters())


def test_without_the_regularisers_only_the_noise_loss_is_left(model) -> None:
    module = loss_module(model, localization_loss=False, contrastive_loss=False)
    loss = run_loss(module)
    assert set(module.parts) == {"noise"} and float(loss.detach()) == pytest.approx(module.parts["noise"], rel=1e-6)


def test_a_fresh_saim_predicts_as_a_plain_controlnet(model) -> None:

    off = {"localization_loss": False, "contrastive_loss": False}
    with_saim = run_loss(loss_module(model, **off)).detach()
    plain = run_loss(loss_module(tiny_model(resolution=SIDE, words=("wood", "washer")), saim=False, **off)).detach()
    assert float(with_saim) == pytest.approx(float(plain), rel=1e-5)  # zero-initialised projections add nothing


def test_attention_resolutions_without_cross_attention_are_an_error(model) -> None:
    module = loss_module(model, attention_resolutions=(3,))
    with pytest.raises(ValueError, match="no cross-attention at sides"):
        run_loss(module)


# -- fit, generate, intensity, ablations -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def product_split(tmp_path_factory: pytest.TempPathFactory):
    return demo_product(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:

    return str(tiny_model(resolution=SIDE, words=("wood", "washer")).save(tmp_path_factory.mktemp("base")))


def fitted(settings: dict, product_split, base: str, out: Path, steps: int = 2):
    product, split = product_split
    build_generator("cadiff", settings).fit(
        product, split, FitContext(output_dir=out, max_steps=steps, base_model=base)
    )
    loaded = build_generator("cadiff", settings)
    loaded.load(out)
    return loaded


@pytest.fixture(scope="module")
def generator(product_split, base: str, tmp_path_factory: pytest.TempPathFactory):
    return fitted(TINY, product_split, base, tmp_path_factory.mktemp("cadiff"))


def real_request(product_split, index: int = 0):
    product, split = product_split
    return make_requests(product, split, "cadiff", index + 1, "real", resolution=SIDE)[index]


def test_the_requested_intensity_is_the_samples(generator, product_split) -> None:
    request = real_request(product_split)
    drawn, asked = generator.generate([request, dataclasses.replace(request, intensity=-1.75)])
    assert 0.5 <= drawn.metadata.intensity <= 1.5 and asked.metadata.intensity == -1.75
    assert drawn.metadata.intensity == generator.generate([request])[0].metadata.intensity  # drawn from the seed


def test_an_intensity_outside_the_domain_is_an_error(generator, product_split) -> None:
    with pytest.raises(ValueError, match=r"2.5 is outside its domain \[-2.0, 2.0\]"):
        generator.generate([dataclasses.replace(real_request(product_split), intensity=2.5)])


def test_intensity_changes_only_the_masked_pixels(generator, product_split) -> None:
    request = real_request(product_split)
    weak, strong = generator.generate([dataclasses.replace(request, intensity=w) for w in (0.0, 2.0)])
    inside = weak.cond_mask.astype(bool)
    assert not np.array_equal(weak.image[inside], strong.image[inside])
    assert np.array_equal(weak.image[~inside], strong.image[~inside])


@pytest.mark.parametrize(
    "ablation",
    [
        {"saim": False},
        {"iar": False},
        {"masked_focus": False},
        {"delayed_focus": False},
        {"localization_loss": False, "contrastive_loss": False},
        {"localization_form": "per_token"},
    ],
    ids=["no-saim", "no-iar", "no-mfa", "no-dfs", "no-regularisers", "per-token-loc"],
)
def test_each_ablation_fits_and_generates(ablation: dict, product_split, base: str, tmp_path: Path) -> None:
    generator = fitted({**TINY, **ablation}, product_split, base, tmp_path, steps=1)
    (sample,) = generator.generate([real_request(product_split)])
    assert sample.image.shape == (SIDE, SIDE, 3) and sample.cond_mask is not None
    assert (tmp_path / "saim.safetensors").is_file() == ablation.get("saim", True)
    assert (tmp_path / PART / "config.json").is_file()  # the ControlNet in diffusers' layout


def test_iar_switches_change_the_sample(product_split, base: str, tmp_path: Path) -> None:
    generator = fitted({**TINY, "focus_threshold": 0.01}, product_split, base, tmp_path, steps=1)
    request = dataclasses.replace(real_request(product_split), intensity=2.0)
    (with_iar,) = generator.generate([request])
    generator.settings = generator.settings.model_copy(update={"iar": False})
    (without,) = generator.generate([request])
    assert not np.array_equal(with_iar.image, without.image)


def test_focus_on_the_controlnet_changes_the_sample_and_leaves_its_processors(
    product_split, base: str, tmp_path: Path
) -> None:
    generator = fitted({**TINY, "delayed_focus": False, "saim": False}, product_split, base, tmp_path, steps=1)
    controlnet = generator.model.part(PART)
    with torch.no_grad():  # a plain ControlNet whose zero convolutions have learnt: its attention reaches the sample
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    processors = {path: type(p) for path, p in controlnet.attn_processors.items()}
    request = dataclasses.replace(real_request(product_split), intensity=2.0)
    (unet_only,) = generator.generate([request])
    generator.settings = generator.settings.model_copy(update={"focus_controlnet": True})
    (both,) = generator.generate([request])
    inside = both.cond_mask.astype(bool)
    assert not np.array_equal(unet_only.image[inside], both.image[inside])
    assert np.array_equal(unet_only.image[~inside], both.image[~inside])
    assert {path: type(p) for path, p in controlnet.attn_processors.items()} == processors


def test_fit_resumes_from_a_checkpoint(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    saved: list[Path] = []

    def keep(directory: Path, metrics: dict) -> None:
        saved.append(Path(shutil.copytree(directory, tmp_path / f"checkpoint-{len(saved)}")))

    context = FitContext(
        output_dir=tmp_path / "a", max_steps=3, base_model=base, checkpoint_every=2, save_checkpoint=keep
    )
    build_generator("cadiff", TINY).fit(product, split, context)
    assert len(saved) == 1 and (saved[0] / PART / "config.json").is_file()
    reports: list[dict] = []
    resumed = dataclasses.replace(context, output_dir=tmp_path / "b", resume_from=saved[0], report=reports.append)
    build_generator("cadiff", TINY).fit(product, split, resumed)
    assert [r["step"] for r in reports] == [3.0]  # only the last step ran again
    curves = [json.loads((tmp_path / run / "curves.json").read_text())["loss"] for run in "ab"]
    assert len(curves[1]) == 3 and curves[1][:2] == curves[0][:2]


def test_the_defect_loss_weight_scales_the_error_inside_the_mask(model) -> None:
    module = loss_module(model, defect_loss_weight=4.0)
    masks = torch.zeros(1, 1, SIDE, SIDE)
    masks[..., :2, :2] = 1
    weights = module._weights(masks, torch.zeros(1, 4, SIDE // 2, SIDE // 2))
    assert weights[0, 0, 0, 0] == 5 and weights[0, 0, -1, -1] == 1  # the mask's latent cell, a cell outside
    module.settings = module.settings.model_copy(update={"defect_loss_weight": 0.0})
    assert module._weights(masks, torch.zeros(1, 4, SIDE // 2, SIDE // 2)) is None  # the paper's plain loss


def test_settings_saved_with_one_focus_side_load_as_focus_resolutions() -> None:
    assert CADiffSettings.model_validate({"focus_resolution": 8}).focus_resolutions == (8,)
    assert CADiffSettings().focus_resolutions == (16,)
