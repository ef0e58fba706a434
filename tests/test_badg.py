"""BADG's parts: Eq. 5 on constructed tensors, the prompts' groups, Eq. 13's threshold, ablations, refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defectsynth.core.masked_similarity import psnr_in, ssim_in
from defectsynth.diffusion.attention import installed
from defectsynth.generators.badg.generator import BADGSettings, DisentanglementLoss, disentanglement_loss, refined_mask
from defectsynth.generators.badg.prompt import DEFECT_GROUP, MASK_GROUP, BADGPrompts, add_prompt_tokens
from defectsynth.generators.base import FitContext, build_generator
from defectsynth.generators.fit_units import FitUnit, fit_units, product_generator, unit_view
from defectsynth.generators.masks import load_source
from defectsynth.generators.training_pairs import latent_mask
from helpers.generator_contract import demo_product, make_requests
from helpers.tiny_diffusion import tiny_model
from test_badg_contract import SIDE, TINY


def test_the_loss_is_the_one_term_form_for_a_binary_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    noise, eps_defect, eps_background = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    mask = (torch.rand(2, 1, 8, 8, generator=generator) > 0.7).float()
    mixed = mask * eps_defect + (1 - mask) * eps_background
    expected = (noise - mixed).square().mean()  # the paper's second form of Eq. 5
    torch.testing.assert_close(disentanglement_loss(noise, eps_defect, eps_background, mask), expected)


def test_the_loss_ignores_the_background_branch_inside_and_the_defect_branch_outside() -> None:
    noise = torch.zeros(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    eps_defect = torch.where(mask.bool(), 0.0, 9.0).expand(1, 4, 4, 4)  # wrong only outside
    eps_background = torch.where(mask.bool(), 9.0, 0.0).expand(1, 4, 4, 4)  # wrong only inside
    assert float(disentanglement_loss(noise, eps_defect, eps_background, mask)) == 0.0


def test_refined_mask_thresholds_the_share_inside_the_conditioning_mask() -> None:
    attention = np.array([[0.2, 0.5, 0.7], [0.9, 0.49, 0.6]])
    cond = np.array([[1, 1, 1], [0, 1, 1]], dtype=bool)
    expected = np.array([[False, True, True], [False, False, True]])  # 0.9 lies outside the conditioning mask
    np.testing.assert_array_equal(refined_mask(attention, cond, 0.5), expected)
    to_peak = np.array([[False, True, True], [False, True, True]])  # over 0.35 = half of the mask's peak 0.7
    np.testing.assert_array_equal(refined_mask(attention, cond, 0.5, to_peak=True), to_peak)


@pytest.fixture
def model():
    return tiny_model(resolution=SIDE, words=("wood", "washer"))


def test_the_prompts_share_their_layout_and_name_their_groups(model) -> None:
    tokens = add_prompt_tokens(model, "missing_piece")
    prompts = BADGPrompts.for_type(model, tokens, "wood")
    c1, c2 = (model.tokenize([text])[0] for text in (prompts.defect, prompts.masked))
    (inside,) = prompts.inside
    assert c1[inside] == tokens.ids(DEFECT_GROUP)[0] and c2[inside] == tokens.ids(MASK_GROUP)[0]
    assert model.tokenizer.decode(c1[list(prompts.outside)]) == "a photo of wood"
    assert torch.equal(c1[:inside], c2[:inside])


def test_a_v_prediction_base_is_refused(model) -> None:
    tokens = add_prompt_tokens(model, "crack")
    model.scheduler.register_to_config(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="ε-prediction"):
        DisentanglementLoss(model, BADGPrompts.for_type(model, tokens, "wood"), BADGSettings())


def test_the_loss_module_feeds_the_masked_latent_and_c2_to_the_background_branch(model) -> None:
    tokens = add_prompt_tokens(model, "crack")
    loss_module = DisentanglementLoss(model, BADGPrompts.for_type(model, tokens, "wood"), BADGSettings())
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(_unet, args, kwargs, output) -> None:
        calls.append((args[0].detach(), kwargs["encoder_hidden_states"].detach(), output.sample.detach()))

    images = torch.rand(2, 3, SIDE, SIDE) * 2 - 1
    masks = torch.zeros(2, 1, SIDE, SIDE)
    masks[..., 4:12, 8:20] = 1
    handle = model.unet.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad(), installed(model.unet, loss_module.control):
        loss = loss_module(images, masks, torch.Generator().manual_seed(3))
    handle.remove()

    (noisy, c1, eps_defect), (masked, c2, eps_background) = calls
    m = latent_mask(masks, noisy.shape[-1])
    torch.testing.assert_close(masked, (1 - m) * noisy)  # z_t^m = (1 − m)⊙z_t, as Eq. 5 writes
    torch.testing.assert_close(c1, loss_module.contexts[0].expand_as(c1))
    torch.testing.assert_close(c2, loss_module.contexts[1].expand_as(c2))
    replay = torch.Generator().manual_seed(3)  # the same draws: the posterior sample, then ε
    noise = torch.randn(model.encode_images(images, replay).shape, generator=replay)
    torch.testing.assert_close(loss, disentanglement_loss(noise, eps_defect, eps_background, m))


def test_masked_similarity_measures() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    region = np.ones((16, 16), bool)
    region[4:8, 4:8] = False
    changed = image.copy()
    changed[4:8, 4:8] = 0  # only outside the region
    assert psnr_in(changed, image, region) == float("inf") and ssim_in(image, image, region) == pytest.approx(1.0)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    assert 20 < psnr_in(noisy, image, region) < 40 and ssim_in(noisy, image, region) < 1
    with pytest.raises(ValueError, match="region is empty"):
        psnr_in(image, image, np.zeros((16, 16), bool))


# -- fit and generate ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def product_split(tmp_path_factory: pytest.TempPathFactory):
    return demo_product(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_model(resolution=SIDE, words=("wood", "washer")).save(tmp_path_factory.mktemp("base")))


@pytest.mark.parametrize(
    "ablation",
    [
        {"loss": "naive"},
        {"masked_attention": False},
        {"mask_refinement": False},
        {"background_input": "full"},
        {"refine_scale": "share", "refine_steps": "late"},
        {"guidance_scale": 3.0, "guidance_rescale": 0.7},
        {"guidance_scale": 3.0, "x0_clamp": True},
    ],
    ids=[
        "naive-loss",
        "no-masked-attention",
        "no-refinement",
        "full-background-input",
        "share-late",
        "guided",
        "guided-clamped",
    ],
)
def test_each_ablation_fits_and_generates(ablation: dict, product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    generator = product_generator("badg", {**TINY, **ablation})
    artifacts = generator.fit(product, split, FitContext(output_dir=tmp_path, max_steps=1, base_model=base))
    generator.load(artifacts)
    (request,) = make_requests(product, split, "badg", 1, "real", resolution=SIDE)
    (sample,) = generator.generate([request])
    assert sample.image.shape == (SIDE, SIDE, 3) and {"background_psnr", "background_ssim"} <= set(
        sample.metadata.qc.scores
    )
    if not ablation.get("mask_refinement", True):
        np.testing.assert_array_equal(sample.mask, sample.cond_mask)


def test_a_fit_of_two_defect_types_is_refused(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    with pytest.raises(ValueError, match="one defect type at a time"):
        build_generator("badg", TINY).fit(product, split, FitContext(output_dir=tmp_path, max_steps=1, base_model=base))


def test_without_pasting_the_background_is_the_decoded_one(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    generator = product_generator("badg", {**TINY, "paste_background": False})
    generator.load(generator.fit(product, split, FitContext(output_dir=tmp_path, max_steps=1, base_model=base)))
    (request,) = make_requests(product, split, "badg", 1, "real", resolution=SIDE)
    (sample,) = generator.generate([request])
    outside, source = ~sample.cond_mask, load_source(request)
    assert not np.array_equal(sample.image[outside], source[outside])  # a random VAE does not reconstruct
    assert sample.metadata.qc.scores["background_psnr"] == pytest.approx(
        psnr_in(sample.image, source, outside), abs=0.06
    )


def test_fit_resumes_from_a_checkpoint(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    data, one_type = unit_view(product, split, fit_units("badg", split)[0])
    saved: list[Path] = []

    def keep(directory: Path, metrics: dict) -> None:
        saved.append(Path(shutil.copytree(directory, tmp_path / f"checkpoint-{len(saved)}")))

    context = FitContext(
        output_dir=tmp_path / "a", max_steps=3, base_model=base, checkpoint_every=2, save_checkpoint=keep
    )
    build_generator("badg", TINY).fit(data, one_type, context)
    assert len(saved) == 1
    reports: list[dict] = []
    resumed = dataclasses.replace(context, output_dir=tmp_path / "b", resume_from=saved[0], report=reports.append)
    build_generator("badg", TINY).fit(data, one_type, resumed)
    assert [r["step"] for r in reports] == [3.0]  # only the last step ran again
    curves = [json.loads((tmp_path / run / "curves.json").read_text())["loss"] for run in "ab"]
    assert len(curves[1]) == 3 and curves[1][:2] == curves[0][:2]


def test_grow_reports_each_sampling_step(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    data, view = unit_view(product, split, FitUnit(sorted(split.generator_train)[0]))
    generator = build_generator("badg", TINY)
    generator.load(generator.fit(data, view, FitContext(output_dir=tmp_path, max_steps=1, base_model=base)))
    (request,) = make_requests(data, view, "badg", 1, "real", resolution=SIDE)
    source, mask = load_source(request), np.zeros((SIDE, SIDE), bool)
    mask[8:16, 8:16] = True
    steps: list[tuple[int, tuple[int, ...]]] = []
    generator.grow([source], [mask], seeds=[0], on_step=lambda i, t, z, x0: steps.append((i, tuple(x0.shape))))
    assert [index for index, _ in steps] == list(range(TINY["sampling_steps"]))
    assert {shape[0] for _, shape in steps} == {1}
