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

Memory is one piece of a shard (``piece_mb``, 96 MiB by default: its rows as read in float32 and
stacked in float64; a collector's shards can be far larger) plus these statistics, and ``memory_mb``
bounds the statistics: the per-position sums (two vectors per input and position: texts of up to 64
tokens and 30 inputs of 576 features take 18 MB, of up to 347 tokens 91 MB), the auto-products (kept
to the end), whatever the caller reserves (``reserve_mb``: the decompositions it keeps), and the
cross-products of one pass. When the cross-products do not fit beside the rest they are split over
several passes (each reads every shard again; a caller may use and drop each pass's blocks before
the next); one pass when they fit.

Each pass's cross-products live in one float64 buffer, laid out as strips ``Σ (x_a − c_a)ᵀ [x_b … x_b']``
over runs of inputs that are adjacent in the shard's stacked matrix ``[row, Σ features]``, so a shard
costs one large product per strip rather than one small product per block, and with scipy the
products are added in place (BLAS ``dgemm`` with ``β = 1``: no product-sized temporary, no second
sweep over the statistics). The buffers are allocated once per pass and freed whole, and each shard
is stacked into one reused buffer, so the statistics never mix with the shards' short-lived arrays
in the heap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lmscope.analysis._positions import select_rows, within_text
from lmscope.errors import LmscopeError

__all__ = ["Moments", "accumulate", "blas_threads", "fixed_bytes", "passes"]

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
        self._centered: set[Key] = set()  # auto-products already centered in place

    def mean(self, key: Key) -> np.ndarray:  # [features]
        return self.shift[key] + self.sums[key] / self.n

    def centered(self, a: Key, b: Key) -> np.ndarray:
        """``X_aᵀ X_b`` of the centered inputs ``[features_a, features_b]`` (not divided by ``n``).

        An auto-product ``(a, a)`` is centered in place the first time it is asked for and returned
        itself, not a copy (callers keep it as the input's Gram matrix and must not modify it).
        """
        if a == b and (a, a) in self.blocks:
            block = self.blocks[a, a]
            if a not in self._centered:
                m = self.sums[a] / self.n
                block -= self.n * np.outer(m, m)
                self._centered.add(a)
            return block
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

    def update(self, data: dict[Key, np.ndarray], groups: np.ndarray, rows: np.ndarray, layout: _Layout,
               first: bool) -> None:  # fmt: skip
        """Add one shard's rows ``data[key] [row, features]`` (``groups``: position within text; ``rows``: index)
        to the blocks of ``layout`` (one pass's); ``first``: the pass that also takes the means and positions."""
        if not len(groups):
            return
        runs = None
        if first:
            order = np.argsort(groups, kind="stable")  # rows by position within text
            starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
            runs = (order, starts, groups[order][starts])
        stacked = layout.stack(len(groups))  # [row, Σ features] float64, column-major
        for key in layout.keys:
            x = data.pop(key)  # float32 [row, features]: let go as soon as it is copied
            if key not in self.shift:
                self.shift[key] = x.mean(axis=0, dtype=np.float64)
            shifted = stacked[:, layout.columns[key]]
            np.subtract(x, self.shift[key], out=shifted)
            del x
            if runs is not None:
                self._moments(key, shifted, groups, rows, runs)
        if first:
            self.n += len(groups)
            np.add.at(self.group_count, groups, 1)
        layout.add_products(stacked, self)

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


def fixed_bytes(keys: Sequence[Key], features: dict[Key, int], groups: int) -> float:
    """Bytes of the statistics held from the first pass to the end: per-position sums and auto-products."""
    return sum(8.0 * features[k] * (2 * groups + features[k] + 4) + 24.0 * groups for k in keys)


def passes(blocks: Sequence[tuple[Key, Key]], features: dict[Key, int], memory_mb: float,
           held: float = 0.0) -> list[list[Any]]:  # fmt: skip
    """``blocks`` grouped into passes whose float64 cross-products fit in ``memory_mb`` beside ``held``
    bytes kept throughout (each pass at least one block); the auto-products ``(a, a)`` all go to the
    first pass, whatever their size (they are part of ``held``)."""
    room = memory_mb * 2**20 - held
    out: list[list[Any]] = [[pair for pair in blocks if pair[0] == pair[1]]]
    used = 0.0
    for a, b in (pair for pair in blocks if pair[0] != pair[1]):
        size = 8.0 * features[a] * features[b]
        if any(pair[0] != pair[1] for pair in out[-1]) and used + size > room:
            out.append([])
            used = 0.0
        out[-1].append((a, b))
        used += size
    return out


class _Layout:
    """One pass's blocks as strips over the shard's stacked matrix, with their float64 buffers.

    The shard is stacked column-major, ``[row, Σ features]`` with the inputs ``keys`` side by side,
    so every input and every run of adjacent inputs is a contiguous ``[row, features]`` matrix. A
    strip ``(a, run)`` is ``Σ (x_a − c_a)ᵀ X_run`` ``[features_a, Σ features over the run]``, stored
    column-major, and each block ``(a, b)`` of the run is a contiguous view of it. Auto-products
    get their own buffer (they outlive the pass); the cross-products share one, freed with the pass.
    """

    def __init__(self, keys: Sequence[Key], features: dict[Key, int], blocks: Sequence[tuple[Key, Key]]):
        self.keys = tuple(keys)
        offsets = np.r_[0, np.cumsum([features[k] for k in self.keys])].astype(int)
        self.columns = {k: slice(int(offsets[i]), int(offsets[i + 1])) for i, k in enumerate(self.keys)}
        self.width = int(offsets[-1])
        strips: list[list[Any]] = []  # [a, first column, end column, [(b, start, end) within the strip]]
        for a, b in blocks:
            cols = self.columns[b]
            last = strips[-1] if strips else None
            if last is not None and last[0] == a != b and last[2] == cols.start and last[3][-1][0] != a:
                last[2] = cols.stop
                last[3].append((b, cols.start - last[1], cols.stop - last[1]))
            else:
                strips.append([a, cols.start, cols.stop, [(b, 0, cols.stop - cols.start)]])
        self.strips = strips
        self._stack = np.zeros(0)

    def allocate(self, moments: Moments) -> None:
        """The pass's strips, zeroed, in two buffers (auto-products, cross-products); blocks are views of them."""
        self.views = []
        for auto in (True, False):
            chosen = [strip for strip in self.strips if (strip[0] == strip[3][0][0]) == auto]
            sizes = [(self.columns[a].stop - self.columns[a].start) * (stop - start) for a, start, stop, _ in chosen]
            buffer = np.zeros(int(sum(sizes)))
            at = 0
            for (a, start, stop, members), size in zip(chosen, sizes, strict=True):
                strip = buffer[at : at + size].reshape(-1, stop - start, order="F")  # [features_a, run]
                at += size
                self.views.append((a, start, stop, strip, auto))
                for b, lo, hi in members:
                    moments.blocks[a, b] = strip[:, lo:hi]
            del buffer

    def stack(self, rows: int) -> np.ndarray:
        """A ``[rows, Σ features]`` column-major float64 matrix for a shard (one buffer, grown as needed)."""
        if self._stack.size < rows * self.width:
            self._stack = np.zeros(0)
            self._stack = np.empty(rows * self.width)
        return self._stack[: rows * self.width].reshape(rows, self.width, order="F")

    def add_products(self, stacked: np.ndarray, moments: Moments) -> None:
        """Add each strip's product of this shard, ``X_aᵀ X_run``, to the statistics."""
        for a, start, stop, strip, auto in self.views:
            if auto and a in moments._centered:
                raise LmscopeError(f"the auto-product of {a} was centered before its last shard was added")
            _add_product(stacked[:, self.columns[a]], stacked[:, start:stop], strip)

    def release(self) -> None:
        self.views, self._stack = [], np.zeros(0)


def _add_product(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """``out += xᵀ y`` (column-major float64 ``out``), in place with BLAS ``dgemm`` where scipy is installed."""
    gemm = _dgemm()
    if gemm is None:
        out += x.T @ y
    else:
        gemm(1.0, x, y, beta=1.0, c=out, trans_a=1, overwrite_c=1)


def _dgemm() -> Any:
    try:
        from scipy.linalg.blas import dgemm
    except ImportError:  # numpy alone: a product-sized temporary, then added
        return None
    return dgemm


def accumulate(
    collection: Any,
    keys: Sequence[Key],
    blocks: Sequence[tuple[Key, Key]],
    *,
    positions: Any = None,
    skip_first: bool = False,
    memory_mb: float = 512.0,
    reserve_mb: float = 0.0,
    piece_mb: float = 96.0,
    progress: bool = False,
    after_pass: Any = None,
) -> tuple[Moments, str]:
    """:class:`Moments` of ``keys`` with the cross-products ``blocks`` over ``collection``, and the row selection.

    ``positions`` / ``skip_first`` choose positions within each text (as in ``Collection.get``).
    ``after_pass(moments, blocks)``, if given, is called after each pass with the blocks it
    accumulated (the means are complete from the first pass on); it may use and delete them, so
    only one pass's blocks are held at a time. ``reserve_mb`` is memory the caller keeps beside the
    statistics until the end (its decompositions), counted against ``memory_mb``. Shards are read
    in pieces of about ``piece_mb`` (the rows as read in float32 and stacked in float64), whatever
    their size on disk.
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
    held = fixed_bytes(keys, features, int(max(lengths))) + reserve_mb * 2**20
    groups_of = passes(blocks, features, memory_mb, held) or [[]]
    from tqdm.auto import tqdm

    total = len(groups_of) * len(collection._shards)
    bar = tqdm(total=total, desc="statistics", unit="shard", disable=not progress)
    try:
        for number, group in enumerate(groups_of):
            first = number == 0
            wanted = set(keys) if first else {k for pair in group for k in pair}
            needed = [k for k in keys if k in wanted]  # in the caller's order: runs of adjacent inputs
            layout = _Layout(needed, features, group)
            layout.allocate(moments)
            names = ["dest", *(f"{site}.{layer}" for site, layer in needed)]
            rows_per_piece = max(1, int(piece_mb * 2**20 // (12 * max(1, layout.width))))  # float32 read + float64
            seen = set()
            for number, piece in collection.pieces(names, rows_per_piece):
                dest = piece.pop("dest").astype(np.int64)  # [row] index on the concatenated token axis
                chosen = None if keep is None else keep[dest]
                data = {}
                for key in needed:
                    x = piece.pop(f"{key[0]}.{key[1]}")
                    data[key] = x if chosen is None else x[chosen]
                    del x
                dest = dest if chosen is None else dest[chosen]
                moments.update(data, within[dest], dest, layout, first)
                del piece, data
                if number not in seen:
                    seen.add(number)
                    bar.update()
            bar.update(len(collection._shards) - len(seen))  # shards without rows
            layout.release()
            del layout
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
