"""BADG's two prompts, C1 = [C_def, C_bg] and C2 = [C_m, C_bg], and where their token groups sit.

The paper leaves the tokens unstated. Ours: C_bg is ``a photo of <product>``; C_def is one placeholder token for the
defect type (initialised from the type's words) and C_m one for the masked-out region (from "mask"). Neither is
trained (the U-Net alone is fine-tuned, DreamBooth-style); they sit at the same position in both prompts, so one
inside/outside restriction (Eqs. 10-11) serves both branches of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import generic_prompt
from defectsynth.diffusion.tokens import PlaceholderTokens

DEFECT_GROUP, MASK_GROUP = "badg_def", "badg_m"


@dataclass(frozen=True)
class BADGPrompts:
    """C1's and C2's text and token positions: ``inside`` (C_def in C1, C_m in C2) and ``outside`` (C_bg)."""

    defect: str
    masked: str
    inside: tuple[int, ...]
    outside: tuple[int, ...]

    @classmethod
    def for_type(cls, model: DiffusionModel, tokens: PlaceholderTokens, product: str) -> BADGPrompts:
        """The prompts of ``product`` with ``tokens``' two groups, checked to fit the text encoder."""
        background = generic_prompt(product)
        defect = f"{background} {tokens.prompt(DEFECT_GROUP)}"
        masked = f"{background} {tokens.prompt(MASK_GROUP)}"
        ids = model.tokenizer(defect).input_ids
        limit = model.tokenizer.model_max_length
        if len(ids) > limit:
            msg = f"badg: the prompt of {product} takes {len(ids)} tokens, the text encoder holds {limit}"
            raise ValueError(msg)
        inside = ids.index(tokens.ids(DEFECT_GROUP)[0])
        return cls(defect, masked, (inside,), tuple(range(1, inside)))


def add_prompt_tokens(model: DiffusionModel, defect_type: str) -> PlaceholderTokens:
    """C_def (from the type's words) and C_m (from "mask"), one token each, on ``model``'s tokenizer."""
    tokens = PlaceholderTokens(model)
    tokens.add(DEFECT_GROUP, count=1, initializer=defect_type.replace("_", " "))
    tokens.add(MASK_GROUP, count=1, initializer="mask")
    return tokens
