"""One thin route per analysis, each a call of one ``Output`` method on a cached run.

Every analysis answers ``{"kind", "text", "data", "html"}``: the result's text twin, its
``to_dict()`` (left out with ``data=false``) and its view's self-contained HTML fragment (left out
with ``html=false``), the same fragment a notebook shows. Clicks in the flow graph map to
``/nodes/{id}`` and ``/edges/{id}`` (ids as the flow view names them), which answer several views.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from lmscope.app._core import Service, json_response
from lmscope.errors import LmscopeError

__all__ = ["ANALYSES", "capabilities", "router"]

router = APIRouter(prefix="/api/runs/{run_id}")
Html = Annotated[bool, Query(description="include the view's self-contained HTML fragment")]
Data = Annotated[bool, Query(description="include the result's to_dict()")]


# What each analysis route needs: "head" (the model with an LM head), "sum" (the weights of a
# pre-norm model, whose block outputs are sums of parts) or nothing, and the captured sites.
FLOW_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_probs", "v", "mlp_act")
ANALYSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "flow": ("sum", FLOW_SITES),
    "lens": ("head", ("resid_post",)),
    "saliency": ("head", ()),
    "rankings": ("head", ("resid_post",)),
    "attention": ("", ("attn_probs",)),
}


def capabilities(info: dict[str, Any]) -> dict[str, bool]:
    """Which analysis routes work on a run described by ``info``."""
    sites = set(info["sites"])
    model = bool(info["has_model"])
    have = {"": True, "sum": model and not info.get("post_norm"), "head": model and bool(info["lm_head"])}
    return {name: have[need] and set(sites_needed) <= sites for name, (need, sites_needed) in ANALYSES.items()}


def _payload(result: Any, html: bool = True, data: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": type(result).__name__, "text": str(result)}
    if data:
        body["data"] = result.to_dict()
    if html:
        body["html"] = result.to_html()
    return body


def _result(result: Any, html: bool = True, data: bool = True) -> Response:
    return json_response(_payload(result, html, data))


@router.get("/lens")
def lens(
    run_id: str,
    app: Service,
    position: int = -1,
    layer: int | None = None,
    site: str = "resid_post",
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    norm: bool = True,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Logit lens at ``position`` after every layer (or one ``layer``) of a residual ``site``."""
    result = app.analyze(run_id, lambda out: out.layer_predictions(position, layer, topk, norm, site))
    return _result(result, html, data)


@router.get("/attention")
def attention(
    run_id: str,
    app: Service,
    layer: int | None = None,
    view: str = "head",
    kind: str = "weights",
    head: int = 0,
    query: int = -1,
    top_k: Annotated[int | None, Query(ge=1)] = None,
    html: Html = True,
    data: Data = False,
) -> Response:
    """BertViz's head, model or neuron view of the run's attention (``kind``: weights, rollout, value_norm)."""
    result = app.analyze(run_id, lambda out: out.attention(layer, view, kind, head, query, top_k))
    return _result(result, html, data)


@router.get("/flow")
def flow(
    run_id: str,
    app: Service,
    threshold: float = 0.04,
    position: int | None = -1,
    renormalize: Annotated[bool, Query(description="prune per part and renormalize (the paper's way)")] = False,
    tolerance: Annotated[float, Query(ge=0)] = 0.0,
    details: bool = True,
    topk: Annotated[int, Query(ge=1, le=50)] = 5,
    html: Html = True,
    data: Data = True,
) -> Response:
    """The information-flow graph of the prediction at ``position`` (none: every position)."""
    mode = "renormalize" if renormalize else "prune"
    result = app.analyze(
        run_id, lambda out: out.flow(threshold, position, mode=mode, tolerance=tolerance, details=details, topk=topk)
    )
    return _result(result, html, data)


@router.get("/saliency")
def saliency(
    run_id: str,
    app: Service,
    method: str = "grad_x_input",
    style: str = "minimal",
    position: Annotated[list[int] | None, Query(description="output positions (default: generated, else all)")] = None,
    target: str = "prob",
    contrast: Annotated[str | None, Query(description="a foil token: attribute logit(token) - logit(foil)")] = None,
    steps: Annotated[int, Query(ge=1, le=256)] = 32,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Input saliency (Ecco's ``primary_attributions``) of the run's output tokens."""
    options: dict[str, Any] = {"positions": position, "target": target, "contrast": contrast}
    if method in ("integrated_gradients", "ig"):
        options["steps"] = steps
    result = app.analyze(run_id, lambda out: out.primary_attributions(method, style, **options))
    return _result(result, html, data)


@router.get("/rankings")
def rankings(
    run_id: str, app: Service, site: str = "resid_post", norm: bool = True, html: Html = True, data: Data = True
) -> Response:
    """Rank of each output token among the logit lens predictions after every layer (1 = top)."""
    return _result(app.analyze(run_id, lambda out: out.rankings(site, norm)), html, data)


@router.get("/rankings_watch")
def rankings_watch(
    run_id: str,
    app: Service,
    watch: Annotated[list[str], Query(description="words (or token ids as #123) to follow")],
    position: int = -1,
    site: str = "resid_post",
    norm: bool = True,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Rank of the ``watch`` words among the predictions at ``position``, after every layer."""
    words: list[str | int] = [int(w[1:]) if re.fullmatch(r"#\d+", w) else w for w in watch]
    return _result(app.analyze(run_id, lambda out: out.rankings_watch(words, position, site, norm)), html, data)


@router.get("/contribution_map")
def contribution_map(run_id: str, app: Service, layer: int, html: Html = True, data: Data = False) -> Response:
    """Every head's attention map beside its contribution map at ``layer``."""
    return _result(app.analyze(run_id, lambda out: out.contribution_map(layer)), html, data)


@router.get("/head_shares")
def head_shares(
    run_id: str,
    app: Service,
    layer: int,
    position: int = -1,
    source: int | None = None,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Each head's share of the attention edge ``source -> position`` (or of the whole block)."""
    return _result(app.analyze(run_id, lambda out: out.head_shares(layer, position, source)), html, data)


@router.get("/top_neurons")
def top_neurons(
    run_id: str,
    app: Service,
    layer: int,
    position: int = -1,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    html: Html = True,
    data: Data = True,
) -> Response:
    """The FFN neurons contributing most to the block output at ``position``."""
    return _result(app.analyze(run_id, lambda out: out.top_neurons(layer, position, topk)), html, data)


@router.get("/promoted")
def promoted(
    run_id: str,
    app: Service,
    layer: int,
    position: int = -1,
    component: str = "ffn",
    head: int | None = None,
    neuron: int | None = None,
    source: int | None = None,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    norm: bool = True,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Tokens promoted and suppressed by an update: attention block, head or edge; FFN block or neuron."""
    result = app.analyze(
        run_id,
        lambda out: out.promoted_tokens(
            layer, position, component, head=head, neuron=neuron, source=source, topk=topk, norm=norm
        ),
    )
    return _result(result, html, data)


_NODE = re.compile(r"([xmf])(\d+)\.(\d+)")
_EDGE = re.compile(r"([afr])(\d+)\.(\d+)\.(\d+)\.(pre|mid|post)")


def residual_site(kind: str, layer: int, n_layers: int) -> tuple[str, int]:
    """The (site, layer) of a flow node: ``x{l}`` is layer l's input (the last one: the final output)."""
    if kind == "m":
        return "resid_mid", layer
    if layer == n_layers:
        return "resid_post", layer - 1
    return "resid_pre", layer


@router.get("/nodes/{node_id}")
def node(
    run_id: str,
    node_id: str,
    app: Service,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    norm: bool = True,
    html: Html = True,
    data: Data = False,
) -> Response:
    """Details of a flow-graph node: the logit lens of a residual state, or an FFN block's top neurons
    and the tokens it promotes and suppresses."""
    match = _NODE.fullmatch(node_id)
    if match is None:
        raise LmscopeError(f"unknown node id {node_id!r}: use x<layer>.<pos>, m<layer>.<pos> or f<layer>.<pos>")
    kind, layer, pos = match[1], int(match[2]), int(match[3])
    n_layers = app.run(run_id).trace.model.n_layers

    def details(out: Any) -> list[Any]:
        if kind == "f":
            return [out.top_neurons(layer, pos, topk), out.promoted_tokens(layer, pos, "ffn", topk=topk, norm=norm)]
        site, at = residual_site(kind, layer, n_layers)
        return [out.layer_predictions(out.position_of_state(pos), at, topk, norm, site)]  # the state at pos

    views = [_payload(r, html, data) for r in app.analyze(run_id, details)]
    return json_response({"id": node_id, "views": views})


@router.get("/edges/{edge_id}")
def edge(
    run_id: str,
    edge_id: str,
    app: Service,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    norm: bool = True,
    html: Html = True,
    data: Data = False,
) -> Response:
    """Details of a flow-graph edge: for attention, each head's share, the layer's attention and
    contribution maps, and the tokens the edge promotes; for FFN, top neurons and promoted tokens."""
    match = _EDGE.fullmatch(edge_id)
    if match is None:
        raise LmscopeError(f"unknown edge id {edge_id!r}: use <a|f|r><layer>.<source>.<target>.<state>")
    kind, layer, source, target = match[1], int(match[2]), int(match[3]), int(match[4])

    def details(out: Any) -> list[Any]:
        if kind == "a":
            return [
                out.head_shares(layer, target, source),
                out.contribution_map(layer),
                out.promoted_tokens(layer, target, "attention", source=source, topk=topk, norm=norm),
            ]
        if kind == "f":
            return [
                out.top_neurons(layer, target, topk),
                out.promoted_tokens(layer, target, "ffn", topk=topk, norm=norm),
            ]
        raise LmscopeError("a residual edge carries the state unchanged: click its nodes for their logit lens")

    views = [_payload(r, html, data) for r in app.analyze(run_id, details)]
    return json_response({"id": edge_id, "views": views})
