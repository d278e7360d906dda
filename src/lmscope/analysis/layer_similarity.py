"""Similarity of every pair of layers: how one site's representations relate to another's across depth.

Ecco (Alammar 2021, Figure 6) compares the hidden states and FFN activations of every layer
pair over the same tokens. :func:`layer_similarity` does this for any two sites of a Trace or a
corpus :class:`~lmscope.analysis.collect.Collection` with any of the measures in
:mod:`lmscope.analysis.similarity`; the result renders as a heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.analysis._result import Result
from lmscope.analysis.similarity import cca, cka, pwcca, svcca
from lmscope.capture import Trace
from lmscope.errors import LmscopeError

__all__ = ["LayerSimilarity", "layer_similarity"]

MEASURES = {"cka": cka, "cca": cca, "svcca": svcca, "pwcca": pwcca}


@dataclass(frozen=True)
class LayerSimilarity(Result):
    """``matrix[i, j]``: similarity of ``site_a`` at ``layers_a[i]`` and ``site_b`` at ``layers_b[j]``."""

    _view = "lmscope.views.similarity"

    method: str
    options: dict[str, Any]
    site_a: str
    site_b: str
    layers_a: tuple[int, ...]
    layers_b: tuple[int, ...]
    matrix: np.ndarray  # [layer_a, layer_b]
    n_tokens: int


def _reader(source: Any, site: str) -> Any:
    if isinstance(source, Trace):
        return lambda layer: source.at(site, layer).float().cpu().numpy().reshape(source.n_pos, -1)
    if site not in source.sites:
        raise LmscopeError(f"this collection has sites {', '.join(source.sites)}, not {site!r}: collect it again")
    return lambda layer: source.get(site, layer)


def layer_similarity(
    source: Any,
    method: str = "cka",
    site_a: str = "resid_post",
    site_b: str = "mlp_act",
    layers: Any = None,
    **options: Any,
) -> LayerSimilarity:
    """Compare ``site_a`` and ``site_b`` at every pair of ``layers`` (default: every captured layer).

    ``options`` pass to the measure (``kernel``, ``dims``, ``epsilon``, ...). For CKA without an
    explicit ``debiased``, the unbiased estimator is used when features outnumber tokens, and the
    result records it.
    """
    if method not in MEASURES:
        raise LmscopeError(f"unknown similarity {method!r}: choose from {', '.join(MEASURES)}")
    captured = tuple(source.layers)
    chosen = captured if layers is None else tuple(sorted({layer % source.model.n_layers for layer in layers}))
    missing = [layer for layer in chosen if layer not in captured]
    if missing or not chosen:
        raise LmscopeError(f"layers {missing or list(chosen)} were not captured (captured: {list(captured)})")
    read_a, read_b = _reader(source, site_a), _reader(source, site_b)
    side_b = [read_b(layer) for layer in chosen]  # [tokens, features] each
    first_a = read_a(chosen[0])
    n_tokens = first_a.shape[0]
    if method == "cka" and "debiased" not in options:
        options = {**options, "debiased": n_tokens < max(first_a.shape[1], side_b[0].shape[1])}
    measure = MEASURES[method]
    matrix = np.empty((len(chosen), len(chosen)))  # [layer_a, layer_b]
    for i, layer in enumerate(chosen):
        a = first_a if i == 0 else read_a(layer)  # [tokens, features]
        for j, b in enumerate(side_b):
            matrix[i, j] = measure(a, b, **options)
    return LayerSimilarity(
        method=method,
        options=options,
        site_a=site_a,
        site_b=site_b,
        layers_a=chosen,
        layers_b=chosen,
        matrix=matrix,
        n_tokens=n_tokens,
    )
