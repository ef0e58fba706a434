"""Placeholder tokens: names, initialisation, only their rows train, save and load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defectsynth.diffusion.tokens import PlaceholderTokens, encode_prompt_with_embeddings, token_names
from helpers.tiny_diffusion import tiny_model


def test_token_names_have_deterministic_suffixes() -> None:
    assert token_names("crack", 3) == ["<crack>", "<crack>_1", "<crack>_2"]
    with pytest.raises(ValueError, match="at least 1"):
        token_names("crack", 0)


def test_added_tokens_tokenize_whole_and_start_from_the_initializer() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("crack", count=2, initializer="crack")
    ids = model.tokenizer("a <crack> <crack>_1", add_special_tokens=False).input_ids
    assert ids[-2:] == tokens.ids("crack")
    weight = model.text_encoder.get_input_embeddings().weight
    (init_id,) = model.tokenizer.encode("crack", add_special_tokens=False)
    for token_id in tokens.ids("crack"):
        assert torch.equal(weight[token_id], weight[init_id])


def test_adding_an_existing_token_fails() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("crack", count=1, initializer="crack")
    with pytest.raises(ValueError, match="already added"):
        tokens.add("crack", count=1, initializer="crack")
    with pytest.raises(ValueError, match="already exist"):
        PlaceholderTokens(model).add("crack", count=1, initializer="crack")


def test_only_placeholder_rows_change_in_training() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("crack", count=3, initializer="crack")
    tokens.add("hole", count=2, initializer="hole")
    before = model.text_encoder.get_input_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW([tokens.trainable_rows()], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        context = model.encode_prompt([f"a photo of wood with {tokens.prompt('crack')} {tokens.prompt('hole')}"])
        loss = (context - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens.restore_frozen_rows()
    after = model.text_encoder.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(tokens.ids())
    frozen = [p for name, p in model.text_encoder.named_parameters() if "token_embedding" not in name]
    assert not any(p.requires_grad for p in frozen)


def test_save_and_load_restore_the_learned_rows(tmp_path: Path) -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("crack", count=2, initializer="crack")
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[tokens.ids()] += 0.5
    path = tokens.save(tmp_path / "tokens.safetensors")
    fresh = tiny_model()
    loaded = PlaceholderTokens.load(fresh, path)
    assert loaded.groups == {"crack": ["<crack>", "<crack>_1"]}
    prompt = ["a photo of wood with <crack> <crack>_1"]
    torch.testing.assert_close(fresh.encode_prompt(prompt), model.encode_prompt(prompt), rtol=0, atol=0)


def test_loading_a_foreign_file_fails(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors"):
        PlaceholderTokens.load(tiny_model(), tmp_path / "other.safetensors")


def test_encoding_with_the_tables_own_rows_equals_encode_prompt() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("spot", count=2, initializer="spot")
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[tokens.ids()] += torch.randn(2, 32)
    prompts = [f"a photo of wood with {tokens.prompt('spot')}", f"{tokens.prompt('spot')} on wood"]
    weight = model.text_encoder.get_input_embeddings().weight.detach()
    replacements = {i: weight[i].expand(2, -1) for i in tokens.ids("spot")}
    expected = model.encode_prompt(prompts)
    torch.testing.assert_close(encode_prompt_with_embeddings(model, prompts, replacements), expected, rtol=0, atol=0)


def test_replacement_vectors_are_per_prompt_and_receive_gradients() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("spot", count=2, initializer="spot")
    first, second = tokens.ids("spot")
    prompts = [f"wood {tokens.prompt('spot')}"] * 3
    vectors = torch.randn(3, 32, requires_grad=True)
    other = torch.randn(3, 32, requires_grad=True)
    context = encode_prompt_with_embeddings(model, prompts, {first: vectors, second: other})
    plain = model.encode_prompt(prompts)
    # same prompt, different vectors: rows differ, and differ from the table's rows
    assert not torch.allclose(context[0], context[1])
    assert not torch.allclose(context[0], plain[0])
    # the prefix before the first replaced token is unchanged (causal attention)
    torch.testing.assert_close(context[:, :2], plain[:, :2], rtol=0, atol=0)
    context.pow(2).sum().backward()
    assert vectors.grad is not None and other.grad is not None
    assert bool((vectors.grad.abs().sum(dim=1) > 0).all())
    assert model.text_encoder.get_input_embeddings().weight.grad is None
    # the hook is gone: plain encoding is unaffected afterwards
    torch.testing.assert_close(model.encode_prompt(prompts), plain, rtol=0, atol=0)


def test_encoding_with_embeddings_rejects_bad_replacements() -> None:
    model = tiny_model()
    tokens = PlaceholderTokens(model)
    tokens.add("spot", count=1, initializer="spot")
    (token_id,) = tokens.ids("spot")
    with pytest.raises(ValueError, match=r"occur in none of the prompts"):
        encode_prompt_with_embeddings(model, ["a photo of wood"], {token_id: torch.zeros(1, 32)})
    with pytest.raises(ValueError, match=rf"token id {token_id} has shape \(2, 32\), expected \(1, 32\)"):
        encode_prompt_with_embeddings(model, ["wood <spot>"], {token_id: torch.zeros(2, 32)})
    with pytest.raises(ValueError, match=r"expected \(1, 32\)"):
        encode_prompt_with_embeddings(model, ["wood <spot>"], {token_id: torch.zeros(1, 16)})


def test_the_offline_tokenizer_is_the_same_every_time() -> None:
    from defectsynth.diffusion.tokenizer import build_offline_tokenizer

    vocabularies = {tuple(sorted(build_offline_tokenizer(["wood", "pill"]).get_vocab().items())) for _ in range(8)}
    assert len(vocabularies) == 1, "a trained BPE broke ties in hash order: the vocabulary changed between builds"
