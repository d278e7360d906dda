"""Probing datasets: one row per CoNLL-U word, its label, its type, and where its tokens sit in a collection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.probing._align import Alignment, align, pool
from lmscope.probing._conllu import TASKS, Sentence

__all__ = ["ProbingDataset", "Split"]


@dataclass(frozen=True)
class Split:
    """Word masks of one train/dev/test split (whole sentences go to one side)."""

    train: np.ndarray  # [word] bool
    dev: np.ndarray  # [word] bool
    test: np.ndarray  # [word] bool


@dataclass(frozen=True)
class ProbingDataset:
    """Words of some sentences with one label each, aligned to the tokens a model reads.

    Words whose characters the tokenizer dropped are left out (``dropped`` counts them).
    """

    task: str
    sentences: tuple[Sentence, ...]
    alignments: tuple[Alignment, ...]
    label_names: tuple[str, ...]  # [class], sorted
    labels: np.ndarray  # [word] int index into label_names
    types: tuple[str, ...]  # [word] the word's form: its type for the control task
    sentence: np.ndarray  # [word] index of the word's sentence
    tokens: np.ndarray  # [word, 2] token positions [start, end) within its sentence's encoding
    dropped: int

    @classmethod
    def build(cls, tokenizer: Any, sentences: Sequence[Sentence], task: str = "upos") -> ProbingDataset:
        """Label every word of ``sentences`` for ``task`` (``upos``, ``xpos`` or ``deprel``) and align it."""
        if task not in TASKS:
            raise LmscopeError(f"unknown probing task {task!r}: choose one of {', '.join(TASKS)}")
        if not sentences:
            raise LmscopeError("no sentences to probe: give at least one")
        alignments = tuple(align(tokenizer, s) for s in sentences)
        found = np.concatenate([a.found for a in alignments])  # [word] bool
        raw = [label for s in sentences for label in s.labels[task]]
        names = tuple(sorted(set(raw)))
        index = {name: i for i, name in enumerate(names)}
        keep = np.flatnonzero(found)
        labels = np.array([index[raw[i]] for i in keep], dtype=np.int64)
        words = [w for s in sentences for w in s.words]
        sentence = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(sentences)])
        tokens = np.concatenate([a.words for a in alignments])
        return cls(
            task=task,
            sentences=tuple(sentences),
            alignments=alignments,
            label_names=names,
            labels=labels,
            types=tuple(words[i] for i in keep),
            sentence=sentence[keep],
            tokens=tokens[keep],
            dropped=int(len(found) - len(keep)),
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def texts(self) -> list[str]:
        """The sentences' surface texts, in order (what :func:`lmscope.collect` runs)."""
        return [s.text for s in self.sentences]

    def check(self, collection: Any) -> None:
        """Raise unless ``collection`` tokenized these texts exactly as the alignment did."""
        if len(collection.token_ids) != len(self.alignments):
            raise LmscopeError(
                f"the collection has {len(collection.token_ids)} texts, the dataset {len(self.alignments)} sentences"
            )
        for i, (ids, alignment) in enumerate(zip(collection.token_ids, self.alignments, strict=True)):
            if tuple(ids) != alignment.token_ids:
                raise LmscopeError(
                    f"sentence {i} was tokenized differently for collection and alignment: "
                    "collect the dataset's texts with the same model"
                )

    def features(self, collection: Any, site: str, layer: int, how: str = "first") -> np.ndarray:
        """Per-word representations ``[word, features]`` of ``site`` at ``layer``, pooled over subwords."""
        activations = collection.get(site, layer)  # [n_tokens, features]
        start = np.asarray(collection.offsets, dtype=np.int64)[self.sentence]  # [word]
        return pool(activations, self.tokens + start[:, None], how)

    def split(self, seed: int, test: float = 0.33, dev: float = 0.1) -> Split:
        """A random split by sentence: ``test`` of the words for testing, ``dev`` of the rest for model selection."""
        if not 0 < test < 1 or not 0 < dev < 1:
            raise LmscopeError("the test and dev fractions must lie strictly between 0 and 1")
        order = np.random.default_rng(seed).permutation(len(self.sentences))
        size = np.bincount(self.sentence, minlength=len(self.sentences))[order]  # words per sentence, shuffled
        cumulative = np.cumsum(size)
        n_test = int(np.searchsorted(cumulative, test * len(self))) + 1
        rest = cumulative[n_test:] - cumulative[n_test - 1]
        n_dev = int(np.searchsorted(rest, dev * rest[-1])) + 1 if len(rest) else 0
        side = np.zeros(len(self.sentences), dtype=np.int64)  # 0 train, 1 dev, 2 test
        side[order[:n_test]] = 2
        side[order[n_test : n_test + n_dev]] = 1
        if n_dev == 0 or n_test + n_dev >= len(self.sentences):
            raise LmscopeError(f"{len(self.sentences)} sentences are too few for a train/dev/test split: use more")
        per_word = side[self.sentence]
        return Split(train=per_word == 0, dev=per_word == 1, test=per_word == 2)
