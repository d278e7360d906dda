"""Similarity of every pair of layers: how one site's representations relate to another's across depth.

Ecco (Alammar 2021, Figure 6) compares the hidden states and FFN activations of every layer
pair over the same tokens. :func:`layer_similarity` does this for any two sites of a Trace or a
corpus :class:`~lmscope.analysis.collect.Collection` with any of the measures in
:mod:`lmscope.analysis.similarity`; the result renders as a heatmap.

Each layer's input is decomposed once (:func:`lmscope.analysis.similarity.prepare`) and reused
for every pair, so SVCCA/PWCCA over ``L`` layers cost ``2L`` SVDs, not ``2L²``.

The attention sink: on many causal LMs the first token's activations are orders of magnitude
larger than the others', and one token holding most of the (centered) squared norm makes CKA ≈ 1
for every layer pair that shares it. The result records, per site, the position with the largest
share (:class:`~lmscope.analysis._positions.Dominance`), the views warn above 50%, and
``skip_first=True`` or ``positions=`` leave such positions out.

Encoder-decoder models: ``stack="encoder"`` (or ``"decoder"``) compares the layers of one stack,
token by token, on a Trace or on a collection of the encoder (:func:`lmscope.collect`). The two
stacks have no token in common (the encoder reads the source, the decoder the target), so
:func:`stack_similarity` compares encoder layers with decoder layers over a corpus of (source,
target) pairs, by sentence: each pair's states mean-pooled over its tokens in each stack, the
sentence representations Kudugunta et al. (2019, "Investigating Multilingual NMT Representations
at Scale") compare with SVCCA across the layers of translation models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.analysis._positions import DOMINANT_SHARE, Dominance, dominance, found, select_rows, within_text
from lmscope.analysis._result import Result
from lmscope.analysis.similarity import MEASURES, compare, prepare, ready
from lmscope.capture import Trace
from lmscope.errors import LmscopeError

__all__ = ["LayerSimilarity", "chosen_layers", "layer_similarity", "stack_similarity"]

_ACROSS = (
    "the encoder reads the source tokens and the decoder the target tokens, so no token has states in both: "
    "compare the stacks over a corpus of (source, target) pairs with lmscope.analysis.stack_similarity(lm, pairs)"
)


@dataclass(frozen=True)
class LayerSimilarity(Result):
    """``matrix[i, j]``: similarity of ``site_a`` at ``layers_a[i]`` and ``site_b`` at ``layers_b[j]``.

    ``selection`` says which positions were compared; ``dominance`` holds, for ``site_a`` and
    ``site_b``, the position with the largest share of the centered squared norm over the layers.
    """

    _view = "lmscope.views.similarity"

    method: str
    options: dict[str, Any]
    site_a: str
    site_b: str
    layers_a: tuple[int, ...]
    layers_b: tuple[int, ...]
    matrix: np.ndarray  # [layer_a, layer_b]
    n_tokens: int
    selection: str = "all positions"
    dominance: tuple[Dominance, ...] = field(default=())

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib ``Figure`` of the heatmap, for ``savefig`` as PNG or SVG."""
        return self._view_module().plot(self, **kwargs)


def _reader(source: Any, site: str) -> Any:
    if isinstance(source, Trace):
        return lambda layer: source.at(site, layer).cpu().reshape(source.n_pos, -1)
    if site not in source.sites:
        raise LmscopeError(f"this collection has sites {', '.join(source.sites)}, not {site!r}: collect it again")
    return lambda layer: source.get(site, layer)


def _dominance(
    shares: list[tuple[int, float, int | None]], origin: np.ndarray, tokens: Any, lengths: list[int], site: str,
    layers: tuple[int, ...],
) -> Dominance:  # fmt: skip
    """The strongest position over the layers, and over how many layers one position dominates.

    ``origin [row]``: each compared row's index among ``tokens`` (every text's tokens, concatenated).
    """
    best = max(range(len(shares)), key=lambda i: shares[i][1])
    return found(shares[best], origin, tokens, lengths, f"{site} (centered) at layer {layers[best]}",
                 sum(s > DOMINANT_SHARE for _, s, _ in shares), len(layers))  # fmt: skip


def chosen_layers(source: Any, layers: Any) -> tuple[int, ...]:
    """The captured layers ``layers`` names (all captured layers for ``None``), ascending."""
    captured = tuple(source.layers)
    chosen = captured if layers is None else tuple(sorted({layer % source.model.n_layers for layer in layers}))
    missing = [layer for layer in chosen if layer not in captured]
    if missing or not chosen:
        raise LmscopeError(f"layers {missing or list(chosen)} were not captured (captured: {list(captured)})")
    return chosen


def _of_stack(source: Any, stack: str | None, other_stack: str | None) -> Any:
    """The Trace or Collection of ``stack``; two different stacks are refused (see :func:`stack_similarity`)."""
    if other_stack is not None and other_stack != (stack or "decoder"):
        raise LmscopeError(_ACROSS)
    if stack is None:
        return source
    if stack not in ("encoder", "decoder"):
        raise LmscopeError(f"unknown stack {stack!r}: use 'encoder' or 'decoder'")
    if isinstance(source, Trace) and source.encoder is not None:
        return source.stack(stack)
    have = getattr(source.model, "stack", "") or ""
    if have != stack:
        what = "trace" if isinstance(source, Trace) else "collection"
        holds = f"the {have} stack" if have else "a model with one stack"
        raise LmscopeError(f"this {what} holds {holds}, not the {stack}: leave stack out")
    return source


_STREAM_BYTES = 2**30  # stream a collection whose compared activations in float64 exceed this


def _streams(source: Any, method: str, site_a: str, site_b: str, stream: bool | None, options: dict) -> bool:
    """Whether to stream: asked for, or (``None``) a collection too large to hold, with a measure that streams."""
    streamable = method != "cka" or (options.get("kernel", "linear") == "linear" and not options.get("debiased"))
    collection = not isinstance(source, Trace)
    if stream is None and any(name in options for name in ("memory_mb", "progress", "threads")):
        stream = True  # options only the streaming version takes
    if stream is not None:
        if stream and not (collection and streamable):
            raise LmscopeError("stream=True needs a collection and a measure that streams (not debiased or RBF CKA)")
        return bool(stream)
    if not (collection and streamable):
        return False
    width = {site: source.features.get(site, 0) for site in (site_a, site_b)}
    if method == "cka" and "debiased" not in options and source.n_tokens < max(width.values()):
        return False  # the in-memory version switches to debiased CKA
    return source.n_tokens * sum(width.values()) * len(source.layers) * 8 > _STREAM_BYTES


def layer_similarity(
    source: Any,
    method: str = "cka",
    site_a: str = "resid_post",
    site_b: str = "mlp_act",
    layers: Any = None,
    *,
    positions: Any = None,
    skip_first: bool = False,
    stream: bool | None = None,
    stack: str | None = None,
    other_stack: str | None = None,
    **options: Any,
) -> LayerSimilarity:
    """Compare ``site_a`` and ``site_b`` at every pair of ``layers`` (default: every captured layer).

    ``stack``: ``"encoder"`` or ``"decoder"`` of an encoder-decoder Trace (a collection holds the
    encoder). ``other_stack`` other than ``stack`` is refused: see :func:`stack_similarity`.

    ``options`` pass to the measure (``kernel``, ``dims``, ``epsilon``, ...). For CKA without an
    explicit ``debiased``, the unbiased estimator is used when features outnumber tokens, and the
    result records it. ``positions`` (ints or a slice, within each text) or ``skip_first=True``
    compare only those tokens: leave out an attention sink that would dominate every measure.

    ``stream=True`` reads a collection one shard at a time and compares accumulated covariances
    (:func:`lmscope.analysis.streaming.layer_similarity`: memory is one shard plus the statistics,
    ``memory_mb=`` bounds the latter); ``None`` (default) streams a collection whose activations in
    float64 would take more than 1 GiB, when the measure streams (not debiased or RBF CKA).
    """
    if method not in MEASURES:
        raise LmscopeError(f"unknown similarity {method!r}: choose from {', '.join(MEASURES)}")
    source = _of_stack(source, stack, other_stack)
    if _streams(source, method, site_a, site_b, stream, options):
        from lmscope.analysis import streaming

        return streaming.layer_similarity(
            source, method, site_a, site_b, layers, positions=positions, skip_first=skip_first, **options
        )
    chosen = chosen_layers(source, layers)
    if isinstance(source, Trace):
        lengths, tokens = [source.n_pos], source.tokens
    else:
        lengths, tokens = [len(ids) for ids in source.token_ids], source.all_tokens
    rows, selection = select_rows(lengths, positions, skip_first)
    origin = np.arange(sum(lengths)) if rows is None else rows  # [row]: index among every text's tokens
    groups = within_text(lengths)[origin]  # [row]: position within its text

    def side(read: Any, site: str) -> tuple[list[Any], Dominance]:
        prepared, shares = [], []
        for layer in chosen:
            x = read(layer)  # [tokens, features], in the dtype it was captured in
            x = x if rows is None else x[rows]
            shares.append(dominance(np.asarray(x.float() if hasattr(x, "float") else x), True, groups))
            prepared.append(prepare(x, name=site, what=method))
        if method != "cka" or "debiased" in options:
            prepared = [ready(p, method, **options) for p in prepared]
        return prepared, _dominance(shares, origin, tokens, lengths, site, chosen)

    side_a, found_a = side(_reader(source, site_a), site_a)
    side_b, found_b = (side_a, found_a) if site_b == site_a else side(_reader(source, site_b), site_b)
    n_tokens = side_a[0].n_tokens
    if method == "cka" and "debiased" not in options:
        options = {**options, "debiased": n_tokens < max(side_a[0].n_features, side_b[0].n_features)}
    matrix = np.empty((len(chosen), len(chosen)))  # [layer_a, layer_b]
    for i, a in enumerate(side_a):
        for j, b in enumerate(side_b):
            matrix[i, j] = compare(a, b, method, **options)
    return LayerSimilarity(
        method=method,
        options=options,
        site_a=site_a,
        site_b=site_b,
        layers_a=chosen,
        layers_b=chosen,
        matrix=matrix,
        n_tokens=n_tokens,
        selection=selection,
        dominance=(found_a,) if site_b == site_a else (found_a, found_b),
    )


def _pooled(out: Any, site: str, layers: tuple[int, ...]) -> list[np.ndarray]:
    """``[layer][features]``: the trace's ``site`` at each of ``layers``, mean over its positions."""
    return [out.at(site, layer).float().reshape(out.n_pos, -1).mean(0).cpu().numpy() for layer in layers]


def stack_similarity(
    lm: Any,
    pairs: Any,
    method: str = "cka",
    site: str = "resid_post",
    *,
    encoder_layers: Any = None,
    layers: Any = None,
    **options: Any,
) -> LayerSimilarity:
    """Every encoder layer (rows) against every decoder layer (columns), over sentences.

    ``pairs``: ``(source, target)`` texts; each is traced teacher-forced (``lm.trace(source,
    target=target)``) and ``site`` is mean-pooled over the source tokens in the encoder and over the
    decoder's tokens (start token and target) in the decoder: one row per pair on each side, so the
    measures compare ``[pair, features]`` matrices (``n_tokens`` of the result counts pairs).
    Sentence means are what the two stacks share; token-level comparison within one stack is
    :func:`layer_similarity` with ``stack=``. Use many more pairs than the measure needs (CKA is
    debiased when features outnumber pairs; CCA needs more pairs than features).
    """
    if not getattr(lm, "is_seq2seq", False):
        raise LmscopeError(
            f"{getattr(lm, 'name', 'this model')} has one stack: compare its layers with layer_similarity"
        )
    if method not in MEASURES:
        raise LmscopeError(f"unknown similarity {method!r}: choose from {', '.join(MEASURES)}")
    pairs = [tuple(p) for p in pairs]
    if len(pairs) < 5 or any(len(p) != 2 or not all(isinstance(t, str) and t.strip() for t in p) for p in pairs):
        raise LmscopeError("give at least 5 (source, target) pairs of non-empty texts to compare the stacks over")
    rows_a: list[list[np.ndarray]] = []
    rows_b: list[list[np.ndarray]] = []
    chosen_a = chosen_b = ()
    for source, target in pairs:
        out = lm.trace(source, target=target, sites=(site,), layers=layers, encoder_layers=encoder_layers).trace
        chosen_a, chosen_b = tuple(out.encoder.layers), tuple(out.layers)
        rows_a.append(_pooled(out.encoder, site, chosen_a))
        rows_b.append(_pooled(out, site, chosen_b))
    side_a = [
        prepare(np.stack([r[i] for r in rows_a]), name=f"encoder {site}", what=method) for i in range(len(chosen_a))
    ]
    side_b = [
        prepare(np.stack([r[j] for r in rows_b]), name=f"decoder {site}", what=method) for j in range(len(chosen_b))
    ]
    if method == "cka" and "debiased" not in options:
        options = {**options, "debiased": len(pairs) < max(side_a[0].n_features, side_b[0].n_features)}
    if method != "cka" or "debiased" in options:
        side_a = [ready(p, method, **options) for p in side_a]
        side_b = [ready(p, method, **options) for p in side_b]
    matrix = np.array([[compare(a, b, method, **options) for b in side_b] for a in side_a])  # [enc_layer, layer]
    return LayerSimilarity(
        method=method,
        options=options,
        site_a=f"encoder {site}",
        site_b=f"decoder {site}",
        layers_a=chosen_a,
        layers_b=chosen_b,
        matrix=matrix,
        n_tokens=len(pairs),
        selection="each pair's mean over its tokens (the source in the encoder, the target in the decoder)",
    )
