"""An offline CLIP tokenizer: byte-level BPE trained in milliseconds on a fixed prompt vocabulary.

No tokenizer can be downloaded here, so the tiny base model gets one built from words its prompts
use. Every byte has a token (alone and word-final), so any text tokenizes; placeholder tokens are
added later by ``tokens.PlaceholderTokens``. The same words give the same tokenizer on every machine.

Example:
    >>> tokenizer = build_offline_tokenizer(["wood"], max_length=16)
    >>> tokenizer.decode(tokenizer("a photo of wood").input_ids, skip_special_tokens=True)
    'a photo of wood'
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Words of generic prompts and common defect names; product names are added per run.
PROMPT_WORDS = (
    "a an the photo of with and image picture industrial product surface object part good normal "
    "defect anomaly damaged crack scratch hole stain spot color cut contamination broken bent fold "
    "glue thread rough poke squeeze missing misplaced faulty print liquid oil metal fabric wood "
    "leather carpet tile grid bottle cable capsule hazelnut nut screw pill toothbrush transistor zipper "
    "washer mask texture"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's table)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_offline_tokenizer(extra_words: Iterable[str] = (), *, max_length: int = 32) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose merges are learned from ``PROMPT_WORDS`` plus ``extra_words``.

    ``max_length`` becomes ``model_max_length``: the text encoder's position count.
    """
    words = sorted({w.lower() for w in (*PROMPT_WORDS, *extra_words) if w})
    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, end_of_word_suffix=END_OF_WORD, show_progress=False, special_tokens=[]
    )
    bpe.train_from_iterator([" ".join(words)], trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    alphabet = _byte_alphabet()
    vocab_tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    vocab_tokens += [a + b for a, b in merges if a + b not in vocab_tokens]
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*vocab_tokens, BOS, EOS]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
