"""Moments of a collection's activations accumulated shard by shard: means and centered cross-products.

For inputs ``x_k [token, features]`` (one per (site, layer)), :func:`accumulate` reads a
:class:`~lmscope.analysis.collect.Collection` one shard at a time and keeps, in float64,

- ``n``, and per input the sum ``Σ (x − c)`` around a fixed shift ``c`` (the
  mean of the first shard), which removes most of the cancellation of the textbook formula
  ``Xᵀ Y − n·m_x m_yᵀ`` (the "shifted data" algorithm; Chan, Golub & LeVeque 1983);
- per requested block ``(i, j)`` the cross-product ``Σ (x_i − c_i)ᵀ (x_j − c_j)`` ``[features_i, features_j]``,
  from which :meth:`Moments.centered` gives ``X_cᵀ Y_c = Σ(x−c)ᵀ(y−c') − n·m̃_x m̃_yᵀ`` (``m̃`` the shifted means);
- per position within a text, the sums behind :func:`lmscope.analysis._positions.dominance`
  (centered squared norm per position, and the largest row of each position).

Memory is one shard plus these statistics (the per-position sums are two vectors per input and
position: texts of up to 64 tokens and 30 inputs of 576 features take 18 MB). When the blocks
together exceed ``memory_mb`` they are split over several passes (each reads every shard again; a
caller may use and drop each pass's blocks before the next); one pass when they fit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lmscope.analysis._positions import select_rows, within_text
from lmscope.errors import LmscopeError

__all__ = ["Moments", "accumulate", "blas_threads", "passes"]

Key = tuple[str, int]  # (site, layer)


class Moments:
    """Accumulated statistics of inputs ``keys`` over the selected rows of a collection (see the module docstring)."""

    def __init__(self, keys: Sequence[Key], features: dict[str, int], groups: int):
        self.keys = tuple(keys)
        self.features = {k: int(features[k[0]]) for k in self.keys}
        self.n = 0
        self.shift: dict[Key, np.ndarray] = {}
        self.sums: dict[Key, np.ndarray] = {}  # Σ (x − c)  [features]
        self.blocks: dict[tuple[Key, Key], np.ndarray] = {}  # Σ (x_i − c_i)ᵀ (x_j − c_j)
        # per position within a text: count, Σ‖x − c‖², Σ (x − c) [pos, features], and the row with the
        # largest ‖x − c‖² (its energy, vector and index on the concatenated token axis)
        self.group_count = np.zeros(groups, dtype=np.int64)
        self.group_energy: dict[Key, np.ndarray] = {}
        self.group_sums: dict[Key, np.ndarray] = {}
        self.best: dict[Key, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def mean(self, key: Key) -> np.ndarray:  # [features]
        return self.shift[key] + self.sums[key] / self.n

    def centered(self, a: Key, b: Key) -> np.ndarray:
        """``X_aᵀ X_b`` of the centered inputs ``[features_a, features_b]`` (not divided by ``n``)."""
        if (a, b) in self.blocks:
            block, ma, mb = self.blocks[a, b], self.sums[a] / self.n, self.sums[b] / self.n
        elif (b, a) in self.blocks:
            return self.centered(b, a).T
        else:
            raise LmscopeError(f"the statistics of {a} × {b} were not accumulated")
        return block - self.n * np.outer(ma, mb)

    def dominance(self, key: Key) -> tuple[int, float, int | None]:
        """:func:`lmscope.analysis._positions.dominance` of the centered input, grouped by position.

        ``row`` is the index on the concatenated token axis. Within a position, the candidate row is
        the one with the largest squared norm around the shift (the in-memory measure uses the mean:
        the same row whenever one row holds most of its position's energy, the only case reported).
        """
        m = self.sums[key] / self.n  # mean − shift
        energy = self.group_energy[key] - 2 * self.group_sums[key] @ m + self.group_count * (m @ m)  # [pos]
        total = float(energy.sum())
        if total <= 0:
            return 0, 0.0, None
        top = int(energy.argmax())
        _, vectors, rows = self.best[key]
        own = float(((vectors[top] - m) ** 2).sum())
        if own >= 0.9 * energy[top]:
            return top, own / total, int(rows[top])
        return top, float(energy[top] / total), None

    def update(self, data: dict[Key, np.ndarray], groups: np.ndarray, rows: np.ndarray, blocks: Sequence[Any],
               first: bool) -> None:  # fmt: skip
        """Add one shard's rows ``data[key] [row, features]`` (``groups``: position within text; ``rows``: index)."""
        if not len(groups):
            return
        shifted = {}
        runs = None
        if first:
            order = np.argsort(groups, kind="stable")  # rows by position within text
            starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
            runs = (order, starts, groups[order][starts])
        for key, x in data.items():
            x = x.astype(np.float64)
            if key not in self.shift:
                self.shift[key] = x.mean(axis=0)
            x -= self.shift[key]
            shifted[key] = x  # [row, features]
            if runs is not None:
                self._moments(key, x, groups, rows, runs)
        if first:
            self.n += len(groups)
            np.add.at(self.group_count, groups, 1)
        for a, b in blocks:
            out = self.blocks.get((a, b))
            product = shifted[a].T @ shifted[b]  # [features_a, features_b]
            if out is None:
                self.blocks[a, b] = product
            else:
                out += product

    def _moments(self, key: Key, x: np.ndarray, groups: np.ndarray, rows: np.ndarray, runs: Any) -> None:
        order, starts, present = runs  # rows sorted by position, where each position starts, which positions
        energy = np.einsum("ij,ij->i", x, x)  # [row]
        size = len(self.group_count)
        if key not in self.sums:
            d = x.shape[1]
            self.sums[key] = np.zeros(d)
            self.group_energy[key], self.group_sums[key] = np.zeros(size), np.zeros((size, d))
            self.best[key] = (np.full(size, -1.0), np.zeros((size, d)), np.zeros(size, np.int64))
        self.sums[key] += x.sum(axis=0)
        self.group_energy[key][present] += np.add.reduceat(energy[order], starts)
        self.group_sums[key][present] += np.add.reduceat(x[order], starts, axis=0)
        best_energy, vectors, best_rows = self.best[key]
        top = order[starts + np.array([int(np.argmax(e)) for e in np.split(energy[order], starts[1:])])]
        better = top[energy[top] > best_energy[present]]
        best_energy[groups[better]] = energy[better]
        vectors[groups[better]] = x[better]
        best_rows[groups[better]] = rows[better]


def passes(blocks: Sequence[tuple[Key, Key]], features: dict[Key, int], memory_mb: float) -> list[list[Any]]:
    """``blocks`` grouped into passes whose float64 statistics fit in ``memory_mb`` (each pass at least one
    block); the auto-products ``(a, a)`` all go to the first pass, whatever their size."""
    limit = memory_mb * 2**20
    out: list[list[Any]] = [[pair for pair in blocks if pair[0] == pair[1]]]
    used = sum(8.0 * features[a] ** 2 for a, _ in out[0])
    for a, b in (pair for pair in blocks if pair[0] != pair[1]):
        size = 8.0 * features[a] * features[b]
        if out[-1] and used + size > limit:
            out.append([])
            used = 0.0
        out[-1].append((a, b))
        used += size
    return out


def accumulate(
    collection: Any,
    keys: Sequence[Key],
    blocks: Sequence[tuple[Key, Key]],
    *,
    positions: Any = None,
    skip_first: bool = False,
    memory_mb: float = 512.0,
    progress: bool = False,
    after_pass: Any = None,
) -> tuple[Moments, str]:
    """:class:`Moments` of ``keys`` with the cross-products ``blocks`` over ``collection``, and the row selection.

    ``positions`` / ``skip_first`` choose positions within each text (as in ``Collection.get``).
    ``after_pass(moments, blocks)``, if given, is called after each pass with the blocks it
    accumulated (the means are complete from the first pass on); it may use and delete them, so
    only one pass's blocks are held at a time.
    """
    lengths = [len(ids) for ids in collection.token_ids]
    rows, selection = select_rows(lengths, positions, skip_first)
    keep = None
    if rows is not None:
        keep = np.zeros(collection.n_tokens, dtype=bool)
        keep[rows] = True
    within = within_text(lengths)  # [token] position within its text
    features = {key: int(collection.features[key[0]]) for key in keys}
    moments = Moments(keys, collection.features, int(max(lengths)))
    groups_of = passes(blocks, features, memory_mb) or [[]]
    from tqdm.auto import tqdm

    total = len(groups_of) * len(collection._shards)
    bar = tqdm(total=total, desc="statistics", unit="shard", disable=not progress)
    try:
        for number, group in enumerate(groups_of):
            first = number == 0
            needed = list(keys) if first else sorted({k for pair in group for k in pair})
            names = ["dest", *(f"{site}.{layer}" for site, layer in needed)]
            for shard in collection.shards(names):
                dest = shard["dest"].astype(np.int64)  # [row] index on the concatenated token axis
                chosen = slice(None) if keep is None else keep[dest]
                data = {key: shard[f"{key[0]}.{key[1]}"][chosen] for key in needed}
                moments.update(data, within[dest[chosen]], dest[chosen], group, first)
                del shard, data
                bar.update()
            if after_pass is not None:
                after_pass(moments, group)
    finally:
        bar.close()
    return moments, selection


@contextmanager
def blas_threads(threads: int | None) -> Iterator[None]:
    """numpy's BLAS threads capped at ``threads`` inside the block (unchanged for ``None``), restored after.

    On a machine busy with other work, one thread can be many times faster than several that spin-wait.
    """
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(threads), user_api="blas"):
        yield
