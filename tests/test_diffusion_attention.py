"""The attention-control processors on a tiny U-Net: identities, hand computations, selection, gradients."""

import pytest
import torch

from defectsynth.diffusion import attention
from defectsynth.diffusion.attention import (
    AttentionControl,
    ControlledAttnProcessor,
    DelayedFocusGate,
    Select,
    install,
    installed,
)
from defectsynth.diffusion.attention_rules import LayerCall, LayerInfo, MaskedReweight
from helpers.tiny_diffusion import tiny_model

ATOL = 1e-5
TIMESTEPS = (900, 500, 100)
LAYER16 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"  # a 16×16 cross-attention layer
SIDES = {  # cross-attention layers of the tiny U-Net (latents 16×16) and their attention sides
    LAYER16: 16,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": 8,
    "mid_block.attentions.0.transformer_blocks.0.attn2.processor": 4,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": 8,
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor": 8,
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor": 16,
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor": 16,
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def inputs(model):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *model.latent_shape, generator=generator)
    with torch.no_grad():
        context = model.encode_prompt(["a wood", "wood"])
    return latents, context


@pytest.fixture(scope="module")
def reference(model, inputs):
    """U-Net outputs with diffusers' default processors, one per timestep."""
    latents, context = inputs
    with torch.no_grad():
        return [model.unet(latents, t, encoder_hidden_states=context).sample for t in TIMESTEPS]


def run_steps(model, inputs, control, timesteps=TIMESTEPS):
    """A sampler-like loop: mark each step, run the U-Net, return the outputs."""
    latents, context = inputs
    outputs = []
    with installed(model.unet, control), torch.no_grad():
        for index, t in enumerate(timesteps):
            control.begin_step(index, t)
            outputs.append(model.unet(latents, t, encoder_hidden_states=context).sample)
    return outputs


def layer_module(model, path=LAYER16):
    return model.unet.get_submodule(path.removesuffix(".processor"))


def layer_call(model, control, hidden, context, path=LAYER16):
    """One attention layer, called directly under ``control`` (or with the default processor when None)."""
    attn = layer_module(model, path)
    with torch.no_grad():
        if control is None:
            return attn(hidden, encoder_hidden_states=context)
        with installed(model.unet, control):
            control.begin_step(0, 500)
            return attn(hidden, encoder_hidden_states=context)


def hand_attention(attn, hidden, context, columns=None, multiplier=None):
    """softmax(QKᵀ/√d) V by hand: the softmax over ``columns`` (token indices) only, then ⊙ ``multiplier`` (N, L)."""
    batch, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

    query, key, value = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
    scores = query @ key.transpose(-1, -2) * attn.scale
    if columns is not None:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        keep[list(columns)] = True
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(-1) if multiplier is None else scores.softmax(-1) * multiplier
    out = (probs @ value).transpose(1, 2).reshape(batch, hidden.shape[1], -1)
    return attn.to_out[0](out)


@pytest.fixture(scope="module")
def hidden(model):
    width = layer_module(model).to_q.in_features
    return torch.randn(2, 256, width, generator=torch.Generator().manual_seed(1))


def test_recording_keeps_outputs_and_maps_are_distributions(model, inputs, reference):
    control = AttentionControl()
    recorder = control.record()  # all cross-attention layers, all tokens, every step

    outputs = run_steps(model, inputs, control)

    for out, ref in zip(outputs, reference, strict=True):
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert recorder.steps == [0, 1, 2]
    maps = recorder.maps(1)
    assert {path: m.shape[-1] for path, m in maps.items()} == SIDES
    for path, m in maps.items():
        assert m.shape == (2, 16, SIDES[path], SIDES[path])
        torch.testing.assert_close(m.sum(dim=1), torch.ones(2, SIDES[path], SIDES[path]), atol=ATOL, rtol=0)
    assert recorder.mean(side=16).shape == (2, 16, 16, 16)
    assert not recorder.mean(side=16).requires_grad
    recorder.reset()
    assert recorder.steps == []


def test_fast_path_when_nothing_applies(model, inputs, reference, monkeypatch):
    explicit_calls = []
    original = attention.explicit_attention

    def counting(*args):
        explicit_calls.append(args[0])
        return original(*args)

    monkeypatch.setattr(attention, "explicit_attention", counting)
    outputs = run_steps(model, inputs, AttentionControl())  # nothing configured
    control = AttentionControl()
    control.record(Select(steps={7}))  # configured, but never at the steps run
    outputs += run_steps(model, inputs, control)

    assert explicit_calls == []
    for out, ref in zip(outputs, reference * 2, strict=True):
        assert torch.equal(out, ref)  # bit-identical: diffusers' AttnProcessor2_0 ran

    run_steps(model, inputs, control, timesteps=[500] * 8)  # step 7 is covered: the 7 cross layers go explicit
    assert len(explicit_calls) == len(SIDES)


def test_selection_by_resolution_step_place_path_and_rows(model, inputs):
    control = AttentionControl()
    at_8 = control.record(Select(resolutions={8}, steps={1}), tokens=[1, 2])
    mid = control.record(Select(places={"mid"}, steps=lambda index, t: t < 600))
    by_path = control.record(Select(paths=["up_blocks.2.*"], batch="cond"), tokens=[0])
    self_attn = control.record(Select(cross=False, resolutions={4}), tokens=[0, 1])

    run_steps(model, inputs, control)

    assert at_8.steps == [1]
    assert {path: m.shape for path, m in at_8.maps(1).items()} == {
        path: (2, 2, 8, 8) for path, side in SIDES.items() if side == 8
    }
    assert mid.steps == [1, 2]
    assert list(mid.maps(2)) == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert sorted(by_path.maps(0)) == sorted(p for p in SIDES if p.startswith("up_blocks.2"))
    assert all(m.shape == (1, 1, 16, 16) for m in by_path.maps(0).values())  # conditional half only
    assert list(self_attn.maps(0)) == ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]


def test_a_layer_called_twice_in_a_step_concatenates(model, inputs):
    latents, context = inputs
    control = AttentionControl()
    recorder = control.record(Select(paths=[LAYER16]), tokens=[1])
    with installed(model.unet, control), torch.no_grad():
        control.begin_step(0, 500)
        model.unet(latents, 500, encoder_hidden_states=context)
        model.unet(latents[:1], 500, encoder_hidden_states=context[:1])
    assert recorder.maps(0)[LAYER16].shape == (3, 1, 16, 16)


def test_operations_need_a_step(model, inputs):
    latents, context = inputs
    control = AttentionControl()
    control.record()
    with installed(model.unet, control), torch.no_grad(), pytest.raises(RuntimeError, match="begin_step"):
        model.unet(latents, 500, encoder_hidden_states=context)


def test_spatial_reweight_by_ones_is_identity_and_updates_between_steps(model, inputs, reference):
    control = AttentionControl()
    control.reweight(torch.ones(1, 1, 32, 32))  # any resolution: resized to each layer's side
    after = control.record(Select(steps={1}), after_reweight=True)
    latents, context = inputs
    outputs = []
    with installed(model.unet, control), torch.no_grad():
        for index, t in enumerate(TIMESTEPS[:2]):
            control.begin_step(index, t)
            outputs.append(model.unet(latents, t, encoder_hidden_states=context).sample)
            control.set_weight_map(torch.full((2, 1, 16, 16), 2.0))  # per sample; tiled over the batch

    torch.testing.assert_close(outputs[0], reference[0], atol=ATOL, rtol=0)
    assert not torch.allclose(outputs[1], reference[1], atol=1e-3)
    for m in after.maps(1).values():  # recorded after re-weighting: not renormalised (Eq. 8)
        torch.testing.assert_close(m.sum(dim=1), torch.full_like(m[:, 0], 2.0), atol=ATOL, rtol=0)


def test_spatial_reweight_of_chosen_tokens_matches_hand_computation(model, hidden, inputs):
    context = inputs[1]
    weight = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    control = AttentionControl()
    control.reweight(weight, tokens=[1, 2], where=Select(paths=[LAYER16]))
    out = layer_call(model, control, hidden, context)

    columns = torch.tensor([0, 1, 1, 0] + [0] * 12, dtype=torch.bool)
    multiplier = torch.where(columns, weight.flatten()[:, None], torch.tensor(1.0))  # (N, L): w on tokens 1, 2
    with torch.no_grad():
        expected = hand_attention(layer_module(model), hidden, context, multiplier=multiplier)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def square_mask(side=16, rows=slice(2, 6), cols=slice(3, 8)):
    mask = torch.zeros(1, 1, side, side)
    mask[..., rows, cols] = 1.0
    return mask


def test_focus_factor_one_is_identity_and_other_factors_change_only_the_mask(model, hidden, inputs):
    context = inputs[1]
    mask = square_mask()  # 4×5 = 20 pixels at 16×16: ||M||₁ = 20
    inside = mask.flatten().bool()
    default = layer_call(model, None, hidden, context)

    control = AttentionControl()
    focus = control.focus(mask, tokens=[1], weight=1 / 20, gate=None, where=Select(resolutions={16}))
    torch.testing.assert_close(layer_call(model, control, hidden, context), default, atol=ATOL, rtol=0)

    focus.weight = 3 / 20  # w·||M||₁ = 3
    out = layer_call(model, control, hidden, context)
    torch.testing.assert_close(out[:, ~inside], default[:, ~inside], atol=ATOL, rtol=0)
    assert (out[:, inside] - default[:, inside]).abs().amax(dim=-1).min() > 1e-4

    focus.gate = DelayedFocusGate(threshold=1.0)  # α_t ≤ 1 never exceeds 1: the gate never fires
    torch.testing.assert_close(layer_call(model, control, hidden, context), default, atol=ATOL, rtol=0)


def test_focus_without_masked_focus_scales_every_pixel_by_the_mask_factor(model, hidden, inputs):
    context = inputs[1]
    mask = square_mask()  # ||M||₁ = 20
    default = layer_call(model, None, hidden, context)
    control = AttentionControl()
    control.focus(mask, tokens=[1], weight=3 / 20, gate=None, where=Select(resolutions={16}), inside_only=False)
    out = layer_call(model, control, hidden, context)

    multiplier = torch.ones(256, 16)
    multiplier[:, 1] = 3.0  # w·||M||₁ = 3 at every pixel, inside the mask or not
    with torch.no_grad():
        expected = hand_attention(layer_module(model), hidden, context, multiplier=multiplier)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (out[:, ~mask.flatten().bool()] - default[:, ~mask.flatten().bool()]).abs().max() > 1e-4


def test_restrict_with_full_mask_is_inside_attention_and_outside_pixels_see_outside_tokens(model, hidden, inputs):
    context = inputs[1]
    attn = layer_module(model)
    inside_tokens, outside_tokens = [1], [2, 3]
    with torch.no_grad():
        inside_only = hand_attention(attn, hidden, context, columns=[0, *inside_tokens])  # BOS joins both groups
        outside_only = hand_attention(attn, hidden, context, columns=[0, *outside_tokens])

    control = AttentionControl()
    restriction = control.restrict(torch.ones(1, 1, 64, 64), inside=inside_tokens, outside=outside_tokens)
    torch.testing.assert_close(layer_call(model, control, hidden, context), inside_only, atol=ATOL, rtol=0)

    restriction.mask = square_mask()
    recorder = control.record(Select(paths=[LAYER16]))
    out = layer_call(model, control, hidden, context)
    inside = square_mask().flatten().bool()
    torch.testing.assert_close(out[:, inside], inside_only[:, inside], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, ~inside], outside_only[:, ~inside], atol=ATOL, rtol=0)
    maps = recorder.maps(0)[LAYER16].flatten(2)  # the restricted attention, Eq. 13's m'⊙softmax(QK_inᵀ)
    assert maps[:, 1, ~inside].abs().max() == 0 and maps[:, 2:4, inside].abs().max() == 0
    assert maps[:, 4:].abs().max() == 0  # tokens in no group (EOS, padding) get no attention


def test_restrict_needs_cross_attention():
    with pytest.raises(ValueError, match="cross-attention"):
        AttentionControl().restrict(torch.ones(1, 1, 8, 8), inside=[1], outside=[2], where=Select(cross=None))


def test_keep_grad_lets_a_map_loss_reach_the_text_embedding_and_to_k(model, inputs):
    latents, context = inputs
    context = context.clone().requires_grad_(True)
    to_k = layer_module(model).to_k.weight
    control = AttentionControl()
    recorder = control.record(Select(resolutions={16}), tokens=[1, 2], keep_grad=True)
    target = square_mask()[:, 0]
    to_k.requires_grad_(True)
    try:
        with installed(model.unet, control):
            control.begin_step(0, 500)
            model.unet(latents, 500, encoder_hidden_states=context)
        loss = (recorder.mean(side=16).mean(dim=1) - target).pow(2).mean()  # SeaS's DA-loss shape
        loss.backward()
        assert context.grad is not None and context.grad.abs().sum() > 0
        assert to_k.grad is not None and to_k.grad.abs().sum() > 0
    finally:
        to_k.requires_grad_(False)
        to_k.grad = None


def test_delayed_focus_gate_alpha_on_hand_built_maps():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :] = 1.0  # 8 mask pixels
    token_map = torch.zeros(3, 4, 4)
    token_map[0].view(-1)[:6] = 1.0  # 6 of the 8 mask pixels above the mean
    token_map[1].view(-1)[:7] = 1.0  # 7 of 8
    token_map[2, 3, :] = 1.0  # only outside pixels above the mean
    gate = DelayedFocusGate(threshold=0.75)
    masks = mask.expand(3, 4, 4)

    torch.testing.assert_close(gate.alpha(token_map, masks), torch.tensor([0.75, 0.875, 0.0]))
    assert gate(token_map, masks, call=None).tolist() == [False, True, False]  # strictly above α_thr
    assert gate.alpha(token_map[:1], torch.zeros(1, 4, 4)).item() == 0.0  # an empty mask never fires


def test_masked_focus_stays_on_from_the_first_call_where_the_gate_fires():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0  # 8 cells: w·||M||₁ = 0.25 · 8 = 2
    focused = torch.zeros(4, 4)
    focused[:2, :] = 1.0  # every mask cell above the map's mean: α = 1
    spread = torch.full((4, 4), 0.1)
    spread[3, :] = 1.0  # no mask cell above the mean (0.325): α = 0
    reweight = MaskedReweight(mask, tokens=[1], weight=0.25, gate=DelayedFocusGate(threshold=0.75))
    inside = mask.flatten().bool()

    def edited(step: int, *maps: torch.Tensor) -> torch.Tensor:  # token 1's probabilities after the edit, (B, 16)
        probs = torch.zeros(len(maps), 1, 16, 2)
        probs[:, 0, :, 1] = torch.stack([m.flatten() for m in maps])
        call = LayerCall(LayerInfo("attn2", "down", True), side=4, step=step, timestep=None)
        return reweight.edit(torch.zeros_like(probs), probs, call)[:, 0, :, 1]

    first = edited(0, focused, spread)  # sample 0 fires, sample 1 does not
    torch.testing.assert_close(first[0, inside], torch.full((8,), 2.0))
    torch.testing.assert_close(first[1], spread.flatten())
    later = edited(1, spread, spread)  # neither fires now: sample 0's re-weighting has started, 1's has not
    torch.testing.assert_close(later[0, inside], torch.full((8,), 0.2))
    torch.testing.assert_close(later[0, ~inside], spread.flatten()[~inside])
    torch.testing.assert_close(later[1], spread.flatten())


def test_restore_and_context_manager_put_back_the_original_processors(model):
    before = model.unet.attn_processors
    restore = install(model.unet, AttentionControl())
    assert all(isinstance(p, ControlledAttnProcessor) for p in model.unet.attn_processors.values())
    restore()
    assert all(model.unet.attn_processors[path] is p for path, p in before.items())

    with pytest.raises(KeyError), installed(model.unet, AttentionControl()):
        msg = "boom"
        raise KeyError(msg)
    assert all(model.unet.attn_processors[path] is p for path, p in before.items())
