"""Words to subword tokens: which token positions carry each CoNLL-U word, from character offsets.

A sentence is tokenized exactly as :func:`lmscope.collect` does (``tokenizer(text)``, special tokens
included), asking a fast tokenizer for each token's character offsets. A token *belongs* to the word
that holds its first word character (a byte-level BPE token ``" see"`` starts with a space, which
belongs to no word, so it goes to ``see``; special tokens have empty offsets and belong to none).
Tokens of a word are consecutive, so a word is a range ``[start, end)`` of token positions.

Where a token begins in one word and runs into the next (BPE ``"didn"`` over ``did`` + ``n't``), the
first word owns it and the next word starts at the following token (``"'t"``). A word that owns no token
at all (one token covering two whole words) falls back to the tokens that overlap it, so every word
with any characters in the encoding gets a representation; a word whose characters the tokenizer
dropped gets the range ``(-1, -1)`` and is left out of probing datasets.

Pooling a word's tokens (``first``, ``last`` or ``mean`` subword) turns per-token activations
``[pos, features]`` into per-word rows ``[word, features]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.probing._conllu import Sentence

__all__ = ["POOLING", "Alignment", "align", "pool"]

POOLING = ("first", "last", "mean")


@dataclass(frozen=True)
class Alignment:
    """Token ids of one sentence and the token range of each of its words."""

    token_ids: tuple[int, ...]  # [pos], as tokenizer(text)["input_ids"]
    offsets: tuple[tuple[int, int], ...]  # [pos] -> character (start, end); (0, 0) for special tokens
    words: np.ndarray  # [word, 2] int: token positions [start, end) of each word; (-1, -1) if none

    @property
    def found(self) -> np.ndarray:  # [word] bool
        """Which words have tokens (a tokenizer may drop characters, e.g. control characters)."""
        return self.words[:, 0] >= 0

    def tokens_of(self, word: int) -> range:
        start, end = self.words[word]
        return range(int(start), int(end))


def align(tokenizer: Any, sentence: Sentence) -> Alignment:
    """Token ranges of ``sentence``'s words under ``tokenizer`` (a fast Hugging Face tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LmscopeError(
            f"probing aligns words to tokens with character offsets, which {type(tokenizer).__name__} cannot give: "
            "load the model with a fast (Rust) tokenizer"
        )
    encoding = tokenizer(sentence.text, return_offsets_mapping=True)
    ids = tuple(int(i) for i in encoding["input_ids"])
    offsets = tuple((int(a), int(b)) for a, b in encoding["offset_mapping"])

    owner = np.full(len(sentence.text), -1, dtype=np.int64)  # [char] -> word, -1 between words
    for w, (start, end) in enumerate(sentence.spans):
        owner[start:end] = np.where(owner[start:end] < 0, w, owner[start:end])  # first word wins on overlap
    token_word = np.full(len(ids), -1, dtype=np.int64)  # [pos] -> owning word
    for pos, (start, end) in enumerate(offsets):
        inside = owner[start:end]
        inside = inside[inside >= 0]
        if len(inside):
            token_word[pos] = inside[0]

    words = np.full((len(sentence), 2), -1, dtype=np.int64)
    for w, (start, end) in enumerate(sentence.spans):
        owned = np.flatnonzero(token_word == w)
        if len(owned) == 0:  # a token began in an earlier word and covers this one: use the overlapping ones
            owned = np.array([p for p, (a, b) in enumerate(offsets) if max(a, start) < min(b, end)], dtype=np.int64)
        if len(owned):
            words[w] = owned[0], owned[-1] + 1
    return Alignment(token_ids=ids, offsets=offsets, words=words)


def pool(activations: np.ndarray, words: np.ndarray, how: str = "first") -> np.ndarray:
    """Per-word rows ``[word, features]`` from per-token ``activations [pos, features]``.

    ``words [word, 2]`` holds each word's token range ``[start, end)`` (positions into ``activations``);
    ``how`` picks the ``first`` or ``last`` subword, or the ``mean`` over the word's subwords.
    """
    if how not in POOLING:
        raise LmscopeError(f"pooling must be one of {', '.join(POOLING)}, not {how!r}")
    start, end = words[:, 0], words[:, 1]
    if how == "first":
        return activations[start]
    if how == "last":
        return activations[end - 1]
    length = end - start  # [word]
    total = activations[start].astype(np.float64)  # [word, features]
    for k in range(1, int(length.max(initial=1))):
        longer = np.flatnonzero(length > k)
        total[longer] += activations[start[longer] + k]
    return (total / length[:, None]).astype(activations.dtype)
