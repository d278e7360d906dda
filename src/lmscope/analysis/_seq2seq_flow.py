"""The information-flow graph of an encoder-decoder prediction, with cross-attention edges.

Ferrando & Voita (2024), "Information flow routes", extended to a pre-norm encoder-decoder block
(T5, mBART, Pegasus): self-attention, cross-attention and FFN each add an update to the residual
stream, so a decoder block has three sums, each split into parts that add up to it exactly:

    resid_mid[q]   = resid_pre[q] + Σ_{k,h} A[h,q,k] · u[k,h] + b_O
    resid_cross[q] = resid_mid[q] + Σ_{s,h} C[h,q,s] · w[s,h] + b_O^cross
    resid_post[q]  = resid_cross[q] + mlp_out[q]

with ``u[k,h] = W_O[:, h] · v[k,h]`` (self-attention over decoder positions ``k ≤ q``) and
``w[s,h] = W_O^cross[:, h] · v^cross[s,h]``, the values of the *encoder output* at source position
``s`` (after the encoder's final norm) as cross-attention head ``h`` projects them. Each part's
contribution is its L1 proximity to the sum (:func:`lmscope.analysis._contributions.proximity`,
with the same fast exact computation of every attention term), normalized per sum.

The decoder graph has, per layer, the residual states ``pre`` → ``mid`` → ``cross`` → ``post``
and one FFN node per position, plus one node per encoder output position (``source``): a
``cross`` edge runs from source position ``s`` to ``cross[q]``, weighted by the summed
contribution of the ``(s, h)`` terms, with each head's share. The encoder graph (``stack=
"encoder"``) is the ordinary graph of a (bidirectional) stack. Post-norm models (BART, Marian)
normalize after each sum, so their block outputs are not sums of parts: they are refused, as
BERT is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmscope.analysis._contributions import attention_proximity
from lmscope.analysis.flow import MODES, Details, Edge, Endpoint, FlowGraph, Node
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Architecture

__all__ = [
    "DecoderParts",
    "LayerWeights",
    "Seq2SeqFlowGraph",
    "SourceEndpoint",
    "check_seq2seq_decomposable",
    "decoder_details",
    "decoder_parts",
    "layer_weights",
    "seq2seq_flow",
    "seq2seq_flow_of",
]


@dataclass(frozen=True)
class SourceEndpoint(Endpoint):
    """An encoder output position (``state="source"``) or a decoder state between cross-attention
    and FFN (``state="cross"``); other states are as in :class:`~lmscope.analysis.flow.Endpoint`."""

    @property
    def id(self) -> str:
        if self.state == "source":
            return f"e.{self.pos}"
        if self.state == "cross":
            return f"c{self.layer}.{self.pos}"
        return Endpoint.id.fget(self)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Seq2SeqFlowGraph(FlowGraph):
    """A :class:`~lmscope.analysis.flow.FlowGraph` of one stack of an encoder-decoder model.

    ``stack`` is ``"decoder"`` (nodes ``source`` for encoder outputs, ``cross`` states, edges of
    kind ``cross``) or ``"encoder"``; ``source_tokens`` are the encoder's tokens.
    """

    stack: str = "decoder"
    source_tokens: tuple[str, ...] = ()


def check_seq2seq_decomposable(arch: Architecture) -> None:
    """Raise unless every update of the stack is a linear map added straight to the residual."""
    family = arch.family
    if family.post_norm:
        raise LmscopeError(
            f"the {family.name!r} family normalizes the residual stream after each block (post-norm), so block "
            "outputs are not sums of parts and the flow graph does not apply: use a pre-norm encoder-decoder "
            "model such as T5, mBART or Pegasus"
        )
    if family.attn_out not in (family.attn, family.o_proj) or (
        family.cross_attn is not None and family.cross_attn_out not in (family.cross_attn, family.cross_o_proj)
    ):
        raise LmscopeError(
            f"the {family.name!r} family transforms attention outputs before adding them to the residual stream, "
            "so they cannot be split into per-head parts"
        )


def _projection(module: torch.nn.Module, arch: Architecture) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = arch.linear_weight(module).detach().float()  # [d_model, head·d_head]
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else bias.detach().float()


def _updates(v: torch.Tensor, weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``W_O[:, h] · v[k, kv(h)]`` as ``[pos, head, d_model]`` for ``v [pos, kv_head, d_head]``."""
    v = v.float().repeat_interleave(n_heads // v.shape[1], dim=1)  # [pos, head, d_head]
    weight = weight.to(v.device).view(weight.shape[0], n_heads, -1)  # [d_model, head, d_head]
    return torch.einsum("khe,dhe->khd", v, weight)


@dataclass(frozen=True)
class DecoderParts:
    """The exact parts of one decoder block's three sums at one position (float32, ``[.., d_model]``)."""

    resid_pre: torch.Tensor
    self_terms: torch.Tensor  # [pos_k, head, d_model]
    self_bias: torch.Tensor
    cross_terms: torch.Tensor  # [enc_pos, head, d_model]
    cross_bias: torch.Tensor
    mlp_out: torch.Tensor


def decoder_parts(trace: Trace, arch: Architecture, layer: int, position: int) -> DecoderParts:
    """The parts whose sum is ``resid_post[position]`` of decoder ``layer`` (see the module docstring)."""
    check_seq2seq_decomposable(arch)
    q = trace.position(position)
    weight, bias = _projection(arch.o_proj(layer), arch)
    c_weight, c_bias = _projection(arch.cross_o_proj(layer), arch)
    self_terms = trace.attention(layer, rows=[q])[:, 0].T[:, :, None] * _updates(
        trace.at("v", layer), weight, arch.n_heads
    )
    cross_terms = trace.attention(layer, rows=[q], cross=True)[:, 0].T[:, :, None] * _updates(
        trace.at("cross_v", layer), c_weight, arch.n_heads
    )
    pre = trace.at("resid_pre", layer)[q].float()
    zero = torch.zeros_like(pre)
    return DecoderParts(
        resid_pre=pre,
        self_terms=self_terms,
        self_bias=zero if bias is None else bias.to(pre.device),
        cross_terms=cross_terms,
        cross_bias=zero if c_bias is None else c_bias.to(pre.device),
        mlp_out=trace.at("mlp_out", layer)[q].float(),
    )


def _direct(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Clamped L1 proximities ``[pos]`` of one part ``[pos, d]`` (or ``[d]``) to the whole ``[pos, d]``."""
    return (whole.abs().sum(-1) - (whole - part).abs().sum(-1)).clamp_min(0)


def _attention_sum(
    probs: torch.Tensor,  # [head, pos_q, pos_k]
    updates: torch.Tensor,  # [pos_k, head, d_model]
    bias: torch.Tensor | None,  # [d_model]
    residual: torch.Tensor,  # [pos_q, d_model]
    whole: torch.Tensor,  # [pos_q, d_model]
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized contributions (terms ``[pos_q, pos_k, head]``, residual, bias ``[pos_q]``) and the error bound."""
    prox, slack = attention_proximity(probs, updates, whole, tolerance)
    resid = _direct(residual, whole)
    bias_prox = torch.zeros_like(resid) if bias is None else _direct(bias.to(whole.device), whole)
    total = prox.sum((1, 2)) + resid + bias_prox
    stuck = total == 0  # degenerate sum: the non-zero parts share it evenly (as in _contributions)
    if stuck.any():
        rows = stuck.nonzero().squeeze(1)
        prox[rows] = ((probs.float()[:, rows].permute(1, 2, 0) > 0) & (updates != 0).any(-1)).float()
        resid[rows] = (residual[rows] != 0).any(-1).float()
        if bias is not None:
            bias_prox[rows] = float(bool((bias != 0).any()))
        total = prox.sum((1, 2)) + resid + bias_prox
    scale = 1 / total.clamp_min(torch.finfo(total.dtype).tiny)
    error = torch.where(total > slack, 2 * slack / (total - slack).clamp_min(1e-30), torch.ones_like(slack))
    return prox * scale[:, None, None], resid * scale, bias_prox * scale, error.masked_fill(slack == 0, 0.0)


def _two_parts(part: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized contributions of an update and its residual to their sum (``[pos]`` each)."""
    whole = residual + part
    a, b = _direct(part, whole), _direct(residual, whole)
    stuck = (a + b) == 0
    a = torch.where(stuck, (part != 0).any(-1).float(), a)
    b = torch.where(stuck, (residual != 0).any(-1).float(), b)
    total = (a + b).clamp_min(torch.finfo(whole.dtype).tiny)
    return a / total, b / total


@dataclass(frozen=True)
class LayerWeights:
    """Normalized contributions of every part of one block's sums (float32, on the CPU).

    Decoder blocks have three sums: ``attention + attn_residual + attn_bias = 1`` (self-attention),
    ``cross + cross_residual + cross_bias = 1`` and ``ffn + ffn_residual = 1``; encoder blocks have
    no cross-attention (its fields empty).
    """

    layer: int
    attention: torch.Tensor  # [pos_q, pos_k, head]
    attn_residual: torch.Tensor  # [pos_q]
    attn_bias: torch.Tensor  # [pos_q]
    cross: torch.Tensor  # [pos_q, enc_pos, head] (decoder only)
    cross_residual: torch.Tensor  # [pos_q]
    cross_bias: torch.Tensor  # [pos_q]
    ffn: torch.Tensor  # [pos_q]
    ffn_residual: torch.Tensor  # [pos_q]
    error: float


def layer_weights(trace: Trace, arch: Architecture, layer: int, tolerance: float = 0.0) -> LayerWeights:
    """Contributions of every part of ``layer``'s sums (decoder: three sums; encoder: two)."""
    check_seq2seq_decomposable(arch)
    pre = trace.at("resid_pre", layer).float()  # [pos, d_model]
    mid = pre + trace.at("attn_out", layer).float()
    weight, bias = _projection(arch.o_proj(layer), arch)
    updates = _updates(trace.at("v", layer), weight, arch.n_heads)
    att, att_res, att_bias, error = _attention_sum(trace.attention(layer), updates, bias, pre, mid, tolerance)
    empty = torch.zeros(0)
    cross = cross_res = cross_bias = empty
    before_ffn = mid
    if "cross_attn_out" in trace.sites:
        before_ffn = mid + trace.at("cross_attn_out", layer).float()  # resid_cross
        c_weight, c_bias = _projection(arch.cross_o_proj(layer), arch)
        c_updates = _updates(trace.at("cross_v", layer), c_weight, arch.n_heads)  # [enc_pos, head, d_model]
        probs = trace.attention(layer, cross=True)  # [head, pos, enc_pos]
        cross, cross_res, cross_bias, c_error = _attention_sum(probs, c_updates, c_bias, mid, before_ffn, tolerance)
        error = torch.maximum(error, c_error)
    ffn, ffn_res = _two_parts(trace.at("mlp_out", layer).float(), before_ffn)
    return LayerWeights(
        layer, att.cpu(), att_res.cpu(), att_bias.cpu(), cross.cpu(), cross_res.cpu(), cross_bias.cpu(),
        ffn.cpu(), ffn_res.cpu(), float(error.max()) if error.numel() else 0.0,
    )  # fmt: skip


def _renormalize(w: LayerWeights, threshold: float) -> LayerWeights:
    """Zero every part below ``threshold`` and rescale the survivors of each sum to 1 (LM-TT's mode)."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t.masked_fill(t < threshold, 0.0)

    tiny = torch.finfo(torch.float32).tiny
    att, res, bias = cut(w.attention), cut(w.attn_residual), cut(w.attn_bias)
    total = (att.sum((1, 2)) + res + bias).clamp_min(tiny)
    cross, c_res, c_bias = w.cross, w.cross_residual, w.cross_bias
    if cross.numel():
        cross, c_res, c_bias = cut(cross), cut(c_res), cut(c_bias)
        c_total = (cross.sum((1, 2)) + c_res + c_bias).clamp_min(tiny)
        cross, c_res, c_bias = cross / c_total[:, None, None], c_res / c_total, c_bias / c_total
    ffn, f_res = cut(w.ffn), cut(w.ffn_residual)
    f_total = (ffn + f_res).clamp_min(tiny)
    return LayerWeights(
        w.layer, att / total[:, None, None], res / total, bias / total, cross, c_res, c_bias,
        ffn / f_total, f_res / f_total, w.error,
    )  # fmt: skip


def _keep(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    return (weight > 0) & (weight >= threshold)


def _simple(layer: int, kind: str, keep: torch.Tensor, source: str, target: str, weight: torch.Tensor) -> list[Edge]:
    positions = keep.nonzero().squeeze(1).tolist()
    return [
        Edge(layer, kind, SourceEndpoint(layer, p, source), SourceEndpoint(layer, p, target), v)
        for p, v in zip(positions, weight[positions].tolist(), strict=True)
    ]


def _attention_edges(
    layer: int, kind: str, contrib: torch.Tensor, keep: torch.Tensor, source: str, target: str
) -> list[Edge]:
    summed = contrib.sum(-1)  # [pos_q, pos_k]
    q_idx, k_idx = keep.nonzero(as_tuple=True)
    weights = summed[q_idx, k_idx]
    shares = contrib[q_idx, k_idx] / weights[:, None]
    return [
        Edge(layer, kind, SourceEndpoint(layer, k, source), SourceEndpoint(layer, q, target), w, tuple(heads))
        for q, k, w, heads in zip(q_idx.tolist(), k_idx.tolist(), weights.tolist(), shares.tolist(), strict=True)
    ]


def _extract(weights: Sequence[LayerWeights], starts: Sequence[int], threshold: float, n_pos: int) -> list[Edge]:
    """Edges reachable top-down from ``post`` of the last layer at ``starts``."""
    reached = torch.zeros(n_pos, dtype=torch.bool)
    reached[list(starts)] = True
    edges: list[Edge] = []
    for w in reversed(weights):
        layer = w.layer
        ffn = reached & _keep(w.ffn, threshold)
        keep_res = reached & _keep(w.ffn_residual, threshold)
        decoder = w.cross.numel() > 0
        before = "cross" if decoder else "mid"
        edges += _simple(layer, "residual", keep_res, before, "post", w.ffn_residual)
        edges += _simple(layer, "ffn", ffn, before, "post", w.ffn)
        mid = ffn | keep_res
        if decoder:
            cross = mid[:, None] & _keep(w.cross.sum(-1), threshold)  # [pos_q, enc_pos]
            edges += _attention_edges(layer, "cross", w.cross, cross, "source", "cross")
            c_res = mid & _keep(w.cross_residual, threshold)
            edges += _simple(layer, "residual", c_res, "mid", "cross", w.cross_residual)
            mid = c_res
        attn = mid[:, None] & _keep(w.attention.sum(-1), threshold)  # [pos_q, pos_k]
        a_res = mid & _keep(w.attn_residual, threshold)
        edges += _simple(layer, "residual", a_res, "pre", "mid", w.attn_residual)
        edges += _attention_edges(layer, "attention", w.attention, attn, "pre", "mid")
        reached = attn.any(0) | a_res
    return edges


_ORDER = {"source": -1, "pre": 0, "mid": 1, "cross": 2, "ffn": 3, "post": 4}


def _nodes(edges: Sequence[Edge], tokens: Sequence[str], source: Sequence[str], last: int) -> tuple[Node, ...]:
    nodes: dict[str, Node] = {}
    for edge in edges:
        for end in (edge.source, edge.target):
            if end.id in nodes:
                continue
            if end.state == "source":
                nodes[end.id] = Node(end.id, "source", -1, end.pos, "source", source[end.pos])
                continue
            layer, state = end.layer, end.state
            if state == "post" and layer < last:
                layer, state = layer + 1, "pre"
            nodes[end.id] = Node(end.id, "residual", layer, end.pos, state, tokens[end.pos])
        if edge.kind == "ffn":
            block = f"f{edge.layer}.{edge.target.pos}"
            nodes.setdefault(block, Node(block, "ffn", edge.layer, edge.target.pos, "ffn", tokens[edge.target.pos]))
    return tuple(sorted(nodes.values(), key=lambda n: (n.layer, _ORDER[n.state], n.pos)))


def seq2seq_flow(
    trace: Trace,
    arch: Architecture,
    *,
    stack: str = "decoder",
    threshold: float = 0.04,
    position: int | Sequence[int] | None = -1,
    mode: str = "prune",
    tolerance: float = 0.0,
) -> Seq2SeqFlowGraph:
    """The flow graph of one stack of an encoder-decoder ``trace`` (the decoder Trace, ``trace.encoder`` set).

    ``position`` names residual states of that stack (decoder states for ``"decoder"``, source
    positions for ``"encoder"``); ``None`` starts from every position.
    """
    if not 0 <= threshold < 1:
        raise LmscopeError(f"threshold must lie in [0, 1), not {threshold}")
    if mode not in MODES:
        raise LmscopeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if trace.encoder is None:
        raise LmscopeError("this trace is not of an encoder-decoder model")
    if stack not in ("decoder", "encoder"):
        raise LmscopeError(f"unknown stack {stack!r}: use 'encoder' or 'decoder'")
    own, own_arch = (trace, arch) if stack == "decoder" else (trace.encoder, arch.encoder)
    check_seq2seq_decomposable(own_arch)
    if stack == "decoder":
        check_seq2seq_decomposable(arch.encoder)  # cross-attention reads the encoder's output
        missing = [s for s in ("cross_attn_out", "cross_attn_probs", "cross_v") if s not in own.sites]
        if missing:
            raise LmscopeError(f"the decoder flow graph needs the sites {', '.join(missing)}: trace with them")
    layers = own.layers
    if list(layers) != list(range(layers[0], layers[-1] + 1)):
        raise LmscopeError("the flow graph needs a run of consecutive layers: trace with layers=None or a slice")
    if position is None:
        starts: tuple[int, ...] = tuple(range(own.n_pos))
    elif isinstance(position, int):
        starts = (own.position(position),)
    else:
        starts = tuple(sorted({own.position(p) for p in position}))
    weights = []
    for layer in layers:
        w = layer_weights(own, own_arch, layer, tolerance)
        weights.append(_renormalize(w, threshold) if mode == "renormalize" else w)
    all_edges = _extract(weights, range(own.n_pos), threshold, own.n_pos)
    edges = all_edges if len(starts) == own.n_pos else _extract(weights, starts, threshold, own.n_pos)
    source = trace.encoder.tokens
    return Seq2SeqFlowGraph(
        tokens=own.tokens,
        positions=starts,
        layers=layers,
        threshold=threshold,
        mode=mode,
        parallel=False,
        error=max(w.error for w in weights),
        nodes=_nodes(edges, own.tokens, source, layers[-1]),
        edges=tuple(edges),
        details={},
        all_edges=tuple(all_edges),
        stack=stack,
        source_tokens=source,
    )


def decoder_details(
    trace: Trace, arch: Architecture, unembed: Any, nodes: Sequence[Node], edges: Sequence[Edge], topk: int = 5
) -> dict[str, Details]:
    """Details of the decoder graph's nodes and edges: the logit lens of every residual state, and
    the tokens promoted and suppressed by each update (self-attention at ``mid``, cross-attention
    at ``cross``, the FFN at its node, and each attention or cross edge's own update)."""
    from lmscope.analysis.components import _top_bottom

    sites = {"pre": ("resid_pre",), "mid": ("resid_pre", "attn_out"), "cross": ("resid_cross",)}
    residual = [n for n in nodes if n.kind == "residual"]
    info: dict[str, dict[str, Any]] = {n.id: {} for n in residual}
    states = [
        sum(trace.at(site, n.layer)[n.pos].float() for site in sites.get(n.state, ("resid_post",))) for n in residual
    ]
    for start in range(0, len(states), 256):
        chunk = residual[start : start + 256]
        top = torch.softmax(unembed(torch.stack(states[start : start + 256]), norm=True), dim=-1).topk(topk, dim=-1)
        for n, ids, probs in zip(chunk, top.indices, top.values, strict=True):
            info[n.id]["lens"] = tuple(zip(unembed.token_strings(ids.tolist()), probs.tolist(), strict=True))
    keys, vectors = [], []
    updates = {"mid": "attn_out", "cross": "cross_attn_out", "ffn": "mlp_out"}
    for n in nodes:
        if n.state in updates:
            keys.append(n.id)
            vectors.append(trace.at(updates[n.state], n.layer)[n.pos].float())
    for e in edges:
        if e.kind not in ("attention", "cross"):
            continue
        cross, v, module = (
            (False, "v", arch.o_proj(e.layer)) if e.kind == "attention"
            else (True, "cross_v", arch.cross_o_proj(e.layer))
        )  # fmt: skip
        weight, _ = _projection(module, arch)
        u = _updates(trace.at(v, e.layer)[e.source.pos : e.source.pos + 1], weight, arch.n_heads)[0]  # [head, d]
        a = trace.attention(e.layer, rows=[e.target.pos], cross=cross)[:, 0, e.source.pos]  # [head]
        keys.append(e.id)
        vectors.append((a[:, None] * u).sum(0))
    if vectors:
        for key, (up, down) in zip(keys, _top_bottom(unembed, torch.stack(vectors), True, topk), strict=True):
            info.setdefault(key, {}).update(promoted=up, suppressed=down)
    return {key: Details(**value) for key, value in info.items()}


def seq2seq_flow_of(
    trace: Trace,
    lm: Any,
    position: Any,
    *,
    stack: str,
    threshold: float,
    mode: str,
    tolerance: float,
    details: bool = True,
    topk: int = 5,
) -> Seq2SeqFlowGraph:
    """:func:`seq2seq_flow` with ``position`` in :meth:`lmscope.Output.flow`'s meaning.

    Decoder: ``p`` explains the prediction of decoder token ``p`` (the state ``p − 1``; ``-1``
    or ``"next"``: after the last token). Encoder: a source position (``-1``: the last one).
    With ``details``, the decoder graph's nodes and edges get :func:`decoder_details`.
    """
    from lmscope.analysis._predicted import prediction

    if trace.encoder is None:
        raise LmscopeError(f"{trace.model.name} is not an encoder-decoder model: it has one stack (leave stack out)")
    if stack == "encoder":  # source positions; "next" has no meaning there: the last one
        states = -1 if isinstance(position, str) and position.strip().lower() == "next" else position
        if isinstance(states, str) or (isinstance(states, Sequence) and any(isinstance(p, str) for p in states)):
            raise LmscopeError(f"the encoder's positions are source positions (integers), not {position!r}")
    elif position is None:
        states = None
    elif isinstance(position, (int, str)):
        states = prediction(trace, position, True).state
    else:
        states = [prediction(trace, p, True).state for p in position]
    graph = seq2seq_flow(trace, lm.arch, stack=stack, threshold=threshold, position=states, mode=mode,
                         tolerance=tolerance)  # fmt: skip
    if details and stack == "decoder" and lm.arch.has_lm_head:
        info = decoder_details(trace, lm.arch, lm.unembed, graph.nodes, graph.edges, topk)
        graph = dataclasses.replace(graph, details=info)
    return graph
