"""An offline CLIP tokenizer: byte-level BPE whose merges spell out a fixed prompt vocabulary.

No tokenizer can be downloaded here, so the tiny base model gets one built from words its prompts
use. Every byte has a token (alone and word-final), so any text tokenizes; placeholder tokens are
added later by ``tokens.PlaceholderTokens``. The same words give the same tokenizer on every machine.

Example:
    >>> tokenizer = build_offline_tokenizer(["wood"], max_length=16)
    >>> tokenizer.decode(tokenizer("a photo of wood").input_ids, skip_special_tokens=True)
    'a photo of wood'
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Words of generic prompts and common defect names; product names are added per run.
PROMPT_WORDS = (
    "a an the photo of with and image picture industrial product surface object part good normal "
    "defect anomaly damaged crack scratch hole stain spot color cut contamination broken bent fold "
    "glue thread rough poke squeeze missing misplaced faulty print liquid oil metal fabric wood "
    "leather carpet tile grid bottle cable capsule hazelnut nut screw pill toothbrush transistor zipper "
    "washer mask texture line patch shape faint thin thick black white grey brown red orange yellow green cyan "
    "blue purple pink"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's table)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right, in the order the sorted words first need them.

    Written out rather than learned: ``tokenizers``' trainer breaks ties between equally frequent pairs
    in hash-map order, so it gave a different vocabulary on most runs. Words outside printable ASCII
    (whose byte-level symbols differ from their characters) get no merges and tokenize byte by byte.
    """
    merges: dict[tuple[str, str], None] = {}
    for word in sorted(set(words)):
        if not word or not (word.isascii() and word.isprintable()) or " " in word:
            continue
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        built = symbols[0]
        for symbol in symbols[1:]:
            merges.setdefault((built, symbol))
            built += symbol
    return list(merges)


def build_offline_tokenizer(extra_words: Iterable[str] = (), *, max_length: int = 32) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose merges build ``PROMPT_WORDS`` plus ``extra_words`` (see ``word_merges``).

    ``max_length`` becomes ``model_max_length``: the text encoder's position count.
    """
    merges = word_merges(w.lower() for w in (*PROMPT_WORDS, *extra_words))
    alphabet = _byte_alphabet()
    vocab_tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    vocab_tokens += [a + b for a, b in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*vocab_tokens, BOS, EOS]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
