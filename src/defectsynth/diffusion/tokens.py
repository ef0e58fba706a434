"""Placeholder tokens: new words in the tokenizer whose embedding rows are the only ones that train.

Textual inversion (papers 000 and 004) and SeaS's prompt tokens (paper 002) learn new rows of the
text encoder's token-embedding table. Tokens come in named groups (``<crack>``, ``<crack>_1`` ...,
deterministic suffixes as in diffusers' textual-inversion example); adding one that already exists
is an error. Training enables gradients on the whole table (the only way to train rows of one
``nn.Embedding``) and ``restore_frozen_rows`` puts every other row back bit for bit after each
optimizer step. Only the learned rows are saved, keyed by token, as safetensors.

``encode_prompt_with_embeddings`` feeds computed vectors in as token embeddings instead: AnomalyDiffusion
(paper 000) writes its spatial encoder's per-image outputs e_s into the mask-token positions of its
prompt, as the released code's EmbeddingManager does, and trains the encoder through the frozen text
encoder.

Example:
    >>> from helpers.tiny_diffusion import tiny_model  # doctest: +SKIP
    >>> tokens = PlaceholderTokens(tiny_model())  # doctest: +SKIP
    >>> tokens.add("crack", count=3, initializer="crack")  # doctest: +SKIP
    ['<crack>', '<crack>_1', '<crack>_2']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from defectsynth.diffusion.model import DiffusionModel

GROUPS_KEY = "defectsynth.groups"


def token_names(name: str, count: int) -> list[str]:
    """``<name>``, ``<name>_1``, ... ``<name>_{count-1}``."""
    if count < 1:
        msg = f"placeholder group {name!r}: count must be at least 1, got {count}"
        raise ValueError(msg)
    first = f"<{name}>"
    return [first] + [f"{first}_{i}" for i in range(1, count)]


class PlaceholderTokens:
    """Groups of placeholder tokens added to one model's tokenizer and text encoder."""

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model
        self.groups: dict[str, list[str]] = {}
        self._frozen: torch.Tensor | None = None

    @property
    def embedding(self) -> torch.nn.Embedding:
        """The text encoder's token-embedding table."""
        return self.model.text_encoder.get_input_embeddings()

    def ids(self, group: str | None = None) -> list[int]:
        """Token ids of one group, or of every group."""
        names = self.groups[group] if group is not None else self.groups_flat
        return self.model.tokenizer.convert_tokens_to_ids(names)

    def prompt(self, group: str) -> str:
        """The group's tokens joined by spaces, to put in a prompt."""
        return " ".join(self.groups[group])

    def add(self, name: str, *, count: int, initializer: str) -> list[str]:
        """Add ``count`` tokens for ``name``, each row initialised to the mean embedding of ``initializer``."""
        if name in self.groups:
            msg = f"placeholder group {name!r} was already added"
            raise ValueError(msg)
        tokenizer = self.model.tokenizer
        init_ids = tokenizer.encode(initializer, add_special_tokens=False)
        if not init_ids:
            msg = f"initializer {initializer!r} of {name!r} has no tokens"
            raise ValueError(msg)
        names = token_names(name, count)
        existing = [t for t in names if t in tokenizer.get_vocab()]
        if existing or tokenizer.add_tokens(names) != count:
            msg = f"placeholder tokens {existing or names} already exist in the tokenizer; pick another name"
            raise ValueError(msg)
        self.model.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = self.embedding.weight
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids(names)] = weight[init_ids].mean(dim=0)
        self.groups[name] = names
        self._frozen = None
        return names

    def trainable_rows(self) -> torch.nn.Parameter:
        """Enable training of the embedding table and remember the rows that must not change.

        Give the returned parameter to the optimizer and call ``restore_frozen_rows`` after each step.
        """
        weight = self.embedding.weight
        self._frozen = weight.detach().clone()
        weight.requires_grad_(True)
        return weight

    def restore_frozen_rows(self) -> None:
        """Put every non-placeholder row back to its value at ``trainable_rows`` (bit-identical)."""
        if self._frozen is None:
            msg = "call trainable_rows() before restore_frozen_rows()"
            raise RuntimeError(msg)
        keep = torch.ones(self._frozen.shape[0], dtype=torch.bool, device=self._frozen.device)
        keep[self.ids()] = False
        with torch.no_grad():
            self.embedding.weight[keep] = self._frozen[keep].to(self.embedding.weight.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned rows, keyed by token, in float32 on the CPU."""
        weight = self.embedding.weight.detach()
        return {t: weight[i].float().cpu().clone() for t, i in zip(self.groups_flat, self.ids(), strict=True)}

    @property
    def groups_flat(self) -> list[str]:
        """Every token of every group, in order."""
        return [t for g in self.groups.values() for t in g]

    def save(self, path: Path) -> Path:
        """Write the learned rows as safetensors; the group structure goes in the file's metadata."""
        save_file(self.state_dict(), str(path), metadata={GROUPS_KEY: json.dumps(self.groups)})
        return Path(path)

    @classmethod
    def load(cls, model: DiffusionModel, path: Path) -> PlaceholderTokens:
        """Add the saved groups to ``model`` and set their rows to the saved values."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            groups = json.loads((handle.metadata() or {}).get(GROUPS_KEY, "{}"))
        rows = load_file(str(path))
        if not groups or set(rows) != {t for names in groups.values() for t in names}:
            msg = f"{path}: not a placeholder-token file (groups and rows do not match)"
            raise ValueError(msg)
        tokens = cls(model)
        for name, names in groups.items():
            tokens.add(name, count=len(names), initializer=model.tokenizer.eos_token)
        tokens.set_rows(rows)
        return tokens

    def restore(self, path: Path) -> None:
        """Set this object's rows from a file it saved (a training checkpoint); the groups must match."""
        rows = load_file(str(path))
        if set(rows) != set(self.groups_flat):
            msg = f"{path}: its tokens are not this object's groups {sorted(self.groups)}"
            raise ValueError(msg)
        self.set_rows(rows)

    def set_rows(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Write rows, keyed by token, into the embedding table."""
        weight = self.embedding.weight
        with torch.no_grad():
            for token, row in rows.items():
                weight[self.model.tokenizer.convert_tokens_to_ids(token)] = row.to(weight)


def encode_prompt_with_embeddings(
    model: DiffusionModel, prompts: Sequence[str], replacements: Mapping[int, torch.Tensor]
) -> torch.Tensor:
    """``model.encode_prompt`` with some tokens' input embeddings replaced by given per-prompt vectors.

    Wherever token id ``i`` occurs in prompt ``b``, the token-embedding table's output (the text
    transformer's input, before position embeddings) becomes ``replacements[i][b]``; the text encoder
    then runs as usual. Gradients flow into the replacement tensors (the encoder's weights stay as they
    are), which is how AnomalyDiffusion trains its spatial encoder: its outputs e_s enter the frozen text
    encoder as token embeddings. A temporary forward hook on the embedding module does the replacement,
    so any text encoder with ``get_input_embeddings()`` works; it is removed even when encoding fails.

    Args:
        model: the diffusion model whose tokenizer and text encoder encode the prompts.
        prompts: B prompts, each containing the replaced tokens where the vectors should go.
        replacements: token id -> (B, D) tensor, row b for prompt b; D is the embedding width.

    Returns:
        Text-encoder hidden states (B, L, D) in the model's dtype, as ``encode_prompt`` returns.

    Raises:
        ValueError: a replacement is not (B, D), or a token id occurs in none of the (tokenized,
            truncated) prompts.
    """
    embedding = model.text_encoder.get_input_embeddings()
    batch, width = len(prompts), embedding.embedding_dim
    for token_id, vectors in replacements.items():
        if tuple(vectors.shape) != (batch, width):
            msg = (
                f"replacement for token id {token_id} has shape {tuple(vectors.shape)}, "
                f"expected ({batch}, {width}): one row of the embedding width per prompt"
            )
            raise ValueError(msg)
    input_ids = model.tokenize(prompts)
    absent = [token_id for token_id in replacements if not bool((input_ids == token_id).any())]
    if absent:
        msg = f"token ids {absent} ({model.tokenizer.convert_ids_to_tokens(absent)}) occur in none of the prompts"
        raise ValueError(msg)

    def replace(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        for token_id, vectors in replacements.items():
            where = (ids == token_id).unsqueeze(-1)
            rows = vectors.to(device=output.device, dtype=output.dtype).unsqueeze(1)
            output = torch.where(where, rows, output)
        return output

    handle = embedding.register_forward_hook(replace)
    try:
        hidden = model.text_encoder(input_ids)[0]
    finally:
        handle.remove()
    return hidden.to(model.dtype)
