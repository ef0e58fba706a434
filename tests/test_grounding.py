"""The grounding loss of the tiny base's pretraining: a mark's words, their attention, and what training does."""

from __future__ import annotations

import torch

from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.generic_prior import apply_generic_prior
from defectsynth.diffusion.grounding import (
    GroundingTargets,
    grounded_denoising_loss,
    grounding_loss,
    mark_word_positions,
)
from defectsynth.diffusion.pretrain import denoising_loss
from defectsynth.diffusion.settings import TinyModelSettings
from defectsynth.jobs.pretrain import tiny_settings_spec

SMALL = TinyModelSettings(
    vae_channels=(16, 16), unet_channels=(16, 32), norm_groups=8, text_width=32, text_layers=1, attention_heads=2
)


def test_mark_words_are_the_caption_after_with_a() -> None:
    tokenizer = build_tiny(SMALL, resolution=16, words=["wood"]).tokenizer
    caption = "a photo of wood with a faint black line"
    positions = mark_word_positions(caption, tokenizer)
    words = tokenizer.convert_ids_to_tokens([tokenizer(caption).input_ids[i] for i in positions])
    assert "".join(words).replace("</w>", " ").split() == ["faint", "black", "line"]
    assert mark_word_positions("a photo of wood", tokenizer) == [] and mark_word_positions("", tokenizer) == []


def test_grounding_loss_is_zero_on_attention_that_names_the_mark_and_none_without_marks() -> None:
    marks = torch.zeros(2, 1, 8, 8)
    marks[0, 0, 2:4, 2:6] = 1
    attention = torch.full((2, 5, 4, 4), 0.2)
    attention[0] = 0.0
    attention[0, 0] = 1 - marks[0, 0, ::2, ::2]  # the start token takes the rest
    attention[0, 3] = marks[0, 0, ::2, ::2]
    assert float(grounding_loss({"layer": attention}, [[3], []], marks)) == 0.0
    assert grounding_loss({"layer": attention}, [[], []], marks) is None


def test_grounding_loss_weighs_the_mark_as_much_as_the_rest_of_the_image() -> None:
    """Two words of 0.2 everywhere: (0.4 - 1)² inside plus 0.4² outside, whatever the mark's size."""
    uniform = torch.full((1, 5, 4, 4), 0.2)
    for cells in (1, 8):
        marks = torch.zeros(1, 1, 4, 4)
        marks.view(-1)[:cells] = 1
        assert abs(float(grounding_loss({"layer": uniform}, [[3, 4]], marks)) - (0.36 + 0.16)) < 1e-6


def test_grounded_training_puts_the_mark_words_attention_on_the_mark() -> None:
    """Eighty steps of the U-Net on one batch of marked images put the words' attention on the marks."""
    torch.manual_seed(0)
    model = build_tiny(SMALL, resolution=16, words=["wood"], seed=0)
    images = torch.rand(16, 3, 16, 16) * 0.2 - 0.1
    prior = apply_generic_prior(images, ["wood"] * 16, torch.Generator().manual_seed(1), marks=1.0, shapes=0.0)
    with torch.no_grad():
        latents = model.encode_images(prior.images, torch.Generator().manual_seed(2))
        context = model.encode_prompt(prior.captions)
    targets = GroundingTargets(prior.captions, prior.marks, weight=1.0)

    def grounding_term() -> float:
        """The grounded loss less the plain one on the same noise and timesteps: the grounding loss alone."""
        with torch.no_grad():
            grounded = grounded_denoising_loss(model, latents, context, torch.Generator().manual_seed(0), targets)
            plain = denoising_loss(model, latents, context, torch.Generator().manual_seed(0))
        return float(grounded - plain) / targets.weight

    model.unet.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=3e-3)
    before = grounding_term()
    for step in range(80):
        loss = grounded_denoising_loss(model, latents, context, torch.Generator().manual_seed(step), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = grounding_term()
    # The same attention at every pixel scores at best 0.5 ((a - 1)² + a² at a = 1/2): below it the words follow the
    # marks. Measured: 0.88 before, 0.29 after.
    assert after < 0.45 < before


def test_the_grounding_weight_leaves_earlier_bases_digests_alone() -> None:
    assert "prior_grounding_weight" not in tiny_settings_spec(TinyModelSettings())
    assert tiny_settings_spec(TinyModelSettings(prior_grounding_weight=1.0))["prior_grounding_weight"] == 1.0
