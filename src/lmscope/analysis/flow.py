"""The information-flow graph of a prediction (Ferrando & Voita 2024; the LM Transparency Tool).

Nodes are residual states per (layer, position): ``pre`` (block input), ``mid`` (after attention)
and ``post`` (block output, the next layer's ``pre``), plus one FFN node per (layer, position).
Edges carry the contribution of a part to a block output (``lmscope.analysis._contributions``):

* ``attention``: ``pre[k] -> mid[q]`` (``post[q]`` for parallel blocks), the sum over heads of the
  (k, h) terms' contributions, with each head's share;
* ``ffn``: ``mid[q] -> post[q]`` through the FFN node (``pre -> post`` for parallel blocks); in
  a mixture-of-experts layer, with each expert's share and router weight (``experts``);
* ``residual``: ``pre[q] -> mid[q]`` and ``mid[q] -> post[q]`` (``pre -> post`` for parallel blocks).

Edges lighter than the threshold τ are pruned, either on the summed weights (``mode="prune"``) or,
as in the original paper, per part with the survivors renormalized to sum 1 (``"renormalize"``);
the important subgraph is then extracted top-down from the chosen output positions: an edge is
kept when its target is reached, and its source becomes reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmscope.analysis._contributions import BlockContributions, block_contributions, check_decomposable
from lmscope.analysis._result import Result
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Architecture, Unembed

__all__ = ["Details", "Edge", "Endpoint", "ExpertShare", "FlowGraph", "FlowWeights", "Node", "flow", "flow_weights"]

MODES = ("prune", "renormalize")
STREAM_ABOVE = 1024
"""Inputs longer than this stream the flow graph of given positions (see :func:`flow`)."""


@dataclass(frozen=True)
class Endpoint:
    """One end of an edge: a residual state ``pre``/``mid``/``post`` at (layer, pos)."""

    layer: int
    pos: int
    state: str

    @property
    def id(self) -> str:
        """The node id (``post`` of layer l is ``pre`` of layer l + 1: both are ``x{l+1}.{pos}``)."""
        if self.state == "mid":
            return f"m{self.layer}.{self.pos}"
        return f"x{self.layer + (self.state == 'post')}.{self.pos}"


@dataclass(frozen=True)
class Node:
    """A residual state (``kind="residual"``, circle) or an FFN block (``kind="ffn"``, square)."""

    id: str
    kind: str
    layer: int
    pos: int
    state: str  # pre, mid, post (final layer only) or ffn
    token: str


@dataclass(frozen=True)
class ExpertShare:
    """One expert of a mixture-of-experts FFN edge: its id (``-1``: shared), router weight and share."""

    expert: int
    router_weight: float  # the weight the router gave it (the shared expert's gate; 1 without one)
    share: float  # its share of the edge's weight (the shares of an edge sum to 1)


@dataclass(frozen=True)
class Edge:
    """A weighted edge; ``heads[h]`` is head h's share of an attention edge's weight (sums to 1).

    An FFN edge of a mixture-of-experts layer lists the experts that ran (the router's choice) in
    ``experts``, each with its router weight and its share of the edge's weight.
    """

    layer: int
    kind: str  # attention, ffn, residual
    source: Endpoint
    target: Endpoint
    weight: float
    heads: tuple[float, ...] | None = None
    experts: tuple[ExpertShare, ...] | None = None

    @property
    def id(self) -> str:
        return f"{self.kind[0]}{self.layer}.{self.source.pos}.{self.target.pos}.{self.target.state}"


@dataclass(frozen=True)
class Details:
    """Precomputed details of a node or edge, shown on click in the view."""

    lens: tuple[tuple[str, float], ...] = ()  # top tokens and probabilities of the residual state
    promoted: tuple[tuple[str, float], ...] = ()  # tokens the update raises most (logit)
    suppressed: tuple[tuple[str, float], ...] = ()  # tokens the update lowers most
    neurons: tuple[tuple[int, float, float], ...] = ()  # FFN: (neuron, contribution, activation)
    neuron_experts: tuple[int, ...] = ()  # mixture of experts: the expert of each of ``neurons`` (-1: shared)


@dataclass(frozen=True)
class FlowWeights:
    """Edge weights of every layer, before extraction (float32 arrays on the CPU)."""

    layers: tuple[int, ...]
    parallel: bool
    attention: tuple[torch.Tensor, ...]  # per layer [pos_q, pos_k, head]
    attn_residual: torch.Tensor  # [layer, pos]
    ffn: torch.Tensor  # [layer, pos]
    ffn_residual: torch.Tensor  # [layer, pos]
    error: float  # bound on any contribution's error from bounded terms (0: exact)
    experts: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, ...] = ()  # per layer: ids, weights, shares


@dataclass(frozen=True)
class FlowGraph(Result):
    """The information-flow subgraph reaching ``positions`` at the last layer.

    ``edges``/``nodes`` are the extracted subgraph; ``all_edges`` (not in ``to_dict``) holds the
    edges reaching any output position, for the view's start-token selector. ``error`` bounds the
    deviation of any weight from the exact value (0 unless a tolerance was given).
    """

    _view = "lmscope.views.flow"

    tokens: tuple[str, ...]
    positions: tuple[int, ...]
    layers: tuple[int, ...]
    threshold: float
    mode: str
    parallel: bool
    error: float
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    details: dict[str, Details] = field(default_factory=dict)
    all_edges: tuple[Edge, ...] = field(default=(), repr=False)

    def to_networkx(self) -> Any:
        """A ``networkx.MultiDiGraph`` (node ids as keys; FFN edges run mid -> FFN node -> post)."""
        try:
            import networkx as nx
        except ImportError as error:
            raise LmscopeError("to_networkx needs networkx: pip install 'lmscope[analysis]'") from error
        graph = nx.MultiDiGraph()
        for node in self.nodes:
            graph.add_node(node.id, kind=node.kind, layer=node.layer, pos=node.pos, state=node.state, token=node.token)
        for edge in self.edges:
            attrs = {"kind": edge.kind, "layer": edge.layer, "weight": edge.weight}
            if edge.heads is not None:
                attrs["heads"] = list(edge.heads)
            if edge.kind == "ffn":
                block = f"f{edge.layer}.{edge.target.pos}"
                graph.add_edge(edge.source.id, block, key="ffn", **attrs)
                graph.add_edge(block, edge.target.id, key="ffn", **attrs)
            else:
                graph.add_edge(edge.source.id, edge.target.id, key=edge.kind, **attrs)
        return graph


def _renormalize(c: BlockContributions, threshold: float) -> BlockContributions:
    """Zero every part below ``threshold`` and rescale the survivors of each sum to 1 (LM-TT's mode)."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t.masked_fill(t < threshold, 0.0)

    att, res, bias, mlp, mres = map(cut, (c.attention, c.attn_residual, c.bias, c.mlp, c.mlp_residual))
    tiny = torch.finfo(res.dtype).tiny
    experts = None
    if c.experts is not None:  # a mixture of experts: each expert is a part of the FFN sum
        experts = cut(c.experts)
        ffn_total = (experts.sum(-1) + mres).clamp_min(tiny)
        experts, mres = experts / ffn_total[:, None], mres / ffn_total
        mlp = experts.sum(-1)
        total = (att.sum((1, 2)) + res + bias).clamp_min(tiny)
    elif c.parallel:
        total = (att.sum((1, 2)) + res + bias + mlp).clamp_min(tiny)
        mlp, mres = mlp / total, mres
    else:
        total = (att.sum((1, 2)) + res + bias).clamp_min(tiny)
        ffn_total = (mlp + mres).clamp_min(tiny)
        mlp, mres = mlp / ffn_total, mres / ffn_total
    return BlockContributions(
        c.layer,
        c.parallel,
        att / total[:, None, None],
        res / total,
        bias / total,
        mlp,
        mres,
        c.error,
        experts,
        c.expert_ids,
        c.expert_weights,
    )


def flow_weights(
    trace: Trace, arch: Architecture, *, threshold: float = 0.0, mode: str = "prune", tolerance: float = 0.0
) -> FlowWeights:
    """Contributions of every layer's parts, as edge weights (renormalized per part in that mode)."""
    check_decomposable(arch)
    if mode not in MODES:
        raise LmscopeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    layers = trace.layers
    if list(layers) != list(range(layers[0], layers[-1] + 1)):
        raise LmscopeError("the flow graph needs a run of consecutive layers: trace with layers=None or a slice")
    attention, res, ffn, ffn_res, experts, error = [], [], [], [], [], 0.0
    for layer in layers:
        c = block_contributions(trace, arch, layer, tolerance)
        if mode == "renormalize":
            c = _renormalize(c, threshold)
        attention.append(c.attention.cpu())
        res.append(c.attn_residual.cpu())
        ffn.append(c.mlp.cpu())
        ffn_res.append(c.mlp_residual.cpu())
        moe = None if c.experts is None else (c.expert_ids.cpu(), c.expert_weights.cpu(), c.experts.cpu())
        experts.append(moe)
        error = max(error, float(c.error.max()))
    return FlowWeights(
        layers,
        arch.parallel,
        tuple(attention),
        torch.stack(res),
        torch.stack(ffn),
        torch.stack(ffn_res),
        error,
        tuple(experts),
    )


def _keep(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    return (weight > 0) & (weight >= threshold)


def _extract(w: FlowWeights, starts: Sequence[int], threshold: float) -> list[Edge]:
    """Edges reachable top-down from ``post`` of the last layer at ``starts``."""
    n_pos = w.attn_residual.shape[1]
    reached = torch.zeros(n_pos, dtype=torch.bool)  # the block outputs reached so far
    reached[list(starts)] = True
    rows = torch.arange(n_pos)
    edges: list[Edge] = []
    for index in range(len(w.layers) - 1, -1, -1):
        experts = w.experts[index] if w.experts else None
        parts = (w.attention[index], w.attn_residual[index], w.ffn[index], w.ffn_residual[index], experts)
        found, reached = _layer_edges(w.layers[index], w.parallel, reached, rows, *parts, threshold)
        edges += found
    return edges


def _layer_edges(
    layer: int,
    parallel: bool,
    reached: torch.Tensor,  # [pos] bool: the block outputs reached
    rows: torch.Tensor,  # [row]: the positions ``contrib`` holds (every reached one among them)
    contrib: torch.Tensor,  # [row, pos_k, head]
    attn_residual: torch.Tensor,  # [pos]
    ffn_weight: torch.Tensor,  # [pos]
    ffn_residual: torch.Tensor,  # [pos]
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    threshold: float,
) -> tuple[list[Edge], torch.Tensor]:
    """One layer's edges into the reached block outputs, and the block inputs they reach."""
    edges: list[Edge] = []
    summed = contrib.sum(-1)  # [row, pos_k]
    ffn = reached & _keep(ffn_weight, threshold)
    if parallel:
        mid, into = reached, "post"
        ffn_source = "pre"
    else:
        keep_res = reached & _keep(ffn_residual, threshold)
        mid, into, ffn_source = ffn | keep_res, "mid", "mid"
        edges += _simple(layer, "residual", keep_res, "mid", "post", ffn_residual)
    edges += _simple(layer, "ffn", ffn, ffn_source, "post", ffn_weight, experts)
    attn = mid[rows][:, None] & _keep(summed, threshold)  # [row, pos_k]
    keep_res = mid & _keep(attn_residual, threshold)
    edges += _simple(layer, "residual", keep_res, "pre", into, attn_residual)
    r_idx, k_idx = attn.nonzero(as_tuple=True)
    weights = summed[r_idx, k_idx]
    shares = contrib[r_idx, k_idx] / weights[:, None]
    for q, k, weight, heads in zip(
        rows[r_idx].tolist(), k_idx.tolist(), weights.tolist(), shares.tolist(), strict=True
    ):
        edges.append(
            Edge(layer, "attention", Endpoint(layer, k, "pre"), Endpoint(layer, q, into), weight, tuple(heads))
        )
    reached = attn.any(0) | keep_res
    if parallel:
        reached |= ffn
    return edges, reached


def _extract_every_position(
    trace: Trace, arch: Architecture, threshold: float, mode: str, tolerance: float
) -> tuple[list[Edge], float]:
    """The edges :func:`_extract` finds from every position's output, and the error bound: the same
    weights as :func:`flow_weights`, but computed top-down one layer at a time and let go once that
    layer's edges are taken, so only one layer's ``[pos, pos_k, head]`` weights are ever held."""
    n_pos = trace.n_pos
    reached = torch.ones(n_pos, dtype=torch.bool)
    rows = torch.arange(n_pos)
    edges: list[Edge] = []
    error = 0.0
    for layer in reversed(trace.layers):
        c = block_contributions(trace, arch, layer, tolerance)
        if mode == "renormalize":
            c = _renormalize(c, threshold)
        error = max(error, float(c.error.max()))
        moe = None if c.experts is None else (c.expert_ids.cpu(), c.expert_weights.cpu(), c.experts.cpu())
        parts = (c.attention.cpu(), c.attn_residual.cpu(), c.mlp.cpu(), c.mlp_residual.cpu(), moe)
        del c
        found, reached = _layer_edges(layer, arch.parallel, reached, rows, *parts, threshold)
        edges += found
    return edges, error


def _extract_streaming(
    trace: Trace, arch: Architecture, starts: Sequence[int], threshold: float, mode: str, tolerance: float
) -> tuple[list[Edge], float]:
    """The edges :func:`_extract` finds, computing each layer's contributions only at the positions reached
    (top-down, one layer at a time: only those rows of the attention probabilities), and the error bound."""
    n_pos = trace.n_pos
    reached = torch.zeros(n_pos, dtype=torch.bool)
    reached[list(starts)] = True
    edges: list[Edge] = []
    error = 0.0
    for layer in reversed(trace.layers):
        rows = reached.nonzero().squeeze(1)
        c = block_contributions(trace, arch, layer, tolerance, rows=rows.tolist())
        if mode == "renormalize":
            c = _renormalize(c, threshold)
        error = max(error, float(c.error.max()) if c.error.numel() else 0.0)

        experts = None
        if c.experts is not None:
            experts = tuple(_scatter(t, rows, n_pos) for t in (c.expert_ids, c.expert_weights, c.experts))
        full = (_scatter(t, rows, n_pos) for t in (c.attn_residual, c.mlp, c.mlp_residual))
        parts = (c.attention.cpu(), *full, experts)
        found, reached = _layer_edges(layer, arch.parallel, reached, rows, *parts, threshold)
        edges += found
    return edges, error


def _scatter(values: torch.Tensor, rows: torch.Tensor, n_pos: int) -> torch.Tensor:
    """``[row, ...]`` -> ``[pos, ...]`` on the CPU, zeros at the positions not among ``rows``."""
    out = torch.zeros(n_pos, *values.shape[1:], dtype=values.dtype)
    out[rows] = values.cpu()
    return out


def _simple(
    layer: int,
    kind: str,
    keep: torch.Tensor,
    source: str,
    target: str,
    weight: torch.Tensor,
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # ids, router weights, shares
) -> list[Edge]:
    positions = keep.nonzero().squeeze(1).tolist()
    values = weight[positions].tolist()
    return [
        Edge(layer, kind, Endpoint(layer, p, source), Endpoint(layer, p, target), v, None, _experts(experts, p, v))
        for p, v in zip(positions, values, strict=True)
    ]


def _experts(
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, pos: int, weight: float
) -> tuple[ExpertShare, ...] | None:
    """The experts of an FFN edge at ``pos``, ordered by share (their shares of ``weight`` sum to 1)."""
    if experts is None:
        return None
    ids, router, shares = (t[pos].tolist() for t in experts)
    parts = [
        ExpertShare(int(e), float(r), float(s) / weight if weight > 0 else 0.0)
        for e, r, s in zip(ids, router, shares, strict=True)
    ]
    return tuple(sorted(parts, key=lambda part: -part.share))


def _nodes(edges: Sequence[Edge], tokens: Sequence[str], last_layer: int) -> tuple[Node, ...]:
    nodes: dict[str, Node] = {}
    for edge in edges:
        for end in (edge.source, edge.target):
            if end.id not in nodes:
                layer, state = end.layer, end.state
                if state == "post" and layer < last_layer:
                    layer, state = layer + 1, "pre"
                nodes[end.id] = Node(end.id, "residual", layer, end.pos, state, tokens[end.pos])
        if edge.kind == "ffn":
            block = f"f{edge.layer}.{edge.target.pos}"
            nodes.setdefault(block, Node(block, "ffn", edge.layer, edge.target.pos, "ffn", tokens[edge.target.pos]))
    order = {"pre": 0, "mid": 1, "ffn": 2, "post": 3}
    return tuple(sorted(nodes.values(), key=lambda n: (n.layer, order[n.state], n.pos)))


def flow(
    trace: Trace,
    arch: Architecture,
    unembed: Unembed | None = None,
    *,
    threshold: float = 0.04,
    position: int | Sequence[int] | None = -1,
    mode: str = "prune",
    tolerance: float = 0.0,
    details: bool = True,
    topk: int = 5,
    stream: bool | None = None,
) -> FlowGraph:
    """The information-flow graph of the prediction at ``position`` (``None``: every position).

    ``stream``: extract the graph top-down computing each layer's contributions only at the
    positions reached (only those rows of attention), instead of every position's; the result then
    holds no ``all_edges`` beyond its own. By default it streams inputs longer than
    :data:`STREAM_ABOVE` tokens, where every position's weights would take ``pos² × head`` per layer.

    ``tolerance > 0`` lets attention terms whose triangle bound is below ``tolerance · ‖y‖₁`` be
    bounded instead of computed; the result's ``error`` says how far that can move any weight.
    With ``unembed`` and ``details``, every node and edge of the subgraph gets its logit lens,
    promoted/suppressed tokens and (FFN) top neurons.
    """
    if not 0 <= threshold < 1:
        raise LmscopeError(f"threshold must lie in [0, 1), not {threshold}")
    if position is None:
        starts = tuple(range(trace.n_pos))
    elif isinstance(position, int):
        starts = (trace.position(position),)
    else:
        starts = tuple(sorted({trace.position(p) for p in position}))
    if mode not in MODES:
        raise LmscopeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if stream is None:
        stream = trace.n_pos > STREAM_ABOVE and len(starts) < trace.n_pos
    every = len(starts) == trace.n_pos  # the graph of every position: it is its own ``all_edges``
    if stream or every:
        check_decomposable(arch)
        if list(trace.layers) != list(range(trace.layers[0], trace.layers[-1] + 1)):
            raise LmscopeError("the flow graph needs a run of consecutive layers: trace with layers=None or a slice")
        if every:
            edges, error = _extract_every_position(trace, arch, threshold, mode, tolerance)
        else:
            edges, error = _extract_streaming(trace, arch, starts, threshold, mode, tolerance)
        all_edges = edges
    else:
        weights = flow_weights(trace, arch, threshold=threshold, mode=mode, tolerance=tolerance)
        all_edges = _extract(weights, range(trace.n_pos), threshold)
        edges = all_edges if len(starts) == trace.n_pos else _extract(weights, starts, threshold)
        error = weights.error
    last = trace.layers[-1]
    nodes = _nodes(edges, trace.tokens, last)
    info = {}
    if details and unembed is not None:
        from lmscope.analysis.components import graph_details

        info = graph_details(trace, arch, unembed, nodes, edges, topk)
    return FlowGraph(
        tokens=trace.tokens,
        positions=starts,
        layers=trace.layers,
        threshold=threshold,
        mode=mode,
        parallel=arch.parallel,
        error=error,
        nodes=nodes,
        edges=tuple(edges),
        details=info,
        all_edges=tuple(all_edges),
    )
