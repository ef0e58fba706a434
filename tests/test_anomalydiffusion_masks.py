"""AnomalyDiffusion's mask generator: textual inversion on masks (Eq. 9) and guided mask sampling (Eq. 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.anomalydiffusion.mask_generator import (
    MaskGeneratorSettings,
    images_to_masks,
    masks_to_images,
    sample_masks,
    train_mask_embedding,
)
from helpers.tiny_diffusion import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = "crack_mask"


def real_masks(side: int = 32) -> list[np.ndarray]:
    bar = np.zeros((side, side), dtype=bool)
    bar[side // 4 : side * 5 // 8, side // 3 : side * 7 // 16] = True
    strip = np.zeros((side, side), dtype=bool)
    strip[side // 8 : side // 4, side // 8 : side * 3 // 4] = True
    return [bar, strip]


def snapshot(model) -> dict[str, torch.Tensor]:
    parts = {"vae": model.vae, "unet": model.unet, "text_encoder": model.text_encoder}
    return {f"{n}.{k}": p.detach().clone() for n, part in parts.items() for k, p in part.named_parameters()}


@pytest.fixture(scope="module")
def trained():
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    settings = MaskGeneratorSettings(steps=30, sampling_steps=4)
    curve = train_mask_embedding(model, tokens, GROUP, real_masks(), settings, seed=0)
    return model, tokens, settings, curve


def test_only_the_mask_groups_rows_change_in_training() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("crack", count=2, initializer="crack")  # another group (e_a): AdamW's decay must not touch it
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[tokens.ids("crack")] += 1.0
    settings = MaskGeneratorSettings(steps=3, batch_size=2)
    before = snapshot(model)
    (key,) = [name for name in before if name.startswith("text_encoder.") and name.endswith("token_embedding.weight")]
    grown = model.text_encoder.get_input_embeddings().weight.shape[0]
    curve = train_mask_embedding(model, tokens, GROUP, real_masks(64), settings, seed=1)  # resized to 32
    after = snapshot(model)
    assert len(curve) == 3 and all(np.isfinite(curve))
    assert tokens.groups[GROUP] == ["<crack_mask>", "<crack_mask>_1", "<crack_mask>_2", "<crack_mask>_3"]
    # the group was added after `before`: its rows are new; every row that existed is unchanged
    table = after.pop(key)
    assert table.shape[0] == grown + 4
    torch.testing.assert_close(table[:grown], before.pop(key), rtol=0, atol=0)
    (init,) = model.tokenizer.encode("mask", add_special_tokens=False)
    assert bool((table[tokens.ids(GROUP)] != table[init]).any(dim=1).all())
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert torch.equal(value, before[name]), name
    assert not any(p.requires_grad for part in (model.vae, model.unet, model.text_encoder) for p in part.parameters())


def test_training_lowers_the_loss(trained) -> None:
    _, _, _, curve = trained
    assert len(curve) == 30
    assert np.mean(curve[-10:]) < np.mean(curve[:10])


def test_training_is_deterministic_per_seed() -> None:
    settings = MaskGeneratorSettings(steps=2, batch_size=2)
    runs = []
    for seed in (5, 5, 6):
        model = tiny_model()
        tokens = PlaceholderTokens(model)
        curve = train_mask_embedding(model, tokens, GROUP, real_masks(), settings, seed=seed)
        runs.append((curve, model.text_encoder.get_input_embeddings().weight[tokens.ids(GROUP)].detach()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_sampled_masks_are_bool_deterministic_and_batch_independent(trained) -> None:
    model, tokens, settings, _ = trained
    batch = sample_masks(model, tokens, GROUP, settings, seeds=[3, 4, 5])
    assert batch.dtype == np.bool_ and batch.shape == (3, 32, 32)
    alone = sample_masks(model, tokens, GROUP, settings, seeds=[4])
    pairs = sample_masks(model, tokens, GROUP, settings.model_copy(update={"sampling_batch": 2}), seeds=[5, 4, 3])
    np.testing.assert_array_equal(alone[0], batch[1])
    np.testing.assert_array_equal(pairs[::-1], batch)
    assert not np.array_equal(batch[0], batch[1])
    assert sample_masks(model, tokens, GROUP, settings, seeds=[]).shape == (0, 32, 32)


def test_masks_round_trip_through_images() -> None:
    masks = real_masks()
    images = masks_to_images(masks)
    assert images.shape == (2, 3, 32, 32) and images.min() == -1 and images.max() == 1
    np.testing.assert_array_equal(images_to_masks(images, 0.5), np.stack(masks))


def test_bad_inputs_fail() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    settings = MaskGeneratorSettings(steps=1)
    with pytest.raises(ValueError, match="at least one real mask"):
        train_mask_embedding(model, tokens, GROUP, [], settings, seed=0)
    with pytest.raises(ValueError, match="mask 1 is empty"):
        train_mask_embedding(model, tokens, GROUP, [real_masks()[0], np.zeros((32, 32), bool)], settings, seed=0)
    with pytest.raises(ValueError, match="no placeholder group 'crack_mask'"):
        sample_masks(model, tokens, GROUP, settings, seeds=[0])
    tokens.add(GROUP, count=2, initializer="mask")
    with pytest.raises(ValueError, match="has 2 tokens, but settings.tokens is 4"):
        train_mask_embedding(model, tokens, GROUP, real_masks(), settings, seed=0)


def test_settings_validation() -> None:
    settings = MaskGeneratorSettings()
    assert (settings.tokens, settings.learning_rate, settings.batch_size) == (4, 5e-3, 4)
    assert (settings.guidance_scale, settings.threshold) == (5.0, 0.5)
    with pytest.raises(ValidationError):
        MaskGeneratorSettings(unknown=1)
    with pytest.raises(ValidationError):
        MaskGeneratorSettings(tokens=0)
    with pytest.raises(ValidationError):
        MaskGeneratorSettings(threshold=1.0)
    with pytest.raises(ValidationError, match="scale_range"):
        MaskGeneratorSettings(scale_range=(1.2, 0.8))
    with pytest.raises(ValidationError):
        settings.steps = 5
