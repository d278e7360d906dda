"""Views of the information-flow graph (``FlowGraph``): the LM-TT figure and its text twin.

The HTML draws positions as columns and layers as rows (input tokens at the bottom), circles for
residual states and squares for FFN blocks, edge width and colour by weight; a start-token
selector re-extracts the subgraph in the page from the edges reaching any output, and clicking a
node or edge shows its precomputed details. The text twin lists the strongest routes. The
decoder graph of an encoder-decoder model adds a ``cross`` state per layer and a row of encoder
output nodes (``source``), with cross-attention edges drawn dashed in their own colour.
"""

from __future__ import annotations

from typing import Any

from lmscope.analysis.flow import Edge, Endpoint, FlowGraph
from lmscope.views._html import fragment
from lmscope.views._prediction import describe
from lmscope.views._text import percent, table, visible

__all__ = ["strongest_routes", "to_html", "to_text"]

_KINDS = {"attention": 0, "ffn": 1, "residual": 2, "cross": 3}
_STATES = {"pre": 0, "mid": 1, "post": 2, "cross": 3, "source": 4}


def _depth(node_id: str) -> int:
    """Height of a residual state in the stack: x{l} is 3l, m{l} 3l + 1, c{l} (after cross-attention)
    3l + 2; an encoder output (e.{pos}) lies below them all."""
    if node_id[0] == "e":
        return -1
    layer = int(node_id[1:].split(".")[0])
    return 3 * layer + {"m": 1, "c": 2}.get(node_id[0], 0)


def _token(result: FlowGraph, end: Endpoint) -> str:
    """The token of an edge's end: a source token for an encoder output, else the stack's own."""
    if end.state == "source":
        return f"src {visible(result.source_tokens[end.pos])!r}"  # type: ignore[attr-defined]
    return repr(visible(result.tokens[end.pos]))


def strongest_routes(result: FlowGraph, count: int = 5) -> list[tuple[float, list[Edge]]]:
    """The best-scoring path (product of weights) from the output down to each input position.

    Returns up to ``count`` (score, edges from input to output) pairs, strongest first.
    """
    incoming: dict[str, list[Edge]] = {}
    for edge in result.edges:
        incoming.setdefault(edge.target.id, []).append(edge)
    best: dict[str, tuple[float, Edge | None]] = {}
    last = result.layers[-1] + 1
    for pos in result.positions:
        best[f"x{last}.{pos}"] = (1.0, None)
    for node in sorted(incoming, key=_depth, reverse=True):
        if node not in best:
            continue
        score = best[node][0]
        for edge in incoming[node]:
            value = score * edge.weight
            if value > best.get(edge.source.id, (-1.0, None))[0]:
                best[edge.source.id] = (value, edge)
    first = result.layers[0]
    starts = sorted(
        (
            (score, node)
            for node, (score, edge) in best.items()
            if edge is not None and (node.startswith(f"x{first}.") or node.startswith("e."))
        ),
        reverse=True,
    )[:count]
    routes = []
    for score, node in starts:
        path = []
        edge = best[node][1]
        while edge is not None:
            path.append(edge)
            edge = best[edge.target.id][1]
        routes.append((score, path))
    return routes


def _hop(edge: Edge, tokens: tuple[str, ...]) -> str:
    if edge.kind == "cross":
        return f"cross L{edge.layer}"
    if edge.kind == "attention":
        return f"attn L{edge.layer} {visible(tokens[edge.source.pos])!r}({edge.source.pos})"
    return f"{'FFN' if edge.kind == 'ffn' else 'res'} L{edge.layer}"


def to_text(result: FlowGraph) -> str:
    where = (
        ", ".join(f"{p} ({visible(result.tokens[p])!r})" for p in result.positions)
        if len(result.positions) <= 4
        else f"all {len(result.positions)} positions"
    )
    stack = getattr(result, "stack", "")
    head = (
        (f"{stack.capitalize()} stack of an encoder-decoder model. " if stack else "")
        + f"Information flow to {where}: threshold {result.threshold:g} ({result.mode}), "
        f"{len(result.nodes)} nodes, {len(result.edges)} edges"
    )
    if result.error > 0:
        head += f", weights within ±{result.error:.2g} of exact"
    lines = [head]
    if len(result.positions) <= 4 and stack != "encoder":  # the prediction each start explains (causal LM)
        n = len(result.tokens)
        for p in result.positions:
            lines.append(f"  explains the {describe(p + 1 if p + 1 < n else None, p, result.tokens)}")
    routes = strongest_routes(result)
    if routes:
        lines.append("Strongest routes (product of edge weights), input first:")
        for score, path in routes:
            start = path[0].source
            hops = " → ".join(_hop(e, result.tokens) for e in path if e.kind != "residual") or "residual only"
            lines.append(f"  {score:.3f}  {_token(result, start)}({start.pos}) → {hops}")
    strong = sorted((e for e in result.edges if e.kind != "residual"), key=lambda e: -e.weight)[:12]
    if strong:
        rows = []
        for e in strong:
            heads = ""
            if e.heads is not None:
                top = sorted(range(len(e.heads)), key=lambda h: -e.heads[h])[:2]
                heads = ", ".join(f"h{h} {percent(e.heads[h])}" for h in top)
            if e.experts is not None:  # mixture of experts: the experts that ran, by share
                heads = ", ".join(f"{expert_name(x.expert)} {percent(x.share)}" for x in e.experts[:3])
            source = f"{_token(result, e.source)}({e.source.pos}) {e.source.state}"
            target = f"{_token(result, e.target)}({e.target.pos}) {e.target.state}"
            rows.append([str(e.layer), e.kind, source, target, f"{e.weight:.3f}", heads])
        lines.append(table(["layer", "kind", "source", "target", "weight", "top heads / experts"], rows))
    return "\n".join(lines)


def _edge_row(edge: Edge) -> list[Any]:
    return [
        edge.layer,
        _KINDS[edge.kind],
        edge.source.pos,
        _STATES[edge.source.state],
        edge.target.pos,
        _STATES[edge.target.state],
        round(edge.weight, 5),
        None if edge.heads is None else [round(h, 4) for h in edge.heads],
    ]


def expert_name(expert: int) -> str:
    """``e3`` for routed expert 3, ``shared`` for a layer's shared expert (id -1)."""
    return "shared" if expert < 0 else f"e{expert}"


def _details(result: FlowGraph) -> dict[str, Any]:
    out = {}
    routed = {f"f{e.layer}.{e.target.pos}": e.experts for e in result.edges if e.kind == "ffn" and e.experts}
    for key, d in result.details.items():
        out[key] = {
            "lens": [[t, p] for t, p in d.lens],
            "promoted": [[t, v] for t, v in d.promoted],
            "suppressed": [[t, v] for t, v in d.suppressed],
            "neurons": [list(n) for n in d.neurons],
        }
        if d.neuron_experts:
            out[key]["neuron_experts"] = [expert_name(x) for x in d.neuron_experts]
        if key in routed:  # the router's choice: expert, router weight, share of the FFN edge
            out[key]["experts"] = [[expert_name(x.expert), x.router_weight, x.share] for x in routed[key]]
    return out


def to_html(result: FlowGraph) -> str:
    data = {
        "tokens": list(result.tokens),
        "layers": [result.layers[0], result.layers[-1]],
        "positions": list(result.positions),
        "threshold": result.threshold,
        "mode": result.mode,
        "parallel": result.parallel,
        "error": result.error,
        "edges": [_edge_row(e) for e in (result.all_edges or result.edges)],
        "details": _details(result),
    }
    if getattr(result, "stack", ""):  # encoder-decoder: which stack, and the encoder's tokens for source nodes
        data["stack"] = result.stack  # type: ignore[attr-defined]
        data["source_tokens"] = list(result.source_tokens)  # type: ignore[attr-defined]
    return fragment("flow", data, scripts=("flow.js",), styles=("flow.css",), text=to_text(result))
