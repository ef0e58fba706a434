"""CADiff's Context-aware Text Prompt: one contextual token for the product, anomaly tokens per defect type.

``a photo of <ctx> with <an_type>`` (paper 004, Sec. 3.2): v* stands for the product surface, the anomaly
tokens (mapped to the types through the index list I, here one group per type) for its defects. The paper
initialises the tokens "as 'anomaly'"; ours: the anomaly tokens from "anomaly", the contextual token from the
product's name, which it stands for. The number of anomaly tokens per type is unstated (default 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.tokens import PlaceholderTokens

ANOMALY_INITIALIZER = "anomaly"


@dataclass(frozen=True)
class PromptLayout:
    """A prompt and the token positions of its learnable words (0 is the start token)."""

    text: str
    context: tuple[int, ...]
    anomaly: tuple[int, ...]

    @property
    def learnable(self) -> tuple[int, ...]:
        """Every learnable token's position: the contextual ones, then the anomaly ones."""
        return (*self.context, *self.anomaly)

    @property
    def is_context(self) -> tuple[bool, ...]:
        """Per learnable token, whether it is a contextual one (L_loc's target is then M*)."""
        return (True,) * len(self.context) + (False,) * len(self.anomaly)


def context_group(product: str) -> str:
    """The placeholder group of a product's contextual token v*."""
    return f"ctx_{product}"


def anomaly_group(product: str, defect_type: str) -> str:
    """The placeholder group of a (product, defect type)'s anomaly tokens."""
    return f"an_{product}_{defect_type}"


class ContextPrompts:
    """The prompts of one product's defect types, with the positions of their learnable tokens."""

    def __init__(self, model: DiffusionModel, tokens: PlaceholderTokens, product: str) -> None:
        self.model, self.tokens, self.product = model, tokens, product

    @classmethod
    def add_tokens(
        cls, model: DiffusionModel, product: str, defect_types: list[str], *, anomaly_tokens: int
    ) -> ContextPrompts:
        """New tokens on ``model``: v* from the product's name, each type's from "anomaly"; every prompt checked."""
        tokens = PlaceholderTokens(model)
        tokens.add(context_group(product), count=1, initializer=product.replace("_", " "))
        for defect_type in defect_types:
            tokens.add(anomaly_group(product, defect_type), count=anomaly_tokens, initializer=ANOMALY_INITIALIZER)
        prompts = cls(model, tokens, product)
        for defect_type in defect_types:  # refuse a prompt the text encoder would truncate, before any training
            prompts.abnormal(defect_type)
        return prompts

    def abnormal(self, defect_type: str) -> PromptLayout:
        """``a photo of <ctx> with <an_type...>`` and where its tokens sit."""
        context_name, anomaly_name = context_group(self.product), anomaly_group(self.product, defect_type)
        if anomaly_name not in self.tokens.groups:
            msg = f"cadiff: no tokens for {self.product}/{defect_type}"
            raise ValueError(msg)
        words = [" ".join(self.tokens.groups[name]) for name in (context_name, anomaly_name)]
        text = f"a photo of {words[0]} with {words[1]}"  # not generic_prompt: it splits names at "_"
        ids = self.model.tokenizer(text).input_ids
        limit = self.model.tokenizer.model_max_length
        if len(ids) > limit:
            msg = (
                f"cadiff: the prompt of {self.product}/{defect_type} takes {len(ids)} tokens, the text encoder holds"
                f" {limit}; use fewer anomaly_tokens or a base with more positions"
            )
            raise ValueError(msg)
        context, anomaly = (positions(ids, self.tokens.ids(name)) for name in (context_name, anomaly_name))
        return PromptLayout(text, context, anomaly)


def positions(ids: list[int], wanted: list[int]) -> tuple[int, ...]:
    """Where each of ``wanted`` sits in the tokenized prompt ``ids``, in the order of ``wanted``."""
    return tuple(ids.index(token) for token in wanted)
