"""Probes trained on a collection read shard by shard, for corpora larger than memory.

:func:`probe_collection` runs the probing study (:func:`lmscope.probing.probe`: task and control
probes per (site, layer) and seed, Hewitt & Liang 2019) on a :class:`~lmscope.analysis.collect.Collection`
of the dataset's texts that may not fit in memory. Each word's tokens lie in one text and each text
in one shard, so a shard yields its words' pooled features on its own. Words are read in *blocks*:
consecutive shards together until ``block_words`` words, kept in word order. Training
(:func:`lmscope.probing._probe.fit_blocks`) visits the blocks in a random order every epoch and
each block's words in a random order, in minibatches; dev and test accuracies are counted block by
block. The standardization statistics (mean and standard deviation of the training words) are
accumulated block by block in float64 (Chan et al. 1979's pairwise update).

When the split's words fit in one block, they are held once and the result is exactly that of the
in-memory study on the same data (the same minibatches, the same float32 statistics). With several
blocks the minibatches are drawn within blocks (shuffled blocks, shuffled words), a different
stochastic gradient order: the accuracies differ as another seed's would. Memory: one block of
words plus the probes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmscope.errors import LmscopeError
from lmscope.probing._align import POOLING, pool
from lmscope.probing._dataset import ProbingDataset
from lmscope.probing._probe import LEARNING_RATES, ProbeFit, _one_thread, control_labels, fit_blocks

__all__ = ["ShardWords", "probe_collection", "train_probes_streaming"]

_SITE = {"embeddings": ("resid_pre", 0)}  # a probing site read from another collected site


class ShardWords:
    """Per-word features of ``site`` at ``layer`` in a collection of ``dataset``'s texts, shard by shard."""

    def __init__(self, dataset: ProbingDataset, collection: Any, site: str, layer: int, how: str = "first",
                 block_words: int = 200_000):  # fmt: skip
        if how not in POOLING:
            raise LmscopeError(f"pooling must be one of {', '.join(POOLING)}, not {how!r}")
        dataset.check(collection)
        self.collection, self.how, self.block_words = collection, how, max(1, int(block_words))
        self.name = f"{site}.{layer}"
        if site not in collection.sites or layer not in collection.layers:
            raise LmscopeError(f"the collection holds no {site} at layer {layer}: collect it")
        start = np.asarray(collection.offsets, dtype=np.int64)[dataset.sentence]  # [word]
        self.spans = dataset.tokens + start[:, None]  # [word, 2] token range on the concatenated axis
        self.words: list[np.ndarray] = []  # per shard: the words whose tokens it holds, in word order
        for shard in collection.shards(["dest"]):
            dest = np.sort(shard["dest"].astype(np.int64))
            at = np.minimum(np.searchsorted(dest, self.spans[:, 0]), len(dest) - 1)
            self.words.append(np.flatnonzero(dest[at] == self.spans[:, 0]))

    def plan(self, mask: np.ndarray) -> list[list[int]]:
        """Shards grouped into blocks of about ``block_words`` of the words in ``mask``."""
        blocks: list[list[int]] = [[]]
        count = 0
        for number, words in enumerate(self.words):
            n = int(mask[words].sum())
            if not n:
                continue
            if blocks[-1] and count + n > self.block_words:
                blocks.append([])
                count = 0
            blocks[-1].append(number)
            count += n
        return [b for b in blocks if b]

    def read(self, shards: Sequence[int], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(words [word], features [word, features])`` of the words in ``mask`` held by ``shards``, in word order."""
        found, parts = [], []
        for number, shard in zip(shards, self.collection.shards(["dest", self.name], shards), strict=True):
            words = self.words[number][mask[self.words[number]]]
            dest = shard["dest"].astype(np.int64)
            order = np.argsort(dest)
            local = np.empty((len(words), 2), dtype=np.int64)  # [word, 2] rows in this shard
            local[:, 0] = order[np.searchsorted(dest[order], self.spans[words, 0])]  # (a word's end may be past them)
            local[:, 1] = local[:, 0] + (self.spans[words, 1] - self.spans[words, 0])  # a text's rows are in order
            found.append(words)
            parts.append(pool(shard[self.name], local, self.how))
        words = np.concatenate(found)
        order = np.argsort(words, kind="stable")
        return words[order], np.concatenate(parts)[order]


def _statistics(source: ShardWords, blocks: list[list[int]], mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (``n − 1``) of the words in ``mask``, float32, as ``_standardize`` gives them."""
    n, mean, squares = 0, None, None
    for shards in blocks:
        _, x = source.read(shards, mask)
        if len(blocks) == 1:  # one block: exactly the in-memory statistics
            t = torch.as_tensor(x, dtype=torch.float32)
            return t.mean(0), t.std(0).clamp_min(1e-6)
        x = x.astype(np.float64)
        m, count = x.mean(0), len(x)
        q = ((x - m) ** 2).sum(0)
        if mean is None:
            n, mean, squares = count, m, q
        else:  # Chan, Golub & LeVeque: merge two (count, mean, sum of squared deviations)
            delta, total = m - mean, n + count
            mean = mean + delta * count / total
            squares = squares + q + delta**2 * n * count / total
            n = total
    std = np.sqrt(squares / max(n - 1, 1))
    return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6)


@torch.no_grad()
def train_probes_streaming(
    source: ShardWords,
    labels: np.ndarray,  # [label_set, word]
    train: np.ndarray,  # [word] bool
    dev: np.ndarray,
    test: np.ndarray,
    n_classes: int,
    *,
    epochs: int = 50,
    learning_rates: Sequence[float] = LEARNING_RATES,
    batch_size: int = 64,
    seed: int = 0,
) -> ProbeFit:
    """:func:`lmscope.probing.train_probes` on the words of ``source``, read block by block (module docstring)."""
    if not train.any() or not dev.any() or not test.any():
        raise LmscopeError("a probe needs training, dev and test words: give more tokens")
    if epochs < 1 or not learning_rates:
        raise LmscopeError("a probe needs at least one epoch and one learning rate")
    labels = torch.as_tensor(np.atleast_2d(labels), dtype=torch.long)
    plans = {name: source.plan(mask) for name, mask in (("train", train), ("dev", dev), ("test", test))}
    masks = {"train": train, "dev": dev, "test": test}
    with _one_thread():
        mean, std = _statistics(source, plans["train"], train)
        held: dict[str, list[Any]] = {}

        def blocks(name: str, order: Any = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            plan = plans[name]
            if len(plan) == 1 and name in held:
                yield from held[name]
                return
            for index in range(len(plan)) if order is None else order.tolist():
                words, x = source.read(plan[index], masks[name])
                block = ((torch.as_tensor(x, dtype=torch.float32) - mean) / std, labels[:, words])
                if len(plan) == 1:
                    held[name] = [block]  # one block: read once, kept
                yield block

        def train_blocks(generator: torch.Generator) -> Iterator[Any]:
            n = len(plans["train"])
            return blocks("train", torch.randperm(n, generator=generator) if n > 1 else None)

        return fit_blocks(
            train_blocks,
            lambda: blocks("dev"),
            lambda: blocks("test"),
            source.collection.features[source.name.split(".")[0]],
            labels.shape[0],
            n_classes,
            epochs,
            tuple(learning_rates),
            batch_size,
            seed,
        )


def probe_collection(
    collection: Any,
    dataset: ProbingDataset,
    *,
    sites: Sequence[str] | str = ("resid_post",),
    layers: Sequence[int] | None = None,
    seeds: int | Sequence[int] = 5,
    pool: str = "first",
    test_fraction: float = 0.33,
    dev_fraction: float = 0.1,
    epochs: int = 50,
    learning_rates: Sequence[float] = LEARNING_RATES,
    batch_size: int = 64,
    block_words: int = 200_000,
) -> Any:
    """The probing study (:func:`lmscope.probing.probe`) on a collection of ``dataset.texts``, streamed.

    ``sites``: ``embeddings`` (needs ``resid_pre`` at layer 0 in the collection), ``resid_post``,
    ``mlp_act``; ``layers``: the collected layers to probe (default: all). ``block_words`` bounds the
    words held at once (see the module docstring).
    """
    from lmscope.probing._study import SITES, ProbingResult, _row

    started = time.perf_counter()
    chosen_sites = [sites] if isinstance(sites, str) else list(sites)
    unknown = [s for s in chosen_sites if s not in SITES]
    if unknown or not chosen_sites:
        raise LmscopeError(f"probing sites must be among {', '.join(SITES)}, not {', '.join(unknown) or 'none'}")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seed_list:
        raise LmscopeError("give at least one seed")
    chosen_layers = tuple(collection.layers) if layers is None else tuple(int(x) for x in layers)
    configs = [("embeddings", 0)] if "embeddings" in chosen_sites else []
    configs += [(site, layer) for layer in chosen_layers for site in SITES[1:] if site in chosen_sites]
    n_classes = len(dataset.label_names)
    splits = [dataset.split(seed, test_fraction, dev_fraction) for seed in seed_list]
    label_sets = [
        np.stack([dataset.labels, control_labels(dataset.types, dataset.labels, n_classes, s)]) for s in seed_list
    ]
    rows = []
    for site, layer in configs:
        stored, stored_layer = _SITE.get(site, (site, layer))
        source = ShardWords(dataset, collection, stored, stored_layer, pool, block_words)
        per_seed = []
        for seed, split, labels in zip(seed_list, splits, label_sets, strict=True):
            fit = train_probes_streaming(
                source, labels, split.train, split.dev, split.test, n_classes, epochs=epochs,
                learning_rates=learning_rates, batch_size=batch_size, seed=seed,
            )  # fmt: skip
            per_seed.append(fit.test_accuracy)
        accuracies = np.stack(per_seed)  # [seed, label_set]
        rows.append(_row(site, layer, accuracies[:, 0], accuracies[:, 1]))
    majority = [
        float(np.mean(dataset.labels[s.test] == np.bincount(dataset.labels[s.train], minlength=n_classes).argmax()))
        for s in splits
    ]
    return ProbingResult(
        model=collection.model.name,
        task=dataset.task,
        pool=pool,
        label_names=dataset.label_names,
        n_words=len(dataset),
        n_sentences=len(dataset.sentences),
        n_train=float(np.mean([s.train.sum() for s in splits])),
        n_dev=float(np.mean([s.dev.sum() for s in splits])),
        n_test=float(np.mean([s.test.sum() for s in splits])),
        seeds=seed_list,
        majority=float(np.mean(majority)),
        rows=tuple(rows),
        seconds=time.perf_counter() - started,
    )
