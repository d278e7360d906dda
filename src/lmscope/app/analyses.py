"""One thin route per analysis, each a call of one ``Output`` method on a cached run.

Every analysis answers ``{"kind", "text", "data", "html"}``: the result's text twin, its
``to_dict()`` (left out with ``data=false``) and its view's self-contained HTML fragment (left out
with ``html=false``), the same fragment a notebook shows. Clicks in the flow graph map to
``/nodes/{id}`` and ``/edges/{id}`` (ids as the flow view names them), which answer several views.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from lmscope.app._core import Service, check_text, json_response
from lmscope.capture import Trace
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
    "intervene": ("head", ()),
}


def capabilities(info: dict[str, Any]) -> dict[str, bool]:
    """Which analysis routes work on a run described by ``info``."""
    sites = set(info["sites"])
    model = bool(info["has_model"])
    have = {"": True, "sum": model and not info.get("post_norm"), "head": model and bool(info["lm_head"])}
    found = {name: have[need] and set(sites_needed) <= sites for name, (need, sites_needed) in ANALYSES.items()}
    if info.get("seq2seq"):  # interventions are not supported on encoder-decoder models yet
        found["intervene"] = False
    return found


def _payload(result: Any, html: bool = True, data: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": type(result).__name__, "text": str(result)}
    if data:
        body["data"] = result.to_dict()
    if html:
        body["html"] = result.to_html()
    return body


def _result(result: Any, html: bool = True, data: bool = True) -> Response:
    return json_response(_payload(result, html, data))


async def _analysis(
    request: Request,
    app: Service,
    run_id: str,
    method: Callable[[Any], Any],
    html: bool,
    data: bool,
    cost: Callable[[Trace], tuple[int, str]] | None = None,
) -> Response:
    """``method(output)`` on the run's model worker (its cost checked first), answered as JSON."""
    run = app.run(run_id)
    if cost is not None:
        app.check_cost(*cost(run.trace))
    return await app.work(request, run.key, lambda cancel: _result(app.analyze(run, method, cancel), html, data))


def _outputs(trace: Trace, positions: list[int] | None) -> int:
    if positions:
        return len(positions)
    return trace.n_pos - trace.n_input if trace.n_pos > trace.n_input else trace.n_pos - 1


def _all_tokens(trace: Trace) -> int:
    """Tokens through the model: an encoder-decoder's source tokens count as well as its target's."""
    encoder = getattr(trace, "encoder", None)
    return trace.n_pos + (0 if encoder is None else encoder.n_pos)


def saliency_cost(trace: Trace, method: str, positions: list[int] | None, steps: int) -> tuple[int, str]:
    """Cost of saliency: outputs × tokens × layers (integrated gradients: 2 × steps × that)."""
    outputs, tokens, layers = _outputs(trace, positions), _all_tokens(trace), trace.model.n_layers
    if method in ("integrated_gradients", "ig"):
        how = f"integrated gradients: 2 × {steps} steps × {outputs} outputs × {tokens} tokens × {layers} layers"
        return 2 * steps * outputs * tokens * layers, how
    return outputs * tokens * layers, f"saliency: {outputs} outputs × {tokens} tokens × {layers} layers"


def flow_cost(trace: Trace, position: int | None) -> tuple[int, str]:
    """Cost of the flow graph: 4 × target positions × tokens × layers."""
    targets, tokens, layers = trace.n_pos if position is None else 1, _all_tokens(trace), trace.model.n_layers
    how = f"flow graph: 4 × {targets} target positions × {tokens} tokens × {layers} layers"
    return 4 * targets * tokens * layers, how


@router.get("/lens")
async def lens(
    run_id: str,
    request: Request,
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
    method = lambda out: out.layer_predictions(position, layer, topk, norm, site)  # noqa: E731
    return await _analysis(request, app, run_id, method, html, data)


@router.get("/attention")
async def attention(
    run_id: str,
    request: Request,
    app: Service,
    layer: int | None = None,
    view: str = "head",
    kind: str = "weights",
    head: int = 0,
    query: int = -1,
    top_k: Annotated[int | None, Query(ge=1)] = None,
    part: Annotated[str | None, Query(description="encoder-decoder models: encoder, decoder or cross")] = None,
    html: Html = True,
    data: Data = False,
) -> Response:
    """BertViz's head, model or neuron view of the run's attention (``kind``: weights, rollout, value_norm);
    of an encoder-decoder model all three kinds (Encoder, Decoder, Cross), or the one ``part``."""
    method = lambda out: out.attention(layer, view, kind, head, query, top_k, part=part or None)  # noqa: E731
    return await _analysis(request, app, run_id, method, html, data)


@router.get("/flow")
async def flow(
    run_id: str,
    request: Request,
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
    method = lambda out: out.flow(threshold, position, mode=mode, tolerance=tolerance, details=details, topk=topk)  # noqa: E731
    return await _analysis(request, app, run_id, method, html, data, lambda trace: flow_cost(trace, position))


@router.get("/saliency")
async def saliency(
    run_id: str,
    request: Request,
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
    call = lambda out: out.primary_attributions(method, style, **options)  # noqa: E731
    cost = lambda trace: saliency_cost(trace, method, position, steps)  # noqa: E731
    return await _analysis(request, app, run_id, call, html, data, cost)


@router.get("/rankings")
async def rankings(
    run_id: str,
    request: Request,
    app: Service,
    site: str = "resid_post",
    norm: bool = True,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Rank of each output token among the logit lens predictions after every layer (1 = top)."""
    return await _analysis(request, app, run_id, lambda out: out.rankings(site, norm), html, data)


@router.get("/rankings_watch")
async def rankings_watch(
    run_id: str,
    request: Request,
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
    method = lambda out: out.rankings_watch(words, position, site, norm)  # noqa: E731
    return await _analysis(request, app, run_id, method, html, data)


@router.get("/contribution_map")
async def contribution_map(
    run_id: str, request: Request, app: Service, layer: int, html: Html = True, data: Data = False
) -> Response:
    """Every head's attention map beside its contribution map at ``layer``."""
    return await _analysis(request, app, run_id, lambda out: out.contribution_map(layer), html, data)


@router.get("/head_shares")
async def head_shares(
    run_id: str,
    request: Request,
    app: Service,
    layer: int,
    position: int = -1,
    source: int | None = None,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Each head's share of the attention edge ``source -> position`` (or of the whole block)."""
    return await _analysis(request, app, run_id, lambda out: out.head_shares(layer, position, source), html, data)


@router.get("/top_neurons")
async def top_neurons(
    run_id: str,
    request: Request,
    app: Service,
    layer: int,
    position: int = -1,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    html: Html = True,
    data: Data = True,
) -> Response:
    """The FFN neurons contributing most to the block output at ``position``."""
    return await _analysis(request, app, run_id, lambda out: out.top_neurons(layer, position, topk), html, data)


@router.get("/promoted")
async def promoted(
    run_id: str,
    request: Request,
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

    def method(out: Any) -> Any:
        return out.promoted_tokens(
            layer, position, component, head=head, neuron=neuron, source=source, topk=topk, norm=norm
        )

    return await _analysis(request, app, run_id, method, html, data)


def intervention_cost(trace: Trace, op: str) -> tuple[int, str]:
    """Cost of an intervention: forward passes (the intervened run, a patch source's run) × tokens × layers."""
    passes, tokens, layers = 2 if op == "patch" else 1, trace.n_pos, trace.model.n_layers
    return passes * tokens * layers, f"intervention: {passes} forward passes × {tokens} tokens × {layers} layers"


@router.get("/intervene")
async def intervene(
    run_id: str,
    request: Request,
    app: Service,
    element: Annotated[str, Query(description="a flow-graph node or edge id (x3.4, f2.4, a2.1.4.mid, r2.4.4.post)")],
    op: Annotated[str, Query(description="ablate, or patch from source")] = "ablate",
    source: Annotated[str | None, Query(description="patch: a text of the same number of tokens")] = None,
    position: Annotated[int, Query(description="the residual position whose prediction is compared")] = -1,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    html: Html = True,
    data: Data = True,
) -> Response:
    """Re-run the run's input with one node or edge of the flow graph ablated, or patched from the run of
    ``source``; answers the prediction at ``position`` before and after (``InterventionEffect``)."""
    from lmscope.analysis.effect import flow_element_interventions, intervention_effect

    if source is not None and len(check_text(source, "patch source")) > 32 * app.config.max_input_tokens:
        raise LmscopeError(f"the patch source is {len(source)} characters, far beyond the run's length: shorten it")

    def method(out: Any) -> Any:
        lm = out._require_lm("an intervention")
        interventions, description = flow_element_interventions(lm, out, element, op, source)
        return intervention_effect(lm, out, interventions, position=position, topk=topk, description=description)

    cost = lambda trace: intervention_cost(trace, op)  # noqa: E731
    return await _analysis(request, app, run_id, method, html, data, cost)


_NODE = re.compile(r"([xmf])(\d+)\.(\d+)")
_EDGE = re.compile(r"([afr])(\d+)\.(\d+)\.(\d+)\.(pre|mid|post)")
# The decoder graph of an encoder-decoder model: encoder outputs (e.<pos>), the state after cross-attention
# (c<layer>.<pos>), cross-attention edges (c<layer>.<source>.<target>.cross) and edges into that state.
_CROSS_NODE = re.compile(r"e\.\d+|c\d+\.\d+")
_CROSS_EDGE = re.compile(r"[cafr]\d+\.\d+\.\d+\.(cross|source)|c\d+\.\d+\.\d+\.(pre|mid|post)")
_CROSS_DETAILS = (
    "{} of an encoder-decoder graph has no details here yet: the Attention tab's Cross view shows "
    "each head's cross-attention; click a decoder node for its logit lens"
)


def residual_site(kind: str, layer: int, n_layers: int) -> tuple[str, int]:
    """The (site, layer) of a flow node: ``x{l}`` is layer l's input (the last one: the final output)."""
    if kind == "m":
        return "resid_mid", layer
    if layer == n_layers:
        return "resid_post", layer - 1
    return "resid_pre", layer


@router.get("/nodes/{node_id}")
async def node(
    run_id: str,
    node_id: str,
    request: Request,
    app: Service,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    norm: bool = True,
    html: Html = True,
    data: Data = False,
) -> Response:
    """Details of a flow-graph node: the logit lens of a residual state, or an FFN block's top neurons
    and the tokens it promotes and suppresses."""
    if _CROSS_NODE.fullmatch(node_id):
        raise LmscopeError(_CROSS_DETAILS.format(f"the {'encoder output' if node_id[0] == 'e' else 'cross'} node"))
    match = _NODE.fullmatch(node_id)
    if match is None:
        raise LmscopeError(f"unknown node id {node_id!r}: use x<layer>.<pos>, m<layer>.<pos> or f<layer>.<pos>")
    kind, layer, pos = match[1], int(match[2]), int(match[3])
    run = app.run(run_id)
    n_layers = run.trace.model.n_layers

    def details(out: Any) -> list[Any]:
        if kind == "f":
            return [out.top_neurons(layer, pos, topk), out.promoted_tokens(layer, pos, "ffn", topk=topk, norm=norm)]
        site, at = residual_site(kind, layer, n_layers)
        return [out.layer_predictions(out.position_of_state(pos), at, topk, norm, site)]  # the state at pos

    def answer(cancel: Any) -> Response:
        views = [_payload(r, html, data) for r in app.analyze(run, details, cancel)]
        return json_response({"id": node_id, "views": views})

    return await app.work(request, run.key, answer)


@router.get("/edges/{edge_id}")
async def edge(
    run_id: str,
    edge_id: str,
    request: Request,
    app: Service,
    topk: Annotated[int, Query(ge=1, le=100)] = 10,
    norm: bool = True,
    html: Html = True,
    data: Data = False,
) -> Response:
    """Details of a flow-graph edge: for attention, each head's share, the layer's attention and
    contribution maps, and the tokens the edge promotes; for FFN, top neurons and promoted tokens."""
    if _CROSS_EDGE.fullmatch(edge_id):
        raise LmscopeError(_CROSS_DETAILS.format("a cross-attention edge"))
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

    run = app.run(run_id)

    def answer(cancel: Any) -> Response:
        views = [_payload(r, html, data) for r in app.analyze(run, details, cancel)]
        return json_response({"id": edge_id, "views": views})

    return await app.work(request, run.key, answer)
