"""SeaS's prompts: the Unbalanced Abnormal prompt, the normal prompt, and where their tokens sit.

One normal token <ob> per product and N anomaly tokens per defect type (paper: N' = 1, N = 4):
``a <ob> with <df1>, <df2>, <df3>, <df4>`` for an anomaly of the type, ``a <ob>`` for a normal image.
The ablation ``generic`` (paper Table 5, row a) writes plain words instead: ``a photo of <product> with
<defect type>``, the product's words standing for <ob> and the type's for the <df>s. Prompts are built
from segments, so the positions of <ob> and <df> in the tokenized prompt (what the DA loss reads in the
cross-attention maps) are known by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.tokens import PlaceholderTokens

PromptStyle = Literal["unbalanced", "generic"]
AnomalyInitializer = Literal["defect", "type_name"]
ANOMALY_INITIALIZER = "defect"  # the authors' initializer token for the new rows


@dataclass(frozen=True)
class PromptLayout:
    """A prompt and the token positions (after the start token) of its normal and anomaly words."""

    text: str
    normal: tuple[int, ...]
    anomaly: tuple[int, ...]


def normal_group(product: str) -> str:
    """The placeholder group of a product's <ob>."""
    return f"ob_{product}"


def anomaly_group(product: str, defect_type: str) -> str:
    """The placeholder group of a (product, defect type)'s <df> tokens."""
    return f"df_{product}_{defect_type}"


def add_prompt_tokens(
    tokens: PlaceholderTokens,
    product: str,
    defect_types: Sequence[str],
    *,
    normal: int,
    anomaly: int,
    initializer: AnomalyInitializer = "defect",
) -> None:
    """Add <ob> (from the product's name) and each type's <df> tokens to the model's tokenizer.

    The <df> rows start at "defect" for every type (the authors'), or at the type's own words (``type_name``,
    ours): a base whose text encoder barely separates words keeps types that start alike alike.
    """
    tokens.add(normal_group(product), count=normal, initializer=product.replace("_", " "))
    for defect_type in defect_types:
        start = ANOMALY_INITIALIZER if initializer == "defect" else defect_type.replace("_", " ")
        tokens.add(anomaly_group(product, defect_type), count=anomaly, initializer=start)


class SeaSPrompts:
    """The prompts of one product for one prompt style, with their token positions."""

    def __init__(
        self, model: DiffusionModel, tokens: PlaceholderTokens | None, product: str, style: PromptStyle
    ) -> None:
        if style == "unbalanced" and tokens is None:
            msg = "seas: the unbalanced abnormal prompt needs the learned placeholder tokens"
            raise ValueError(msg)
        self.model, self.tokens, self.product, self.style = model, tokens, product, style

    def normal(self) -> PromptLayout:
        """``a <ob>`` (generic: ``a photo of <product>``)."""
        return self._layout(self._object_segments())

    def abnormal(self, defect_type: str) -> PromptLayout:
        """``a <ob> with <df1>, ..., <dfN>`` (generic: ``a photo of <product> with <defect type>``)."""
        if self.style == "generic":
            defect = [(defect_type.replace("_", " "), "anomaly")]
        else:
            assert self.tokens is not None
            names = self.tokens.groups[anomaly_group(self.product, defect_type)]
            defect = [segment for name in names for segment in ((name, "anomaly"), (",", "text"))][:-1]
        return self._layout([*self._object_segments(), ("with", "text"), *defect])

    def _object_segments(self) -> list[tuple[str, str]]:
        if self.style == "generic":
            return [("a photo of", "text"), (self.product.replace("_", " "), "normal")]
        assert self.tokens is not None
        return [("a", "text"), *((name, "normal") for name in self.tokens.groups[normal_group(self.product)])]

    def _layout(self, segments: Sequence[tuple[str, str]]) -> PromptLayout:
        """Join segments into a prompt; positions count tokens, 1 being the first after the start token."""
        tokenizer = self.model.tokenizer
        positions: dict[str, list[int]] = {"normal": [], "anomaly": [], "text": []}
        cursor = 1
        for text, role in segments:
            count = len(tokenizer.encode(text, add_special_tokens=False))
            positions[role] += range(cursor, cursor + count)
            cursor += count
        if cursor + 1 > tokenizer.model_max_length:
            msg = (
                f"seas: the prompt of {self.product} takes {cursor + 1} tokens, the text encoder holds "
                f"{tokenizer.model_max_length}; use fewer anomaly tokens or a base with more positions"
            )
            raise ValueError(msg)
        text = " ".join(text for text, _ in segments).replace(" ,", ",")
        if len(tokenizer(text).input_ids) != cursor + 1:  # the segments must tokenize as the whole prompt does
            msg = f"seas: {text!r} does not tokenize as its segments; token positions would be wrong"
            raise RuntimeError(msg)
        return PromptLayout(text, tuple(positions["normal"]), tuple(positions["anomaly"]))
