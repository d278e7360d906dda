"""Attention maps for BertViz's head, model and neuron views: raw weights, rollout, value norms.

Raw attention weights ``A[h, q, k] = softmax_k(q_q · k_k · scaling)`` are what the model computed,
but they can mislead as explanations, so two alternative maps are offered:

- **rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): the residual
  connection is modelled by ``Â_l = ½ Ā_l + ½ I`` (``Ā_l`` the head mean, rows renormalized) and
  the maps are multiplied through the layers, ``R_l = Â_l · R_{l-1}``, ``R_0 = Â_0``: how much each
  input token reaches each position after layer ``l``.
- **value norm** (Kobayashi et al. 2020, "Attention is Not Only a Weight"): a head's output at
  ``q`` is ``Σ_k A[h, q, k] · f_h(x_k)`` with ``f_h(x_k) = W_O^h v_k^h``; the map
  ``‖A[h, q, k] · f_h(x_k)‖`` weighs each weight by the size of what it actually moves.

The neuron view (BertViz) unfolds one weight row: the post-rotary query, each key, their
elementwise product, the scaled score and the softmax. Under grouped-query attention query head
``h`` reads key/value head ``h // (head / kv_head)``. Large inputs are sparsified for display to
the strongest ``top_k`` keys per query (:func:`sparsify`), with the cut-off reported.

Encoder-decoder models (T5, BART) have three kinds of attention, which BertViz's head and model
views offer in an "Attention" selector: **Encoder** (encoder self-attention over the source
tokens), **Decoder** (decoder self-attention over the target tokens) and **Cross** (rows:
decoder tokens, columns: encoder tokens). :func:`attention` on such a trace returns an
:class:`EncoderDecoderAttention` holding one :class:`Attention` per kind (``part``), or one
``Attention`` when a single ``part`` is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmscope.analysis._result import Result
from lmscope.analysis.query_key import SITES, NeuronData, NeuronScores, neuron_data, neuron_scores, unfold
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import FAMILIES, Architecture

__all__ = [
    "KINDS",
    "PARTS",
    "VIEWS",
    "Attention",
    "EncoderDecoderAttention",
    "NeuronData",
    "NeuronScores",
    "Sparse",
    "attention",
    "auto_top_k",
    "needed_sites",
    "neuron_scores",
    "neuron_scores_of",
    "recapture_sites",
    "rollout",
    "seq2seq_sites",
    "sparsify",
    "top_keys",
    "value_norms",
]

KINDS = ("weights", "rollout", "value_norm")
VIEWS = ("head", "model", "neuron")
# The kinds of attention of an encoder-decoder model, in the order of BertViz's selector.
PARTS = ("encoder", "decoder", "cross")
PART_LABELS = {"encoder": "Encoder", "decoder": "Decoder", "cross": "Cross"}
PAIR_BUDGET = 2_000_000  # (query, key) pairs a view ships before it sparsifies


@dataclass(frozen=True)
class Sparse:
    """The strongest ``k`` weights per query: ``idx, val [layer, head, pos_q, k]``.

    ``cutoff[l, h]`` is the largest weight left out, ``kept[l, h]`` the share of each row's total
    weight that is kept (mean over queries).
    """

    k: int
    idx: np.ndarray
    val: np.ndarray
    cutoff: np.ndarray  # [layer, head]
    kept: np.ndarray  # [layer, head]


@dataclass(frozen=True)
class Attention(Result):
    """Attention maps ``weights [layer, head, pos_q, pos_k]`` of one input, for a view.

    ``kind`` is ``"weights"`` (the model's own attention probabilities), ``"rollout"`` (one map per
    layer, head axis of size 1) or ``"value_norm"`` (‖A·f(x)‖, not normalized). ``view`` picks the
    rendering; ``head`` and ``query`` pick the row the neuron view and the text twin start on.

    Of an encoder-decoder model, ``part`` says which attention this is (``"encoder"``,
    ``"decoder"`` or ``"cross"``; ``""`` for the one self-attention of other models); the query
    rows are ``tokens`` and the key columns ``key_tokens`` where they differ (cross-attention: the
    encoder's source tokens).
    """

    _view = "lmscope.views.attention"

    kind: str
    view: str
    model: str
    tokens: tuple[str, ...]
    layers: tuple[int, ...]
    weights: np.ndarray  # [layer, head, pos_q, pos_k]
    n_heads: int
    n_kv_heads: int
    n_input: int
    segment_b: int | None
    head: int
    query: int
    top_k: int | None  # None: every weight is shown
    neuron: NeuronData | None = None
    part: str = ""
    key_tokens: tuple[str, ...] | None = None  # None: the keys are the query tokens

    @property
    def keys(self) -> tuple[str, ...]:
        """The key tokens (columns): ``key_tokens``, else ``tokens``."""
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def key_n_input(self) -> int:
        """How many key tokens were given rather than generated (every encoder token is given)."""
        return len(self.keys) if self.key_tokens is not None else self.n_input

    def plot(self, layer: int | None = None, head: int | None = None) -> object:
        """A matplotlib ``Figure`` of one layer's maps: every head, or ``head`` (query rows, key columns)."""
        from lmscope.views._figure import plot_attention

        return plot_attention(self, layer, head)


@dataclass(frozen=True)
class EncoderDecoderAttention(Result):
    """The attention of an encoder-decoder model, as BertViz shows it: Encoder, Decoder, Cross.

    ``parts`` holds one :class:`Attention` per kind shown, in BertViz's order (encoder
    self-attention over ``source_tokens``, decoder self-attention over ``target_tokens``,
    cross-attention with decoder rows and encoder columns); the views open on the first.
    """

    _view = "lmscope.views.attention"

    kind: str
    view: str
    model: str
    source_tokens: tuple[str, ...]
    target_tokens: tuple[str, ...]
    parts: tuple[Attention, ...]

    def __getitem__(self, part: str) -> Attention:
        for shown in self.parts:
            if shown.part == part:
                return shown
        raise LmscopeError(f"no {part!r} attention here: this result holds {', '.join(self.names)}")

    def __iter__(self) -> Iterator[Attention]:
        return iter(self.parts)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.part for p in self.parts)

    @property
    def encoder(self) -> Attention | None:
        """Encoder self-attention ``weights [layer, head, source_pos, source_pos]``."""
        return self["encoder"] if "encoder" in self.names else None

    @property
    def decoder(self) -> Attention | None:
        """Decoder self-attention ``weights [layer, head, target_pos, target_pos]``."""
        return self["decoder"] if "decoder" in self.names else None

    @property
    def cross(self) -> Attention | None:
        """Cross-attention ``weights [layer, head, target_pos, source_pos]``."""
        return self["cross"] if "cross" in self.names else None

    def plot(self, layer: int | None = None, head: int | None = None, part: str | None = None) -> object:
        """A matplotlib ``Figure`` of one kind's maps (default: the first shown), as ``Attention.plot``."""
        return (self.parts[0] if part is None else self[part]).plot(layer, head)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LmscopeError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def rollout(weights: torch.Tensor) -> torch.Tensor:  # [layer, 1, pos_q, pos_k]
    """Attention rollout (Abnar & Zuidema 2020) of consecutive layers from the first.

    ``weights [layer, head, pos_q, pos_k]``: ``Â = ½·mean_h A + ½·I``, rows renormalized,
    ``R_0 = Â_0``, ``R_l = Â_l · R_{l-1}``.
    """
    n = weights.shape[-1]
    mixed = 0.5 * weights.float().mean(1) + 0.5 * torch.eye(n, device=weights.device)  # [layer, pos_q, pos_k]
    mixed = mixed / mixed.sum(-1, keepdim=True)
    out = [mixed[0]]
    for layer in range(1, len(mixed)):
        out.append(mixed[layer] @ out[-1])
    return torch.stack(out)[:, None]


def value_norms(trace: Trace, arch: Architecture, *, cross: bool = False) -> torch.Tensor:  # [layer, head, pos_k]
    """``‖f_h(x_k)‖ = ‖W_O^h · v_k^{kv(h)}‖`` for every captured layer, head and key (Kobayashi et al. 2020).

    ``cross``: the decoder's cross-attention (values ``cross_v`` of encoder positions, its own
    output projection).
    """
    v = trace.get("cross_v" if cross else "v").float()  # [layer, pos_k, kv_head, d_head]
    groups = arch.n_heads // arch.n_kv_heads
    if cross and not hasattr(arch, "cross_o_proj"):
        raise LmscopeError("this architecture does not name its cross-attention output projection")
    o_proj = arch.cross_o_proj if cross else arch.o_proj
    out = []
    for index, layer in enumerate(trace.layers):
        w_o = arch.linear_weight(o_proj(layer)).detach().float().to(v.device)  # [d_model, head·d_head]
        w_o = w_o.reshape(w_o.shape[0], arch.n_heads, arch.d_head)  # [d_model, head, d_head]
        values = v[index].repeat_interleave(groups, dim=1)  # [pos, head, d_head]
        out.append(torch.einsum("mhd,phd->hpm", w_o, values).norm(dim=-1))  # [head, pos]
    return torch.stack(out)


def neuron_scores_of(result: Attention, layer: int, head: int, query: int) -> NeuronScores:
    """:func:`neuron_scores` from the data an ``Attention`` neuron view holds (no trace needed)."""
    if result.neuron is None:
        raise LmscopeError("this attention result holds no neuron-view data: use view='neuron'")
    if layer not in result.layers:
        raise LmscopeError(f"layer {layer} is not in this view (layers {', '.join(map(str, result.layers))})")
    if not -len(result.tokens) <= query < len(result.tokens):
        raise LmscopeError(f"query {query} is out of range for {len(result.tokens)} tokens")
    index = result.layers.index(layer)
    return unfold(result.neuron, index, layer, head, query % len(result.tokens))


def auto_top_k(n_layers: int, n_heads: int, n_pos: int, n_keys: int | None = None) -> int | None:
    """``None`` (show every weight) while the view stays under :data:`PAIR_BUDGET` pairs, else 3..20 per query.

    ``n_keys``: the key positions where they differ from the queries' (cross-attention).
    """
    if n_layers * n_heads * n_pos * (n_pos if n_keys is None else n_keys) <= PAIR_BUDGET:
        return None
    return int(min(20, max(3, PAIR_BUDGET // (n_layers * n_heads * n_pos))))


def sparsify(weights: np.ndarray, k: int) -> Sparse:
    """The strongest ``k`` keys per query of ``weights [layer, head, pos_q, pos_k]``, with what was cut."""
    w = torch.as_tensor(weights).float()
    k = min(k, w.shape[-1])
    top = w.topk(k, dim=-1)  # [layer, head, pos_q, k]
    total = w.sum(-1).clamp(min=1e-30)  # [layer, head, pos_q]
    kept = (top.values.sum(-1) / total).mean(-1)  # [layer, head]
    # the (k+1)-th largest weight of a row is the largest one left out
    cutoff = w.topk(k + 1, dim=-1).values[..., -1].amax(-1) if k < w.shape[-1] else torch.zeros(w.shape[:2])
    return Sparse(k, top.indices.int().numpy(), top.values.numpy(), cutoff.numpy(), kept.numpy())


def top_keys(trace: Trace, layer: int, k: int, *, cross: bool = False, rows: int = 256) -> Sparse:
    """:func:`sparsify` of one layer's attention weights ``[1, head, pos_q, pos_k]``, computed one head and
    ``rows`` query rows at a time from the trace (``Trace.attention``): a long input's head view without
    ever holding the layer's dense ``[head, pos_q, pos_k]`` map."""
    if k < 1:
        raise LmscopeError(f"k must be at least 1, not {k}")
    n_heads = trace.model.n_heads
    n_q = trace.n_pos
    n_k = trace.encoder.n_pos if cross and trace.encoder is not None else n_q
    k = min(k, n_k)
    idx = np.zeros((1, n_heads, n_q, k), dtype=np.int32)
    val = np.zeros((1, n_heads, n_q, k), dtype=np.float32)
    cutoff, kept = np.zeros((1, n_heads), dtype=np.float32), np.zeros((1, n_heads), dtype=np.float32)
    for head in range(n_heads):
        shares, cut = [], torch.zeros(())
        for start in range(0, n_q, rows):
            w = trace.attention(layer, heads=[head], rows=slice(start, start + rows), cross=cross)  # [1, rows, pos_k]
            top = w.topk(min(k + 1, n_k), dim=-1)
            idx[0, head, start : start + w.shape[1]] = top.indices[0, :, :k].int().numpy()
            val[0, head, start : start + w.shape[1]] = top.values[0, :, :k].numpy()
            shares.append(top.values[0, :, :k].sum(-1) / w[0].sum(-1).clamp(min=1e-30))
            if k < n_k:
                cut = torch.maximum(cut, top.values[0, :, k].amax())
        kept[0, head] = float(torch.cat(shares).mean())
        cutoff[0, head] = float(cut)
    return Sparse(k, idx, val, cutoff, kept)


def needed_sites(view: str, kind: str, part: str = "") -> tuple[str, ...]:
    """The Trace sites a view of a kind of map reads.

    ``part``: ``""`` or a self-attention (``"encoder"``, ``"decoder"``) for the sites of a self-attention,
    ``"cross"`` for the decoder's cross-attention sites. ``position_bias`` is not listed: the
    neuron view adds it where the trace records one (T5).
    """
    _check_choice("view", view, VIEWS)
    _check_choice("kind", kind, KINDS)
    if part == "cross":
        return (
            "cross_attn_probs",
            *(("cross_q", "cross_k") if view == "neuron" else ()),
            *(("cross_v",) if kind == "value_norm" else ()),
        )
    return ("attn_probs", *(("q", "k") if view == "neuron" else ()), *(("v",) if kind == "value_norm" else ()))


def seq2seq_sites(view: str, kind: str, part: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(needed, optional)``: the sites an encoder-decoder view of ``part`` (default all) reads.

    ``needed`` on the decoder trace (the encoder trace needs the self-attention ones among them);
    ``optional``: captured where the model has them (T5's ``position_bias``, for the neuron view).
    """
    names = PARTS if part is None else (part,)
    needed = dict.fromkeys(s for name in names for s in needed_sites(view, kind, name))
    return tuple(needed), (("position_bias",) if view == "neuron" else ())


_BIASED = frozenset(family.name for family in FAMILIES if family.alibi or family.output_attentions)


def recapture_sites(trace: Trace, view: str, kind: str, part: str | None = None) -> tuple[str, ...]:
    """The sites to capture again for a view of ``trace``, or ``()`` when the trace holds them all.

    Of an encoder-decoder model the encoder trace must hold the self-attention sites the encoder part
    reads, and a T5 neuron view its ``position_bias``.
    """
    if getattr(trace, "encoder", None) is None:
        sites = needed_sites(view, kind)
        if view == "neuron" and trace.model.family in _BIASED:  # an ALiBi or relative bias is a term of the scores
            sites = (*sites, "position_bias")
        return () if set(sites) <= set(trace.sites) else sites
    needed, optional = seq2seq_sites(view, kind, part)
    on_decoder = set() if part == "encoder" else set(needed)
    on_encoder = set(needed) - set(needed_sites(view, kind, "cross")) if part in (None, "encoder") else set()
    if optional and trace.model.family == "t5":  # its self-attention adds a relative position bias
        on_decoder |= set(optional) if part in (None, "decoder") else set()
        on_encoder |= set(optional) if on_encoder else set()
    complete = on_decoder <= set(trace.sites) and on_encoder <= set(trace.encoder.sites)
    return () if complete else (*needed, *optional)


def attention(
    trace: Trace,
    *,
    layer: int | None = None,
    view: str = "head",
    kind: str = "weights",
    head: int = 0,
    query: int = -1,
    top_k: int | None = None,
    arch: Architecture | None = None,
    part: str | None = None,
) -> Attention | EncoderDecoderAttention:
    """Attention maps of ``trace`` for BertViz's views.

    Args:
        layer: one layer to show (rollout: the rollout up to it); default every captured layer.
        view: ``"head"``, ``"model"`` or ``"neuron"`` (needs sites ``q`` and ``k``).
        kind: ``"weights"``, ``"rollout"`` (needs layers 0..L captured) or ``"value_norm"`` (needs ``arch``
            for the output projections, and site ``v``).
        head, query: the head and query position the neuron view and the text twin start on.
        top_k: show only the strongest ``top_k`` keys per query; default: all for small inputs,
            see :func:`auto_top_k`.
        arch: the model's architecture (weights), for ``value_norm``.
        part: of an encoder-decoder model's trace (the decoder trace, its encoder at
            ``trace.encoder``): ``"encoder"``, ``"decoder"`` or ``"cross"`` for one kind of attention
            (an ``Attention``); default all three, as an :class:`EncoderDecoderAttention` (rollout:
            encoder and decoder, since rollout multiplies square maps). ``query`` is a decoder
            position for the decoder and cross parts; the encoder part starts on its last source
            token unless it is the one part asked for.
    """
    _check_choice("view", view, VIEWS)
    _check_choice("kind", kind, KINDS)
    encoder = getattr(trace, "encoder", None)
    if encoder is None:
        if part not in (None, ""):
            raise LmscopeError(f"part={part!r} is for encoder-decoder models (T5, BART): this trace has one stack")
        return _one(trace, layer=layer, view=view, kind=kind, head=head, query=query, top_k=top_k, arch=arch)
    if part is not None:
        _check_choice("part", part, PARTS)
    names = (PARTS if kind != "rollout" else PARTS[:2]) if part is None else (part,)
    if part == "cross" and kind == "rollout":
        raise LmscopeError("attention rollout multiplies square self-attention maps: pick part 'encoder' or 'decoder'")
    shown = []
    for name in names:
        stack = encoder if name == "encoder" else trace
        own = None if layer is None else layer + stack.model.n_layers if layer < 0 else layer
        if own is not None and own not in stack.layers and len(names) > 1:
            raise LmscopeError(
                f"layer {layer} is not in both stacks (captured: encoder {list(encoder.layers)}, decoder "
                f"{list(trace.layers)}): pick part='encoder', 'decoder' or 'cross' to see one"
            )
        start = query if name != "encoder" or part == "encoder" else -1
        shown.append(
            _one(
                stack,
                layer=layer,
                view=view,
                kind=kind,
                head=head,
                query=start,
                top_k=top_k,
                arch=(getattr(arch, "encoder", None) if name == "encoder" else arch),
                part=name,
                key_trace=encoder if name == "cross" else None,
            )
        )
    if part is not None:
        return shown[0]
    return EncoderDecoderAttention(
        kind=kind,
        view=view,
        model=trace.model.name,
        source_tokens=encoder.tokens,
        target_tokens=trace.tokens,
        parts=tuple(shown),
    )


def _one(
    trace: Trace,
    *,
    layer: int | None,
    view: str,
    kind: str,
    head: int,
    query: int,
    top_k: int | None,
    arch: Architecture | None,
    part: str = "",
    key_trace: Trace | None = None,
) -> Attention:
    """One kind of attention of ``trace``; ``key_trace``: the encoder trace whose tokens cross-attention reads."""
    cross = part == "cross"
    if top_k is not None and top_k < 1:
        raise LmscopeError(f"top_k must be at least 1, not {top_k}")
    if SITES["cross" if cross else "self"][2] not in trace.sites:
        trace.get(SITES["cross" if cross else "self"][2])  # the clear error: not captured
    layers = list(trace.layers)
    chosen = list(range(len(layers))) if layer is None else [trace.layer_index(layer)]

    def probs(indices: Sequence[int]) -> torch.Tensor:  # [layer, head, pos_q, pos_k], one layer computed at a time
        return torch.stack([trace.attention(layers[i], cross=cross) for i in indices])

    if kind == "rollout":
        if layers[: chosen[-1] + 1] != list(range(chosen[-1] + 1)):
            raise LmscopeError("attention rollout multiplies every layer from the first: capture layers 0..L")
        weights = rollout(probs(range(chosen[-1] + 1)))[chosen]
    elif kind == "value_norm":
        if arch is None:
            raise LmscopeError("attention × value norm needs the model's output projections: pass arch=lm.arch")
        weights = probs(chosen) * value_norms(trace, arch, cross=cross)[chosen][:, :, None, :]
    else:
        weights = probs(chosen)
    weights = weights.float().cpu().numpy()
    if not 0 <= head < trace.model.n_heads:
        raise LmscopeError(f"head {head} is out of range: the model has heads 0..{trace.model.n_heads - 1}")
    neuron = neuron_data(trace, chosen, cross=cross) if view == "neuron" else None
    return Attention(
        kind=kind,
        view=view,
        model=trace.model.name,
        tokens=trace.tokens,
        layers=tuple(layers[i] for i in chosen),
        weights=weights,
        n_heads=trace.model.n_heads,
        n_kv_heads=trace.model.n_kv_heads,
        n_input=trace.n_input,
        segment_b=trace.segment_b,
        head=head,
        query=trace.position(query),
        top_k=top_k if top_k is not None else auto_top_k(*weights.shape[:3], weights.shape[3]),
        neuron=neuron,
        part=part,
        key_tokens=None if key_trace is None else key_trace.tokens,
    )
