"""SeaS's parts: the DA loss on hand-built maps, the prompts' token positions, the losses' terms, the ablations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.base import FitContext, build_generator
from defectsynth.generators.masks import load_source
from defectsynth.generators.seas.alignment import decoupled_anomaly_alignment, mask_at, token_mean
from defectsynth.generators.seas.generator import (
    SeaSGenerator,
    SeaSSettings,
    SeparationSharingLoss,
    extended_alpha_bar,
)
from defectsynth.generators.seas.prompt import SeaSPrompts, add_prompt_tokens
from defectsynth.generators.training_pairs import TrainingDefects
from defectsynth.storage.records import NORMAL
from helpers.generator_contract import assert_same_up_to_rounding, demo_product, make_requests
from helpers.tiny_diffusion import tiny_model
from test_seas_contract import SIDE, TINY


def square_mask(side: int = 8, top: int = 2, size: int = 3) -> torch.Tensor:
    mask = torch.zeros(1, 1, side, side)
    mask[..., top : top + size, top : top + size] = 1
    return mask


# -- the DA loss (Eq. 3) ---------------------------------------------------------------------------------------------


def test_da_loss_is_zero_when_the_maps_are_aligned() -> None:
    mask = square_mask()
    anomaly, normal = mask[:, 0], 1 - mask[:, 0]
    assert float(decoupled_anomaly_alignment(anomaly, normal, mask)) == pytest.approx(0.0, abs=1e-6)


def test_da_loss_first_term_is_the_mean_squared_error_to_the_mask() -> None:
    mask = square_mask()
    anomaly = torch.zeros(1, 8, 8)
    anomaly[0, 0, 0] = 1.0  # normalised: one hot cell outside the mask, zero inside
    expected = (anomaly - mask[:, 0]).square().mean()
    got = decoupled_anomaly_alignment(anomaly, 1 - mask[:, 0], mask, second_term=True)
    assert float(got) == pytest.approx(float(expected))


def test_da_loss_second_term_keeps_ob_out_of_the_mask() -> None:
    mask = square_mask()
    normal_inside = mask[:, 0] + 0.0  # <ob> attends to the defect: the second term's mean inside the mask is 1
    aligned = decoupled_anomaly_alignment(mask[:, 0], normal_inside, mask)
    assert float(aligned) == pytest.approx(1.0)
    assert float(decoupled_anomaly_alignment(mask[:, 0], normal_inside, mask, second_term=False)) == pytest.approx(0)


def test_da_loss_normalises_each_sample_so_scale_does_not_matter() -> None:
    mask = square_mask()
    small = 0.01 * mask[:, 0] + 0.002  # a softmax share never reaches 1: min-max makes it the mask again
    assert float(decoupled_anomaly_alignment(small, 1 - mask[:, 0], mask)) == pytest.approx(0.0, abs=1e-6)


def test_mask_at_keeps_a_thin_line() -> None:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 5, :] = 1  # a 1-px line
    assert mask_at(mask, 8)[0, 1].all()  # the cells the line crosses


def test_token_mean_reads_each_samples_positions() -> None:
    maps = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)
    got = token_mean(maps, [(1, 2), (3,)])
    torch.testing.assert_close(got[0], maps[0, 1:3].mean(dim=0))
    torch.testing.assert_close(got[1], maps[1, 3])


# -- prompts ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def model():
    return tiny_model(resolution=SIDE, words=("wood", "washer"), prompt_length=24)


def test_unbalanced_prompt_positions_are_the_placeholder_tokens(model) -> None:
    tokens = PlaceholderTokens(model)
    add_prompt_tokens(tokens, "wood", ["crack", "hole"], normal=1, anomaly=4)
    prompts = SeaSPrompts(model, tokens, "wood", "unbalanced")
    layout = prompts.abnormal("crack")
    assert layout.text == "a <ob_wood> with <df_wood_crack>, <df_wood_crack>_1, <df_wood_crack>_2, <df_wood_crack>_3"
    ids = model.tokenize([layout.text])[0]
    assert ids[list(layout.normal)].tolist() == tokens.ids("ob_wood")
    assert ids[list(layout.anomaly)].tolist() == tokens.ids("df_wood_crack")
    normal = prompts.normal()
    assert normal.text == "a <ob_wood>" and normal.anomaly == ()
    assert model.tokenize([normal.text])[0][list(normal.normal)].tolist() == tokens.ids("ob_wood")


def test_generic_prompt_positions_are_the_words(model) -> None:
    prompts = SeaSPrompts(model, None, "wood", "generic")
    layout = prompts.abnormal("crack")
    assert layout.text == "a photo of wood with crack"
    ids = model.tokenize([layout.text])[0]
    assert model.tokenizer.decode(ids[list(layout.normal)]) == "wood"
    assert model.tokenizer.decode(ids[list(layout.anomaly)]) == "crack"


@pytest.mark.parametrize(("initializer", "start_word"), [("defect", "defect"), ("type_name", "crack")])
def test_the_anomaly_rows_start_at_defect_or_at_the_types_own_word(model, initializer: str, start_word: str) -> None:
    tokens = PlaceholderTokens(model)
    add_prompt_tokens(tokens, "wood", ["crack", "hole"], normal=1, anomaly=2, initializer=initializer)
    weight = tokens.embedding.weight.detach()
    crack, hole = (weight[tokens.ids(f"df_wood_{t}")] for t in ("crack", "hole"))
    expected = weight[model.tokenizer.encode(start_word, add_special_tokens=False)].mean(dim=0)
    assert torch.equal(crack[0], expected) and torch.equal(crack[1], expected)
    assert torch.equal(crack, hole) is (initializer == "defect")  # the authors' start is one for every type


def test_a_prompt_longer_than_the_text_encoder_is_refused() -> None:
    small = tiny_model(resolution=SIDE, words=("wood",), prompt_length=8)
    tokens = PlaceholderTokens(small)
    add_prompt_tokens(tokens, "wood", ["crack"], normal=1, anomaly=4)
    with pytest.raises(ValueError, match="text encoder holds"):
        SeaSPrompts(small, tokens, "wood", "unbalanced").abnormal("crack")


# -- the losses of fine-tuning ----------------------------------------------------------------------------------------


def loss_module(model, **settings) -> tuple[SeparationSharingLoss, PlaceholderTokens]:
    tokens = PlaceholderTokens(model)
    add_prompt_tokens(tokens, "wood", ["crack"], normal=1, anomaly=2)
    prompts = SeaSPrompts(model, tokens, "wood", "unbalanced")
    return SeparationSharingLoss(model, prompts, SeaSSettings(alignment_blocks=(0, 1), **settings)), tokens


def batch(side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = torch.zeros(2, 1, side, side)
    masks[..., 8:16, 8:16] = 1
    return images, masks, torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_the_loss_has_the_noise_da_and_na_terms(model) -> None:
    from defectsynth.diffusion.attention import installed

    module, tokens = loss_module(model)
    abnormal, masks, normal = batch()
    weight = tokens.trainable_rows()
    model.unet.requires_grad_(True)
    with installed(model.unet, module.control):
        loss = module(abnormal, masks, ["crack", "crack"], normal, torch.Generator().manual_seed(0))
    assert set(module.parts) == {"noise_df", "da", "na"}
    assert float(loss.detach()) == pytest.approx(sum(module.parts.values()), rel=1e-5)
    loss.backward()
    assert weight.grad[tokens.ids("df_wood_crack")].abs().sum() > 0  # the DA and noise terms reach the <df> rows
    assert weight.grad[tokens.ids("ob_wood")].abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


def test_the_na_loss_is_the_noise_loss_of_the_normal_images_under_the_normal_prompt(model) -> None:
    from defectsynth.diffusion.attention import installed
    from defectsynth.diffusion.pretrain import denoising_loss

    module, _ = loss_module(model)
    _, _, normal = batch()
    nothing = torch.empty(0, *normal.shape[1:])
    with torch.no_grad(), installed(model.unet, module.control):
        loss = module(nothing, nothing[:, :1], [], normal, torch.Generator().manual_seed(4))
        replay = torch.Generator().manual_seed(4)  # the same draws: the posterior sample, then t and ε
        latents = model.encode_images(normal, replay)
        context = model.encode_prompt([module.prompts.normal().text] * len(normal))
        expected = denoising_loss(model, latents, context, replay)
    assert set(module.parts) == {"na"}
    torch.testing.assert_close(loss, expected)


def test_without_the_na_loss_normal_images_are_not_used(model) -> None:
    from defectsynth.diffusion.attention import installed

    module, _ = loss_module(model, normal_alignment=False)
    abnormal, masks, normal = batch()
    with installed(model.unet, module.control):
        module(abnormal, masks, ["crack", "crack"], normal, torch.Generator().manual_seed(0))
    assert set(module.parts) == {"noise_df", "da"}


def test_the_defect_loss_weight_raises_the_noise_term_by_the_error_inside_the_mask(model) -> None:
    from defectsynth.diffusion.attention import installed

    module, _ = loss_module(model)
    abnormal, masks, normal = batch()
    terms = []
    for weight in (0.0, 4.0):
        module.settings = module.settings.model_copy(update={"defect_loss_weight": weight})
        with installed(model.unet, module.control):
            module(abnormal, masks, ["crack", "crack"], normal, torch.Generator().manual_seed(0))
        terms.append(module.parts)
    plain, weighted = terms
    assert weighted["noise_df"] > plain["noise_df"]  # the same draw, the mask's cells weighted 5x
    assert weighted["na"] == pytest.approx(plain["na"])  # normal images carry no mask: L_ob unchanged


def test_alignment_blocks_without_cross_attention_are_an_error(model) -> None:
    from defectsynth.diffusion.attention import installed

    module, _ = loss_module(model)
    module.settings = module.settings.model_copy(update={"alignment_blocks": (2,)})  # the down block without attention
    module.recorder.where = dataclasses.replace(module.recorder.where, paths=["down_blocks.2.*"])
    abnormal, masks, normal = batch()
    with installed(model.unet, module.control), pytest.raises(ValueError, match="no cross-attention"):
        module(abnormal, masks, ["crack", "crack"], normal, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("settings", "shares"),
    [
        ({}, [2, 2, 2, 2]),
        ({"mixed_training": False}, [4, 4, 0, 0]),  # Table 12's Abnormal-Normal order
        ({"normal_alignment": False}, [4, 4, 4, 4]),
    ],
)
def test_batch_composition(settings: dict, shares: list[int]) -> None:
    generator = SeaSGenerator(SeaSSettings(**settings))
    assert [generator._abnormal_share(step, 4) for step in range(4)] == shares


@pytest.mark.parametrize("rotation", [True, False])
def test_rotation_turns_the_normals_as_the_anomalies_or_turns_neither(rotation: bool) -> None:
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:5, 3:9] = True
    generator = SeaSGenerator(SeaSSettings(rotation=rotation))
    defects = TrainingDefects([image], [mask], [("wood", "crack")])
    moved = {"anomalies": False, "normals": False}
    for step in range(8):
        images, _, _, normals = generator._draw(defects, [image], np.random.default_rng(step), 2, 4)
        moved["anomalies"] |= any(not np.array_equal(i, image) for i in images)
        moved["normals"] |= any(not np.array_equal(n, image) for n in normals)
    assert moved == {"anomalies": rotation, "normals": rotation}


def test_steps_follow_the_number_of_defect_types() -> None:
    generator = SeaSGenerator(SeaSSettings(steps_per_type=800, mask_steps_per_type=None))
    assert generator._steps(types=6, max_steps=10) == (4800, 4800)  # the paper's 800 x types
    generator = SeaSGenerator(SeaSSettings(steps_per_type=None, mask_steps_per_type=25))
    assert generator._steps(types=6, max_steps=10) == (10, 150)


def test_stretched_schedule_reads_t_1500_as_the_authors_do(model) -> None:
    at_end = float(model.scheduler.alphas_cumprod[-1])
    assert extended_alpha_bar(model, 1000) == pytest.approx(at_end, rel=1e-4)  # no stretch: the training schedule
    assert extended_alpha_bar(model, 1500) < at_end / 10  # far noisier than the schedule's last step


# -- fit, generate, ablations ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def product_split(tmp_path_factory: pytest.TempPathFactory):
    return demo_product(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 40 positions: the generic prompt spells defect names outside the tokenizer's words byte by byte
    model = tiny_model(resolution=SIDE, words=("wood", "washer"), prompt_length=40)
    return str(model.save(tmp_path_factory.mktemp("base")))


def fitted(settings: dict, product_split, base: str, out: Path, steps: int = 2) -> SeaSGenerator:
    product, split = product_split
    generator = build_generator("seas", settings)
    generator.fit(product, split, FitContext(output_dir=out, max_steps=steps, base_model=base))
    loaded = build_generator("seas", settings)
    loaded.load(out)
    return loaded


@pytest.mark.parametrize(
    "ablation",
    [
        {"prompt": "generic"},
        {"mixed_training": False},
        {"normal_alignment": False},
        {"da_second_term": False},
        {"mask": {**TINY["mask"], "refinement": "coarse_only"}},
    ],
    ids=["generic-prompt", "no-mixed", "no-na", "no-second-term", "coarse-only"],
)
def test_each_ablation_fits_and_generates(ablation: dict, product_split, base: str, tmp_path: Path) -> None:
    generator = fitted({**TINY, **ablation}, product_split, base, tmp_path)
    product, split = product_split
    (sample,) = generator.generate(make_requests(product, split, "seas", 1, "learned", resolution=SIDE))
    assert sample.image.shape == (SIDE, SIDE, 3) and sample.cond_mask is None
    assert (tmp_path / "tokens.safetensors").is_file() == (ablation.get("prompt") != "generic")


def test_normal_and_anomalous_prompts_make_different_images(product_split, base: str, tmp_path: Path) -> None:
    generator = fitted(TINY, product_split, base, tmp_path)
    product, split = product_split
    (request,) = make_requests(product, split, "seas", 1, "learned", resolution=SIDE)
    normal = dataclasses.replace(request, label=0, defect_type=NORMAL)
    anomalous, made = generator.generate([request, normal])
    assert made.metadata.label == 0 and not made.mask.any()
    assert anomalous.image.tobytes() != made.image.tobytes()


def test_fit_resumes_from_a_checkpoint_in_the_mask_phase(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    saved: list[Path] = []

    def keep(directory: Path, metrics: dict) -> None:
        copy = tmp_path / f"checkpoint-{len(saved)}"
        copy.mkdir()
        for file in directory.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        saved.append(copy)

    settings = TINY
    context = FitContext(
        output_dir=tmp_path / "a", max_steps=3, base_model=base, checkpoint_every=2, save_checkpoint=keep
    )
    build_generator("seas", settings).fit(product, split, context)
    assert len(saved) == 2  # step 2 of the generator phase, step 2 of the mask phase
    reports: list[dict] = []
    resumed = dataclasses.replace(
        context,
        output_dir=tmp_path / "b",
        resume_from=saved[-1],
        report=reports.append,
        save_checkpoint=lambda d, m: None,
    )
    build_generator("seas", settings).fit(product, split, resumed)
    assert [r.get("mask_step") for r in reports] == [3.0]  # only the mask phase's last step ran again
    assert np.isfinite(reports[0]["mask_loss"])


def test_a_start_step_inside_the_schedule_keeps_more_of_the_normal(product_split, base: str, tmp_path: Path) -> None:
    product, split = product_split
    (request,) = make_requests(product, split, "seas", 1, "learned", resolution=SIDE)
    source = load_source(request).astype(np.float64)
    distances = {}
    for step in (1500, 300):
        generator = fitted({**TINY, "start_noise_step": step}, product_split, base, tmp_path / str(step))
        (sample,) = generator.generate([request])
        distances[step] = np.abs(sample.image - source).mean()
    assert distances[300] < distances[1500]


def test_generation_switches_change_the_image_and_keep_each_sample_its_own(
    product_split, base: str, tmp_path: Path
) -> None:
    generator = fitted(TINY, product_split, base, tmp_path)
    product, split = product_split
    requests = make_requests(product, split, "seas", 2, "learned", resolution=SIDE)
    plain, fitted_settings = generator.generate(requests[:1])[0].image, generator.settings
    made = {}
    switches = {
        "ddim": {"sampler": "ddim"},
        "eta": {"sampler": "ddim", "eta": 1.0},
        "negative": {"negative_prompt": "normal"},
    }
    for name, update in switches.items():
        generator.settings = fitted_settings.model_copy(update=update)
        alone = generator.generate(requests[:1])[0]
        assert_same_up_to_rounding(generator.generate(requests)[0], alone)  # η's noise: the sample's own seed
        made[name] = alone.image
    assert len({image.tobytes() for image in (plain, *made.values())}) == 1 + len(switches)


def test_eta_needs_the_ddim_sampler() -> None:
    with pytest.raises(ValueError, match="eta 1.0 needs sampler 'ddim'"):
        SeaSSettings(eta=1.0)
    assert SeaSSettings(eta=1.0, sampler="ddim").eta == 1.0
