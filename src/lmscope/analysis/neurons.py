"""Neuron activations and their factorization into a few interpretable factors (NMF, PCA, ICA).

Alammar (2021), "Ecco: an open source library for the explainability of Transformer language
models", §3.3: activations of the FFN neurons of one or several layers form a matrix
``X [pos, layer·neuron]``; non-negative matrix factorization ``X ≈ W·H`` with ``W, H ≥ 0``
(Lee & Seung 1999) gives ``W [pos, factor]``, each factor's strength at every token, and
``H [factor, layer·neuron]``, the neurons each factor draws on. Factors tend to pick out
token types, positions, or linguistic features across a text or a corpus.

Non-negativity: NMF needs ``X ≥ 0``, but GELU and SiLU (and the gated products of Llama-style
MLPs, and residual states) take negative values. ``nonneg`` says what happens, explicitly:

``"clip"`` (default)  ``max(X, 0)``: keeps the firing part of every neuron (GELU/SiLU minima are
                      small, about -0.17 and -0.28) and its sparsity; negative values are lost, and the
                      share of entries that were negative is reported as ``negative_fraction``.
``"shift"``           ``X - min(X)`` per feature: loses nothing, but every neuron gets a baseline and
                      factors describe deviations from each neuron's minimum.
``"error"``           refuse any negative entry.

PCA (centered, via SVD) and FastICA (Hyvärinen & Oja 2000) are signed alternatives from
scikit-learn; their factor signs are fixed so that each factor's largest-magnitude value is positive.
All methods run with a fixed ``seed``, and report the reconstruction error ``‖X − X̂‖_F`` and
its relative size ``‖X − X̂‖_F / ‖X‖_F`` (``X`` after the non-negativity step).

Positions: ``positions=`` (within each text) or ``skip_first=True`` factorize only those tokens.
The first token of many causal LMs carries activations far larger than any other (an attention
sink), so without it one factor often just marks that token; results record the position with the
largest share of the squared norm (``dominance``; of ``X`` for NMF, of the centered ``X`` for
PCA/ICA) and the views say when one position holds more than half of it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.analysis._positions import Dominance, dominance, found, select_rows, within_text
from lmscope.analysis._result import Result
from lmscope.capture import Trace
from lmscope.errors import LmscopeError

__all__ = ["Activations", "Factors", "activations", "factorize"]

ACTIVATION_SITES = ("mlp_act", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
METHODS = ("nmf", "pca", "ica")
NONNEG = ("clip", "shift", "error")


@dataclass(frozen=True)
class Activations(Result):
    """Activations ``values [layer, neuron, pos]`` of one site (Ecco's ``activations`` layout) with the tokens."""

    _view = "lmscope.views.nmf"

    site: str
    layers: tuple[int, ...]
    values: np.ndarray  # [layer, neuron, pos]
    tokens: tuple[str, ...]
    positions: tuple[int, ...] = ()  # the trace positions of the pos axis (empty: all of them)
    dominance: Dominance | None = None  # the position with the largest share of Σ values²

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib ``Figure``: the top neurons' activations over the tokens."""
        return self._view_module().plot(self, **kwargs)

    def top_neurons(self, k: int = 8) -> list[tuple[int, int, float]]:
        """The ``k`` (layer, neuron, peak activation) triples with the highest activation anywhere."""
        peak = self.values.max(axis=-1)  # [layer, neuron]
        order = np.argsort(peak, axis=None)[::-1][:k]
        rows, cols = np.unravel_index(order, peak.shape)
        return [(self.layers[r], int(c), float(peak[r, c])) for r, c in zip(rows, cols, strict=True)]


@dataclass(frozen=True)
class Factors(Result):
    """A factorization ``X [pos, layer·neuron] ≈ components.T · loadings`` of activations.

    ``components [factor, pos]``: each factor's strength at every token (texts concatenated,
    ``offsets`` marks where each starts). ``loadings [factor, layer·neuron]``: feature ``j`` is
    neuron ``j % n_neurons`` of ``layers[j // n_neurons]``.
    """

    _view = "lmscope.views.nmf"

    method: str
    site: str
    layers: tuple[int, ...]
    n_neurons: int
    components: np.ndarray  # [factor, pos]
    loadings: np.ndarray  # [factor, layer·neuron]
    tokens: tuple[str, ...]
    offsets: tuple[int, ...]
    reconstruction_error: float
    relative_error: float
    nonneg: str | None
    negative_fraction: float
    seed: int
    n_iter: int
    selection: str = "all positions"
    dominance: Dominance | None = None

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib ``Figure``: every factor's strength over the tokens of the first text."""
        return self._view_module().plot(self, **kwargs)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def neurons(self, factor: int, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` (layer, neuron, loading) triples factor ``factor`` draws on most."""
        row = self.loadings[factor]
        order = np.argsort(row)[::-1][:k]
        return [(self.layers[j // self.n_neurons], int(j % self.n_neurons), float(row[j])) for j in order]

    def top_tokens(self, k: int = 8) -> list[list[tuple[int, str, float]]]:
        """Per factor, the ``k`` (pos, token, strength) with the highest strength across all texts."""
        out = []
        for row in self.components:
            order = np.argsort(row, kind="stable")[::-1][:k]
            out.append([(int(p), self.tokens[p], float(row[p])) for p in order])
        return out

    def explore(self) -> None:
        """Show the factor explorer (notebooks), or print the text twin."""
        self.show()


def activations(
    trace: Trace, layers: Any = None, site: str = "mlp_act", *, positions: Any = None, skip_first: bool = False
) -> Activations:
    """``[layer, neuron, pos]`` activations of ``site`` for the chosen captured layers.

    ``positions`` (ints or a slice) or ``skip_first=True`` keep only those tokens.
    """
    chosen = _layers_of(trace, layers)
    index = [trace.layer_index(layer) for layer in chosen]
    values = trace.get(_site(site))[index].float().cpu().numpy()  # [layer, pos, neuron]
    rows, _ = select_rows([trace.n_pos], positions, skip_first)
    kept = tuple(range(trace.n_pos)) if rows is None else tuple(rows.tolist())
    values = values[:, list(kept)]
    per_pos = values.transpose(1, 0, 2).reshape(len(kept), -1)  # [pos, layer·neuron]
    where = f"{site} (all {len(chosen)} layers, raw activations)"
    origin = np.asarray(kept, dtype=np.int64)
    strongest = found(dominance(per_pos, False, origin), origin, trace.tokens, [trace.n_pos], where)
    return Activations(
        site=site,
        layers=chosen,
        values=values.transpose(0, 2, 1),
        tokens=tuple(trace.tokens[p] for p in kept),
        positions=() if rows is None else kept,
        dominance=strongest,
    )


def factorize(
    source: Any,
    n_components: int = 8,
    from_layer: int | None = None,
    to_layer: int | None = None,
    *,
    method: str = "nmf",
    site: str = "mlp_act",
    nonneg: str = "clip",
    seed: int = 0,
    max_iter: int = 500,
    positions: Any = None,
    skip_first: bool = False,
) -> Factors:
    """Factorize activations of layers ``from_layer:to_layer`` (Python slice: ``to_layer`` excluded).

    Without either bound, every captured layer is used.

    ``source`` is a :class:`Trace` (one text) or a :class:`~lmscope.analysis.collect.Collection`
    (a corpus; its texts are concatenated on the ``pos`` axis). ``positions`` (ints or a slice,
    within each text) or ``skip_first=True`` factorize only those tokens (e.g. without the
    attention sink on the first token).
    """
    if method not in METHODS:
        raise LmscopeError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if nonneg not in NONNEG:
        raise LmscopeError(f"nonneg must be one of {', '.join(NONNEG)}, not {nonneg!r}")
    site = _site(site)
    layers, matrix, tokens, offsets = _matrix(source, site, from_layer, to_layer)  # [pos, layer·neuron]
    lengths = np.diff([*offsets, len(tokens)]).tolist()
    rows, selection = select_rows(lengths, positions, skip_first)
    origin = np.arange(len(tokens)) if rows is None else rows  # [pos]: index among every text's tokens
    groups = within_text(lengths)[origin]  # [pos]: each row's position within its text
    every = tokens
    if rows is not None:
        matrix = matrix[rows]
        tokens = tuple(tokens[r] for r in rows.tolist())
        offsets = tuple(int(i) for i in np.flatnonzero(np.r_[True, np.diff(groups) <= 0]))  # a new text starts
    n_pos, n_features = matrix.shape
    if not 1 <= n_components <= min(n_pos, n_features):
        raise LmscopeError(
            f"n_components must lie in 1..{min(n_pos, n_features)} for {n_pos} tokens × {n_features} features, "
            f"not {n_components}"
        )
    negative = float((matrix < 0).mean())
    if method == "nmf":
        matrix = _nonnegative(matrix, nonneg)
    measured = "X after clipping negatives" if nonneg == "clip" else "X after shifting" if nonneg == "shift" else "X"
    where = f"{site}, {'the centered X' if method != 'nmf' else measured}"
    strongest = found(dominance(matrix, method != "nmf", groups), origin, every, lengths, where)
    components, loadings, rebuilt, n_iter = _fit(method, matrix, n_components, seed, max_iter)
    if method != "nmf":
        flip = np.sign(components[np.arange(n_components), np.abs(components).argmax(1)])
        flip[flip == 0] = 1
        components, loadings = components * flip[:, None], loadings * flip[:, None]
    error = float(np.linalg.norm(matrix - rebuilt))
    norm = float(np.linalg.norm(matrix))
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
        negative_fraction=negative,
        seed=seed,
        n_iter=n_iter,
        selection=selection,
        dominance=strongest,
    )


def _site(site: str) -> str:
    if site not in ACTIVATION_SITES:
        raise LmscopeError(f"site must be one of {', '.join(ACTIVATION_SITES)}, not {site!r}")
    return site


def _layers_of(trace: Trace, layers: Any) -> tuple[int, ...]:
    if layers is None:
        return trace.layers
    if isinstance(layers, slice):
        return tuple(range(trace.model.n_layers)[layers])
    if isinstance(layers, int):
        layers = [layers]
    return tuple(trace.layers[trace.layer_index(layer)] for layer in layers)


def _matrix(source: Any, site: str, start: int | None, stop: int | None) -> tuple[Any, np.ndarray, Any, Any]:
    """``(layers, X [pos, layer·neuron] float64, tokens, offsets)`` for a Trace or a Collection."""
    if start is None and stop is None:
        wanted = tuple(source.layers)  # every captured layer
    else:
        wanted = tuple(range(source.model.n_layers)[slice(start, stop)])
    if not wanted:
        raise LmscopeError(f"from_layer={start}, to_layer={stop} selects no layers (to_layer is excluded)")
    have = source.layers
    missing = [layer for layer in wanted if layer not in have]
    if missing:
        raise LmscopeError(f"layers {missing} were not captured (captured: {list(have)}): capture them or narrow")
    if isinstance(source, Trace):
        data = source.get(site)  # [layer, pos, neuron]
        parts = [data[source.layer_index(layer)].float().cpu().numpy() for layer in wanted]
        tokens, offsets = source.tokens, (0,)
    else:
        parts = [source.get(site, layer) for layer in wanted]  # [pos, neuron] each
        tokens, offsets = tuple(source.all_tokens), tuple(source.offsets)
    return wanted, np.concatenate(parts, axis=1).astype(np.float64), tokens, offsets


def _nonnegative(matrix: np.ndarray, nonneg: str) -> np.ndarray:
    if nonneg == "clip":
        return np.maximum(matrix, 0.0)
    if nonneg == "shift":
        return matrix - matrix.min(axis=0, keepdims=True)
    if (matrix < 0).any():
        raise LmscopeError(
            f"{(matrix < 0).mean():.1%} of the activations are negative and nonneg='error': "
            "use nonneg='clip' or 'shift', or method='pca'/'ica'"
        )
    return matrix


def _fit(method: str, matrix: np.ndarray, k: int, seed: int, max_iter: int) -> tuple[Any, Any, Any, int]:
    """``(components [factor, pos], loadings [factor, feature], X̂ [pos, feature], iterations)``."""
    try:
        from sklearn.decomposition import NMF, PCA, FastICA
        from sklearn.exceptions import ConvergenceWarning
    except ImportError as error:
        raise LmscopeError("factorization needs scikit-learn: pip install 'lmscope[analysis]'") from error
    with warnings.catch_warnings():
        # Convergence is reported through n_iter (== max_iter when it stopped early).
        warnings.simplefilter("ignore", ConvergenceWarning)
        if method == "nmf":
            model = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=max_iter, tol=1e-5)
            weights = model.fit_transform(matrix)  # [pos, factor]
            return weights.T, model.components_, weights @ model.components_, int(model.n_iter_)
        if method == "pca":
            model = PCA(n_components=k, random_state=seed, svd_solver="full")
            scores = model.fit_transform(matrix)  # [pos, factor]
            return scores.T, model.components_, model.inverse_transform(scores), 1
        model = FastICA(n_components=k, random_state=seed, max_iter=max_iter, whiten="unit-variance")
        sources = model.fit_transform(matrix)  # [pos, factor]
        return sources.T, model.mixing_.T, model.inverse_transform(sources), int(model.n_iter_)
