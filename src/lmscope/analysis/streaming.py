"""Corpus analyses that stream: similarity, layer similarity and PCA/NMF over a collection of any size.

A :class:`~lmscope.analysis.collect.Collection` on disk can be far larger than memory. The analyses
here read it one shard at a time (:meth:`Collection.shards`) and keep only statistics, so memory is
one shard plus the statistics whatever the number of tokens:

- **Linear CKA** (Kornblith et al. 2019) in its feature-space form,
  ``CKA = ‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)``, from accumulated cross- and auto-products
  centered at the end, ``X_cᵀ Y_c = Σ(x−c)(y−c')ᵀ − n·m̃_x m̃_yᵀ`` (float64, around a fixed shift:
  :mod:`lmscope.analysis._moments`).
- **CCA** (Hotelling 1936) from the same matrices. With ``X_cᵀX_c = V S² Vᵀ`` (an eigendecomposition),
  the orthonormal basis of the in-memory version is ``Q_x = X_c W_x`` with ``W_x = V diag(1/√(s² + λ))``
  (``λ`` the ridge of ``epsilon``, 0 by default), so ``Q_xᵀ Q_y = W_xᵀ (X_cᵀ Y_c) W_y`` needs no
  activations; its singular values are the canonical correlations. Directions dropped for rank
  follow the in-memory tolerance ``s_max · eps(dtype) · ½√(tokens + features + 1)``.
- **SVCCA** (Raghu et al. 2017): the top ``dims`` singular directions (or enough for ``variance`` of
  ``Σ s²``; default 0.99, as in memory) are the top eigenvectors ``V_k`` of ``X_cᵀX_c``; the reduced
  input ``X_c V_k`` has the auto-product ``V_kᵀ (X_cᵀX_c) V_k`` and cross-products ``V_kᵀ (X_cᵀ Y_c)``,
  and CCA of the reduced inputs proceeds as above.
- **PWCCA** (Morcos et al. 2018): ``Σ α_i ρ_i / Σ α_i`` with ``α_i = Σ_j |⟨h_i, x_j⟩|``, ``h_i`` the
  i-th canonical variate of ``x`` and ``x_j`` its j-th (centered) neuron. With ``h = Q_x u_i = X_c W_x u_i``
  (``u`` the left singular vectors of ``Q_xᵀ Q_y``), ``⟨h_i, x_j⟩ = (u_iᵀ W_xᵀ (X_cᵀ X_c))_j``:
  ``α = |uᵀ W_xᵀ Σ_xx|·1`` (``Σ_xx = X_cᵀX_c``), exactly the in-memory weights.

These equal :mod:`lmscope.analysis.similarity` on the same data (to rounding: the eigendecomposition
of ``X_cᵀX_c`` is less accurate than the SVD of ``X_c`` for directions whose singular values are
below ``1e-6`` of the largest). Debiased CKA and the RBF kernel need the ``tokens × tokens`` Gram
matrix and do not stream.

- **PCA** is exact: the top eigenvectors of the accumulated covariance, then a second pass for
  each token's scores and the reconstruction error (the same factors as the in-memory PCA).
- **NMF** trains scikit-learn's ``MiniBatchNMF`` (Serizel et al. 2016) on mini-batches read shard by
  shard (``epochs`` passes), then a last pass computes each token's factor strengths: an
  approximation of the in-memory NMF, not equal to it.

``layer_similarity`` accumulates every layer's auto-product and every pair's cross-product in one
pass over the shards when they fit in ``memory_mb``, else in as few passes as fit: the first holds
the auto-products and some pairs, each later one other pairs, and each pass's matrix entries are
computed and its cross-products let go before the next. ``memory_mb`` bounds everything the
statistics hold at once: the auto-products (which CKA keeps as the Gram matrices, centered in
place, not copied), the per-position sums, each CCA-type input's decompositions, and one pass's
cross-products. Beside them, memory holds one piece of a shard (:mod:`lmscope.analysis._moments`).
SmolLM2-135M's 30 layers of 576 features need 1.15 GiB for every pair at once; over UD English EWT
(texts up to 347 tokens: 91 MiB of per-position sums) the default ``memory_mb=512`` makes four
passes (``benchmarks/bench_streaming.py`` has the measured memory and time). The cost is the
products, about ``tokens × (layers · features)² / 2`` multiply-adds (the upper triangle), whatever
the passes: float64 BLAS products in strips of up to ``features × layers · features``.

Every function takes ``threads=``: numpy's BLAS threads during the call (``None``: unchanged). On a
machine busy with other work one thread can be far faster than several that spin-wait (2 cores under
load: 0.7 ms against 82 ms for a ``48 × 1800 × 48`` product).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmscope.analysis._moments import Moments, accumulate, blas_threads
from lmscope.analysis.similarity import MEASURES
from lmscope.errors import LmscopeError

__all__ = ["Side", "compare", "factorize", "layer_similarity", "similarity"]

_EPS32 = float(np.finfo(np.float32).eps)  # collections store float32


class Side:
    """One input known through its centered auto-product ``gram = X_cᵀX_c [features, features]``.

    ``project [features, k]`` (default: none) makes it the input ``X_c·project`` (SVCCA's reduction);
    the eigendecomposition is computed once and cached, like :class:`lmscope.analysis.similarity.Prepared`.
    """

    def __init__(self, gram: np.ndarray, n: int, eps: float = _EPS32, project: np.ndarray | None = None):
        self.gram, self.n, self.eps, self.project = gram, int(n), float(eps), project
        self._cache: dict[Any, Any] = {}

    @property
    def n_features(self) -> int:
        return int(self.gram.shape[0])

    def _eigen(self) -> tuple[np.ndarray, np.ndarray]:  # (s [k] descending, v [features, k])
        if "eigen" not in self._cache:
            values, vectors = np.linalg.eigh(self.gram)
            order = np.argsort(values)[::-1]
            self._cache["eigen"] = (np.sqrt(np.clip(values[order], 0.0, None)), vectors[:, order])
        return self._cache["eigen"]

    def whitening(self, epsilon: float) -> np.ndarray:
        """``W [features, rank]`` with ``X_c W`` the in-memory basis ``Q`` (orthonormal when ``epsilon`` is 0)."""
        key = ("whitening", epsilon)
        if key not in self._cache:
            s, v = self._eigen()
            tol = s[0] * self.eps * 0.5 * np.sqrt(self.n + self.n_features + 1) if s.size else 0.0
            keep = s > tol if s.size and s[0] > 0 else np.zeros(0, bool)
            s, v = s[keep], v[:, keep]
            ridge = epsilon * float((s**2).sum()) / self.n_features if epsilon > 0 else 0.0
            self._cache[key] = v / np.sqrt(s**2 + ridge)
        return self._cache[key]

    def reduced(self, dims: int | None, variance: float) -> Side:
        """The input on its top ``dims`` singular directions (or enough for ``variance``), as in SVCCA."""
        key = ("reduced", dims, variance)
        if key not in self._cache:
            s, v = self._eigen()
            k = dims
            if k is None:
                share = np.cumsum(s**2) / max(float((s**2).sum()), np.finfo(np.float64).tiny)
                k = int(np.searchsorted(share, variance) + 1)
            if not 1 <= k <= min(s.size, self.n):
                raise LmscopeError(
                    f"svcca: dims must lie in 1..{min(s.size, self.n)} for an input of shape "
                    f"({self.n}, {self.n_features}), not {k}"
                )
            vk = v[:, :k]  # [features, dims]
            side = Side(vk.T @ self.gram @ vk, self.n, self.eps, vk if self.project is None else self.project @ vk)
            side._cache[key] = side
            self._cache[key] = side
        return self._cache[key]


def _cross(moments: Moments, a: Any, b: Any, side_a: Side, side_b: Side) -> np.ndarray:
    cross = moments.centered(a, b)  # [features_a, features_b]
    pa, pb = side_a.project, side_b.project
    return (cross if pa is None else pa.T @ cross) if pb is None else (cross if pa is None else pa.T @ cross) @ pb


def _check(n: int, fa: int, fb: int, what: str) -> None:
    if n - 1 < fa + fb:
        raise LmscopeError(
            f"{what} needs more tokens than features of both inputs together ({n} tokens, {fa} + {fb} features): "
            "some canonical correlations would be 1 whatever the data. Use more tokens, reduce with "
            "svcca(dims=...), or pass epsilon=1e-3 for regularized CCA"
        )


def compare(moments: Moments, a: Any, b: Any, method: str = "cka", *, sides: dict[Any, Side] | None = None,
            **options: Any) -> float:  # fmt: skip
    """``method`` of inputs ``a`` and ``b`` (keys of ``moments``) from accumulated statistics.

    ``sides`` caches each input's decomposition across calls (layer similarity passes one dict).
    """
    if method not in MEASURES:
        raise LmscopeError(f"unknown similarity {method!r}: choose from {', '.join(MEASURES)}")
    n = moments.n
    if n < 3:
        raise LmscopeError(f"{method} needs at least 3 tokens, got {n}")
    sides = {} if sides is None else sides
    for key in (a, b):
        if key not in sides:
            sides[key] = Side(moments.centered(key, key), n)
    if method == "cka":
        if options.get("kernel", "linear") != "linear" or options.get("debiased"):
            raise LmscopeError("streaming CKA is linear and not debiased: use lmscope.analysis.cka on loaded arrays")
        fa, fb = sides[a].n_features, sides[b].n_features
        if n < max(fa, fb):
            raise LmscopeError(
                f"cka: {n} tokens but {max(fa, fb)} features: CKA is biased toward 1 when features outnumber "
                "tokens. Use more tokens, or debiased CKA on loaded arrays (lmscope.analysis.cka(debiased=True))"
            )
        cross = float(np.linalg.norm(moments.centered(a, b)) ** 2)
        denom = _norm(sides[a]) * _norm(sides[b])
        return cross / denom if denom > 0 else 0.0
    epsilon = float(options.get("epsilon", 0.0))
    side_a, side_b = sides[a], sides[b]
    if method == "svcca":
        dims, variance = options.get("dims"), float(options.get("variance", 0.99))
        side_a, side_b = side_a.reduced(dims, variance), side_b.reduced(dims, variance)
    if epsilon <= 0:
        _check(n, side_a.n_features, side_b.n_features, method)
    wa, wb = side_a.whitening(epsilon), side_b.whitening(epsilon)
    if wa.shape[1] == 0 or wb.shape[1] == 0:
        raise LmscopeError("CCA: an input is constant (every feature has zero variance)")
    u, rho, _ = np.linalg.svd(wa.T @ _cross(moments, a, b, side_a, side_b) @ wb, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    if method != "pwcca":
        return float(rho.mean())
    weights = np.abs(u.T @ (wa.T @ side_a.gram)).sum(axis=1)  # α_i = Σ_j |⟨h_i, x_j⟩|
    return float((weights * rho).sum() / weights.sum())


def _norm(side: Side) -> float:
    if "norm" not in side._cache:
        side._cache["norm"] = float(np.linalg.norm(side.gram))
    return side._cache["norm"]


def _threads(function: Any) -> Any:
    """``function`` run with numpy's BLAS threads capped at its ``threads=`` argument (if given)."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        with blas_threads(kwargs.get("threads")):
            return function(*args, **kwargs)

    return run


def _key(collection: Any, spec: Any) -> tuple[str, int]:
    site, layer = spec
    if site not in collection.sites:
        raise LmscopeError(f"this collection has sites {', '.join(collection.sites)}, not {site!r}: collect it again")
    layer = int(layer) + (collection.model.n_layers if int(layer) < 0 else 0)  # as Collection.get reads it
    if layer not in collection.layers:
        raise LmscopeError(f"layer {layer} was not collected (collected layers: {list(collection.layers)})")
    return site, layer


@_threads
def similarity(
    collection: Any,
    a: tuple[str, int],
    b: tuple[str, int],
    method: str = "cka",
    *,
    positions: Any = None,
    skip_first: bool = False,
    memory_mb: float = 512.0,
    progress: bool = False,
    threads: int | None = None,
    **options: Any,
) -> float:
    """``method`` (``cka``, ``cca``, ``svcca``, ``pwcca``) between ``a = (site, layer)`` and ``b`` over a
    collection, in one pass over its shards. Equals ``lmscope.analysis.<method>(col.get(*a), col.get(*b))``."""
    ka, kb = _key(collection, a), _key(collection, b)
    keys = [ka] if ka == kb else [ka, kb]
    blocks = [(k, k) for k in keys] + ([(ka, kb)] if ka != kb else [])
    moments, _ = accumulate(
        collection,
        keys,
        blocks,
        positions=positions,
        skip_first=skip_first,
        memory_mb=memory_mb,
        reserve_mb=_reserve_mb(collection, keys, method),
        progress=progress,
    )
    return compare(moments, ka, kb, method, **options)


def _reserve_mb(collection: Any, keys: Sequence[Any], method: str) -> float:
    """MiB the inputs' decompositions keep beside the statistics: none for CKA (it keeps the auto-products'
    norms), an eigenbasis and a whitening per input for CCA and PWCCA, and those of the reduced input for SVCCA."""
    copies = {"cka": 0, "cca": 2, "pwcca": 2, "svcca": 4}.get(method, 0)
    return sum(8.0 * copies * collection.features[site] ** 2 for site, _ in keys) / 2**20


@_threads
def layer_similarity(
    collection: Any,
    method: str = "cka",
    site_a: str = "resid_post",
    site_b: str = "mlp_act",
    layers: Any = None,
    *,
    positions: Any = None,
    skip_first: bool = False,
    memory_mb: float = 512.0,
    progress: bool = False,
    threads: int | None = None,
    **options: Any,
) -> Any:
    """:func:`lmscope.analysis.layer_similarity` over a collection, streamed: every layer's auto-product and
    every pair's cross-product accumulated in one pass over the shards (more when they exceed ``memory_mb``).

    Returns the same :class:`~lmscope.analysis.layer_similarity.LayerSimilarity` as the in-memory version.
    """
    from lmscope.analysis.layer_similarity import LayerSimilarity, _dominance, chosen_layers

    if method not in MEASURES:
        raise LmscopeError(f"unknown similarity {method!r}: choose from {', '.join(MEASURES)}")
    chosen = chosen_layers(collection, layers)
    keys_a = [_key(collection, (site_a, layer)) for layer in chosen]
    keys_b = keys_a if site_b == site_a else [_key(collection, (site_b, layer)) for layer in chosen]
    keys = keys_a if site_b == site_a else [*keys_a, *keys_b]
    blocks = _blocks(keys_a, keys_b)
    if method == "cka":
        options = {**options, "debiased": False}
    index_a, index_b = {k: i for i, k in enumerate(keys_a)}, {k: j for j, k in enumerate(keys_b)}
    sides: dict[Any, Side] = {}
    matrix = np.full((len(chosen), len(chosen)), np.nan)  # [layer_a, layer_b]

    def measure(moments: Moments, group: list[Any]) -> None:
        """The matrix entries this pass's blocks give; then its cross-products are let go."""
        for a, b in group:
            for x, y in ((a, b), (b, a)):
                if x in index_a and y in index_b:
                    matrix[index_a[x], index_b[y]] = compare(moments, x, y, method, sides=sides, **options)
        for a, b in group:
            if a != b:
                del moments.blocks[a, b]

    moments, selection = accumulate(
        collection,
        keys,
        blocks,
        positions=positions,
        skip_first=skip_first,
        memory_mb=memory_mb,
        reserve_mb=_reserve_mb(collection, keys, method),
        progress=progress,
        after_pass=measure,
    )
    lengths = [len(ids) for ids in collection.token_ids]
    tokens = collection.all_tokens
    origin = np.arange(collection.n_tokens)
    found_a = _dominance([moments.dominance(k) for k in keys_a], origin, tokens, lengths, site_a, chosen)
    dominance = (found_a,)
    if site_b != site_a:
        dominance += (_dominance([moments.dominance(k) for k in keys_b], origin, tokens, lengths, site_b, chosen),)
    return LayerSimilarity(
        method=method,
        options=options,
        site_a=site_a,
        site_b=site_b,
        layers_a=chosen,
        layers_b=chosen,
        matrix=matrix,
        n_tokens=moments.n,
        selection=selection,
        dominance=dominance,
    )


def _blocks(keys_a: Sequence[Any], keys_b: Sequence[Any]) -> list[tuple[Any, Any]]:
    """Every auto-product (first: they are kept to the end), then every (a, b) cross-product, each once."""
    out: list[tuple[Any, Any]] = []
    seen: set[tuple[Any, Any]] = set()
    for a, b in [(k, k) for k in dict.fromkeys([*keys_a, *keys_b])] + [(a, b) for a in keys_a for b in keys_b]:
        for pair in ((a, b),):
            if pair not in seen and pair[::-1] not in seen:
                seen.add(pair)
                out.append(pair)
    return out


@_threads
def factorize(
    collection: Any,
    n_components: int = 8,
    from_layer: int | None = None,
    to_layer: int | None = None,
    *,
    method: str = "pca",
    site: str = "mlp_act",
    nonneg: str = "clip",
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 1024,
    positions: Any = None,
    skip_first: bool = False,
    memory_mb: float = 512.0,
    threads: int | None = None,
) -> Any:
    """:func:`lmscope.analysis.factorize` of a collection, streamed (``method`` ``"pca"`` or ``"nmf"``).

    PCA is exact (the in-memory factors): the covariance of the ``[token, layer·neuron]`` matrix is
    accumulated in one pass, its top eigenvectors are the loadings, and a second pass computes each
    token's scores, the reconstruction error and the dominant position. NMF is trained in
    mini-batches of ``batch_size`` rows read shard by shard (scikit-learn's ``MiniBatchNMF``,
    ``epochs`` passes), then a last pass computes the factor strengths: an approximation of the
    in-memory NMF. ``nonneg="clip"`` or ``"error"`` (``"shift"`` needs the minima first: one more pass).
    """
    from lmscope.analysis._positions import found, select_rows, within_text
    from lmscope.analysis.neurons import NONNEG, Factors, _nonnegative, _site

    if method not in ("pca", "nmf"):
        raise LmscopeError(f"streaming factorization is 'pca' (exact) or 'nmf' (mini-batches), not {method!r}")
    if nonneg not in NONNEG:
        raise LmscopeError(f"nonneg must be one of {', '.join(NONNEG)}, not {nonneg!r}")
    site = _site(site)
    if site not in collection.sites:
        raise LmscopeError(f"this collection has sites {', '.join(collection.sites)}, not {site!r}: collect it again")
    layers = _layer_range(collection, from_layer, to_layer)
    keys = [(site, layer) for layer in layers]
    lengths = [len(ids) for ids in collection.token_ids]
    rows, selection = select_rows(lengths, positions, skip_first)
    n_rows = collection.n_tokens if rows is None else len(rows)
    rank = np.arange(collection.n_tokens) if rows is None else np.full(collection.n_tokens, -1)
    if rows is not None:
        rank[rows] = np.arange(len(rows))  # [token] its column among the factorized tokens
    n_features = sum(collection.features[site] for _ in layers)
    if not 1 <= n_components <= min(n_rows, n_features):
        raise LmscopeError(
            f"n_components must lie in 1..{min(n_rows, n_features)} for {n_rows} tokens × {n_features} features, "
            f"not {n_components}"
        )

    def chunks() -> Any:  # ([row, layer·neuron] float64, [row] column) per shard
        names = ["dest", *(f"{s}.{layer}" for s, layer in keys)]
        for shard in collection.shards(names):
            cols = rank[shard["dest"].astype(np.int64)]
            kept = cols >= 0
            x = np.concatenate([shard[f"{s}.{layer}"][kept] for s, layer in keys], axis=1)  # [row, layer·neuron]
            yield x.astype(np.float64), cols[kept]

    negative = 0.0
    shift = None
    if method == "pca":
        blocks = [(a, b) for i, a in enumerate(keys) for b in keys[i:]]
        moments, _ = accumulate(
            collection, keys, blocks, positions=positions, skip_first=skip_first, memory_mb=memory_mb
        )
        cov = np.block([[moments.centered(a, b) for b in keys] for a in keys])  # [feature, feature]
        mean = np.concatenate([moments.mean(k) for k in keys])
        values, vectors = np.linalg.eigh(cov)
        loadings = vectors[:, np.argsort(values)[::-1][:n_components]].T  # [factor, feature]
        n_iter = 1
    else:
        from sklearn.decomposition import MiniBatchNMF

        if nonneg == "shift":
            shift = np.min([x.min(axis=0) for x, _ in chunks()], axis=0)  # [feature] every feature's minimum
        model = MiniBatchNMF(n_components=n_components, init="nndsvda", random_state=seed, batch_size=batch_size)
        for _ in range(epochs):
            for x, _ in chunks():
                x = x - shift if shift is not None else _nonnegative(x, nonneg)
                for start in range(0, len(x), batch_size):
                    model.partial_fit(x[start : start + batch_size])
        loadings, mean, n_iter = model.components_, None, int(model.n_steps_)
    components = np.zeros((n_components, n_rows))  # [factor, pos]
    energy = np.zeros(n_rows)  # [pos] squared norm of the factorized row (centered for PCA)
    error = norm = 0.0
    for x, cols in chunks():
        negative += float((x < 0).sum())
        if method == "pca":
            x_used = x - mean  # PCA describes the centered rows
            scores = x_used @ loadings.T  # [row, factor]
        else:
            x = x - shift if shift is not None else _nonnegative(x, nonneg)
            x_used, scores = x, model.transform(x)
        energy[cols] = np.einsum("ij,ij->i", x_used, x_used)
        components[:, cols] = scores.T
        error += float(((x_used - scores @ loadings) ** 2).sum())  # X − X̂ (PCA: X̂ = scores·loadings + mean)
        norm += float((x**2).sum())
    if method == "pca":
        flip = np.sign(components[np.arange(n_components), np.abs(components).argmax(1)])
        flip[flip == 0] = 1
        components, loadings = components * flip[:, None], loadings * flip[:, None]
    tokens = tuple(collection.all_tokens)
    origin = np.arange(collection.n_tokens) if rows is None else rows
    groups = within_text(lengths)[origin]
    offsets = tuple(collection.offsets)
    every = tokens
    if rows is not None:
        tokens = tuple(tokens[r] for r in rows.tolist())
        offsets = tuple(int(i) for i in np.flatnonzero(np.r_[True, np.diff(groups) <= 0]))
    measured = "X after clipping negatives" if nonneg == "clip" else "X after shifting" if nonneg == "shift" else "X"
    where = f"{site}, {'the centered X' if method != 'nmf' else measured}"
    strongest = found(_energy_dominance(energy, groups), origin, every, lengths, where)
    error = float(np.sqrt(error))
    norm = float(np.sqrt(norm))
    return Factors(
        method=method,
        site=site,
        layers=layers,
        n_neurons=n_features // len(layers),
        components=components.astype(np.float32),
        loadings=loadings.astype(np.float32),
        tokens=tokens,
        offsets=offsets,
        reconstruction_error=error,
        relative_error=error / norm if norm > 0 else 0.0,
        nonneg=nonneg if method == "nmf" else None,
        negative_fraction=negative / (n_rows * n_features),
        seed=seed,
        n_iter=n_iter,
        selection=selection,
        dominance=strongest,
    )


def _layer_range(collection: Any, start: int | None, stop: int | None) -> tuple[int, ...]:
    """Layers ``start:stop`` (every collected layer without bounds), as ``lmscope.analysis.factorize`` chooses."""
    wanted = (
        tuple(collection.layers)
        if start is None and stop is None
        else tuple(range(collection.model.n_layers)[slice(start, stop)])
    )
    if not wanted:
        raise LmscopeError(f"from_layer={start}, to_layer={stop} selects no layers (to_layer is excluded)")
    missing = [layer for layer in wanted if layer not in collection.layers]
    if missing:
        raise LmscopeError(
            f"layers {missing} were not captured (captured: {list(collection.layers)}): capture them or narrow"
        )
    return wanted


def _energy_dominance(energy: np.ndarray, groups: np.ndarray) -> tuple[int, float, int | None]:
    """:func:`lmscope.analysis._positions.dominance` from each row's squared norm ``energy [row]``."""
    total = float(energy.sum())
    if total <= 0 or not len(energy):
        return 0, 0.0, None
    grouped = np.bincount(groups, weights=energy)  # [position within text]
    top = int(grouped.argmax())
    members = np.flatnonzero(groups == top)
    row = int(members[energy[members].argmax()])
    if energy[row] >= 0.9 * grouped[top]:
        return top, float(energy[row] / total), row
    return top, float(grouped[top] / total), None
