import numpy as np
import torch

from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.generic_prior import (
    COLOUR_RANGES,
    MARK_KINDS,
    SHAPE_PROMPT,
    STAIN_RIM,
    apply_generic_prior,
    draw_colour,
    draw_mark,
    draw_region,
    draw_shape,
    stain_strength,
)
from defectsynth.diffusion.settings import TinyModelSettings


def test_lines_are_thin_and_spots_are_areas() -> None:
    rng = np.random.default_rng(0)
    lines = [draw_region(rng, 128, "line") for _ in range(20)]
    spots = [draw_region(rng, 128, "spot") for _ in range(20)]
    assert np.median([m.mean() for m in lines]) < np.median([m.mean() for m in spots])
    assert all(m.any() for m in spots)


def test_a_mark_changes_only_its_region() -> None:
    rng = np.random.default_rng(1)
    image = np.full((64, 64, 3), 0.2, dtype=np.float32)
    for kind in ("line", "spot"):
        marked, words, region = draw_mark(rng, image, kind)
        assert words == kind
        changed = np.abs(marked - image).max(-1) > 1e-6
        assert changed.any() and changed.mean() < 0.5
        assert np.array_equal(changed, region)


def test_shapes_are_binary_and_not_empty() -> None:
    rng = np.random.default_rng(2)
    shapes = [draw_shape(rng, 64) for _ in range(10)]
    assert all(s.dtype == bool and s.any() and not s.all() for s in shapes)


def test_prior_shares_and_captions_follow_the_settings() -> None:
    images = torch.zeros(400, 3, 32, 32)
    out, captions, marks = apply_generic_prior(
        images, ["wood"] * 400, torch.Generator().manual_seed(0), marks=0.5, shapes=0.25
    )
    shares = {kind: sum(c.endswith(f"with a {kind}") for c in captions) / 400 for kind in MARK_KINDS}
    assert 0.18 < captions.count(SHAPE_PROMPT) / 400 < 0.32
    assert 0.4 < sum(shares.values()) < 0.6 and all(s > 0.08 for s in shares.values())
    plain = [i for i, c in enumerate(captions) if c == "a photo of wood"]
    assert plain and torch.equal(out[plain], images[plain])
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    marked = [i for i, c in enumerate(captions) if " with a " in c]
    assert marks.shape == (400, 1, 32, 32) and set(marks.unique().tolist()) == {0.0, 1.0}
    assert all(marks[i].any() for i in marked) and not marks[[i for i in range(400) if i not in marked]].any()


def test_prior_off_leaves_the_batch_alone() -> None:
    images = torch.rand(4, 3, 16, 16)
    out, captions, marks = apply_generic_prior(images, ["pill"] * 4, torch.Generator(), marks=0.0, shapes=0.0)
    assert out is images and captions == ["a photo of pill"] * 4 and not marks.any()


def test_each_colour_is_drawn_by_name_and_looks_like_it() -> None:
    rng = np.random.default_rng(4)
    drawn = [draw_colour(rng) for _ in range(600)]
    names = [name for _, name in drawn]
    assert {names.count(n) for n in COLOUR_RANGES} and min(names.count(n) for n in COLOUR_RANGES) > 25
    brightness = {n: np.mean([(c.mean() + 1) / 2 for c, m in drawn if m == n]) for n in COLOUR_RANGES}
    assert brightness["black"] < 0.15 < brightness["grey"] < brightness["white"]
    greens = np.stack([c for c, m in drawn if m == "green"])
    assert (greens[:, 1] > greens[:, [0, 2]].max(1)).all()


def test_a_described_mark_says_how_it_looks() -> None:
    rng = np.random.default_rng(5)
    image = np.zeros((64, 64, 3), dtype=np.float32)
    thickness: dict[str, list[float]] = {"thin": [], "thick": []}
    for _ in range(60):
        marked, words, _ = draw_mark(rng, image, "line", described=True)
        *look, colour, kind = words.split()
        assert kind == "line" and colour in COLOUR_RANGES
        assert look[-1] in ("thin", "thick") and look[:-1] in ([], ["faint"])
        changed = np.abs(marked - image).max(-1) > 1e-6
        thickness[look[-1]].append(changed.sum() / max(changed.any(0).sum(), changed.any(1).sum()))
    assert np.median(thickness["thin"]) * 1.5 < np.median(thickness["thick"])
    _, words, _ = draw_mark(rng, image, "patch", described=True)
    assert words == "patch"


def test_described_captions_name_the_mark() -> None:
    captions = apply_generic_prior(
        torch.zeros(64, 3, 32, 32), ["wood"] * 64, torch.Generator().manual_seed(0), marks=1.0, shapes=0.0,
        described=True,
    )[1]  # fmt: skip
    spots = [c for c in captions if c.endswith(" spot")]
    assert spots and all(c.split()[-2] in COLOUR_RANGES for c in spots)


def test_caption_words_tokenize_apart_without_unknowns() -> None:
    tokenizer = build_tiny(TinyModelSettings(), resolution=32, words=["wood"]).tokenizer
    look = ("faint", "thin", "thick", *COLOUR_RANGES)
    ids = [tuple(tokenizer(word, add_special_tokens=False).input_ids) for word in (*MARK_KINDS, "mask", *look)]
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in {i for seq in ids for i in seq}
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in {i for seq in ids for i in seq}


def test_larger_token_embeddings_keep_a_captions_words_apart() -> None:
    """At CLIP's 0.02 a random encoder makes 'black' and 'white' nearly one context; at 1 they stay apart."""
    alike = {}
    for std in (0.02, 1.0):
        model = build_tiny(TinyModelSettings(text_embedding_std=std), resolution=32, words=["wood"])
        with torch.no_grad():
            black, white = model.encode_prompt([f"a photo of wood with a {c} spot" for c in ("black", "white")])
        position = len(model.tokenizer("a photo of wood with a").input_ids) - 1  # the colour word's (no end token)
        alike[std] = float(torch.nn.functional.cosine_similarity(black[position], white[position], dim=0))
    assert alike[0.02] > 0.9 and alike[1.0] < 0.6


def test_a_stain_tints_its_region_and_keeps_the_texture() -> None:
    rng = np.random.default_rng(6)
    texture = np.repeat(rng.uniform(-0.2, 0.2, (64, 64, 1)), 3, axis=-1).astype(np.float32)

    def texture_kept(kind: str) -> float:
        """Median over marks of the in-region horizontal detail after the mark, as a share of before."""
        kept = []
        for _ in range(10):
            marked, words, region = draw_mark(rng, texture, kind)
            assert words == kind and not (marked - texture)[~region].any() and (marked != texture)[region].any()
            inner = region[:, 1:] & region[:, :-1]
            kept.append(np.abs(np.diff(marked, axis=1))[inner].mean() / np.abs(np.diff(texture, axis=1))[inner].mean())
        return float(np.median(kept))

    assert texture_kept("stain") > 0.7 and texture_kept("spot") < 0.5


def test_a_stain_is_strongest_at_its_centre() -> None:
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    strength = stain_strength(disc)
    assert strength[32, 32] == 1.0 and not strength[~disc].any()
    assert np.isclose(strength[32, 13], STAIN_RIM, atol=0.1)  # the disc's leftmost pixel


def test_the_marks_drawn_follow_the_kinds_asked() -> None:
    captions = apply_generic_prior(
        torch.zeros(64, 3, 32, 32), ["wood"] * 64, torch.Generator().manual_seed(0), marks=1.0, shapes=0.0,
        kinds=("stain",),
    )[1]  # fmt: skip
    assert set(captions) == {"a photo of wood with a stain"}
