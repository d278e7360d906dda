"""Components behind the flow graph: heads, contribution maps, neurons, promoted/suppressed tokens.

Computed on demand from a Trace and the model's weights, as in the LM Transparency Tool (Tufanov
et al. 2024): each head's share of an attention edge or of a block output; per head its attention
map next to its contribution map (``c[h, q, k]``, the proximity share of the term
``A[h,q,k] · u[k,h]`` in the block output at ``q``); per FFN block the neurons contributing most
(parts ``mlp_act[q, n] · W_out[:, n]``, signed by the activation, plus the output bias and the
rest of the sum); and for any update (attention block, head, edge, FFN block, neuron) the tokens
it promotes and suppresses, ``W_U · update`` (optionally through the final norm, as LM-TT does).

In a mixture-of-experts layer each expert that runs is a component (its router weight times its
output), and neurons are reported per expert (``lmscope.analysis._experts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmscope.analysis._contributions import block_contributions, check_decomposable, head_updates, proximity
from lmscope.analysis._experts import SHARED, ExpertParts, dense_activations, expert_neurons, expert_parts
from lmscope.analysis._result import Result
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Architecture, Unembed
from lmscope.models._placement import tensor_of

if TYPE_CHECKING:
    from lmscope.analysis.flow import Details, Edge, Node

__all__ = [
    "ContributionMap",
    "HeadShares",
    "Promoted",
    "TopNeurons",
    "contribution_map",
    "expert_neuron_contributions",
    "graph_details",
    "head_shares",
    "neuron_contributions",
    "promoted",
    "top_neurons",
    "update_vector",
]


@dataclass(frozen=True)
class ContributionMap(Result):
    """Attention maps and contribution maps ``[head, pos_q, pos_k]`` of one layer."""

    _view = "lmscope.views.components"

    layer: int
    tokens: tuple[str, ...]
    attention: np.ndarray  # [head, pos_q, pos_k]
    contributions: np.ndarray  # [head, pos_q, pos_k]: share of each term in the block output at q

    def plot(self, head: int | None = None) -> Any:
        """A matplotlib ``Figure``: attention maps next to contribution maps (every head, or ``head``)."""
        return self._view_module().plot(self, head)


@dataclass(frozen=True)
class HeadShares(Result):
    """Each head's contribution to an attention edge ``source -> position`` (or to the whole block output)."""

    _view = "lmscope.views.components"

    layer: int
    position: int
    source: int | None
    tokens: tuple[str, ...]
    contributions: np.ndarray  # [head]: contribution to the block output at position
    shares: np.ndarray  # [head]: contributions normalized to sum 1


@dataclass(frozen=True)
class TopNeurons(Result):
    """The FFN neurons contributing most to the block output at ``position``.

    In a mixture-of-experts layer ``experts[i]`` is the expert neuron ``neurons[i]`` belongs to
    (``-1``: the shared expert); only the experts the router chose at ``position`` run.
    """

    _view = "lmscope.views.components"

    layer: int
    position: int
    tokens: tuple[str, ...]
    neurons: np.ndarray  # [k] neuron indices
    contributions: np.ndarray  # [k]
    activations: np.ndarray  # [k] mlp_act (the sign of the neuron's update)
    experts: np.ndarray | None = None  # [k] mixture of experts: each neuron's expert (-1: shared)


@dataclass(frozen=True)
class Promoted(Result):
    """Tokens an update raises and lowers most: the top and bottom of ``W_U · update``."""

    _view = "lmscope.views.components"

    layer: int
    position: int
    component: str
    norm: bool
    tokens: tuple[str, ...]
    promoted: tuple[str, ...]
    promoted_logits: np.ndarray  # [k]
    suppressed: tuple[str, ...]
    suppressed_logits: np.ndarray  # [k]


def contribution_map(trace: Trace, arch: Architecture, layer: int, tolerance: float = 0.0) -> ContributionMap:
    """Attention and contribution maps of every head at ``layer``."""
    c = block_contributions(trace, arch, layer, tolerance)
    return ContributionMap(
        layer=trace.layers[trace.layer_index(layer)],
        tokens=trace.tokens,
        attention=trace.attention(layer).cpu().numpy(),
        contributions=c.attention.permute(2, 0, 1).cpu().numpy(),
    )


def head_shares(trace: Trace, arch: Architecture, layer: int, position: int, source: int | None = None) -> HeadShares:
    """Each head's contribution to the edge ``source -> position`` (all sources when ``None``)."""
    q = trace.position(position)
    c = block_contributions(trace, arch, layer).attention[q]  # [pos_k, head]
    if source is None:
        per_head = c.sum(0)
    else:
        k = trace.position(source)
        if k > q and bool((c[k] == 0).all()):
            raise LmscopeError(f"position {q} does not attend to the later position {k}")
        per_head = c[k]
    total = per_head.sum()
    shares = per_head / total if total > 0 else torch.zeros_like(per_head)
    return HeadShares(
        layer=trace.layers[trace.layer_index(layer)],
        position=q,
        source=None if source is None else trace.position(source),
        tokens=trace.tokens,
        contributions=per_head.cpu().numpy(),
        shares=shares.cpu().numpy(),
    )


def neuron_contributions(
    trace: Trace, arch: Architecture, layer: int, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contributions ``[neuron]`` of each neuron to the block output at ``position``, and activations.

    Parts: every ``mlp_act[q, n] · W_out[:, n]``, the output bias, and the rest of the block's sum
    (``resid_mid``, or ``resid_pre + attn_out`` for parallel blocks); they sum to ``resid_post``.
    In a mixture-of-experts layer the parts are the neurons of the experts that run, one after the
    other (see :func:`expert_neuron_contributions` for which expert and neuron each is).
    """
    c, act, _, _ = expert_neuron_contributions(trace, arch, layer, position)
    return c, act


def expert_neuron_contributions(
    trace: Trace, arch: Architecture, layer: int, position: int, parts: ExpertParts | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Contributions and activations ``[part]`` of every neuron, with its index and expert (``None``: dense).

    ``parts``: the layer's expert parts, when already computed.
    """
    check_decomposable(arch)
    q = trace.position(position)
    whole = trace.at("resid_post", layer)[q].float()
    if arch.experts(layer) is not None:
        n = expert_neurons(trace, arch, layer, q, parts)
        rest = whole - n.updates.sum(0) - n.bias  # resid_mid, plus float rounding
        extra = [n.bias, rest] if bool((n.bias != 0).any()) else [rest]
        c = proximity(torch.cat([n.updates, torch.stack(extra)]), whole)
        return c[: len(n.neurons)], n.activations, n.neurons, n.experts
    if arch.family.experts is not None:  # a dense FFN layer of a mixture-of-experts family
        act, module = dense_activations(arch, layer, trace.at("mlp_act", layer)[q : q + 1])
        act = act[0]  # [neuron]
    else:
        act = trace.at("mlp_act", layer)[q].float()  # [neuron]
        module = arch.mlp_down(layer)
    weight = arch.linear_weight(module).detach().float().to(act.device) * arch.residual_scale  # [d_model, neuron]
    parts = act[:, None] * weight.T  # [neuron, d_model]
    rest = whole - trace.at("mlp_out", layer)[q].float()
    bias = tensor_of(module, "bias")  # where accelerate offloaded it, too
    extra = [rest] if bias is None else [bias.detach().float().to(act.device) * arch.residual_scale, rest]
    c = proximity(torch.cat([parts, torch.stack(extra)]), whole)
    return c[: len(act)], act, torch.arange(len(act), device=act.device), None


def top_neurons(trace: Trace, arch: Architecture, layer: int, position: int, topk: int = 10) -> TopNeurons:
    """The ``topk`` neurons with the largest contribution to the FFN block output at ``position``."""
    if topk < 1:
        raise LmscopeError(f"topk must be at least 1, not {topk}")
    c, act, neurons, experts = expert_neuron_contributions(trace, arch, layer, position)
    top = c.topk(min(topk, len(c)))
    return TopNeurons(
        layer=trace.layers[trace.layer_index(layer)],
        position=trace.position(position),
        tokens=trace.tokens,
        neurons=neurons[top.indices].cpu().numpy(),
        contributions=top.values.cpu().numpy(),
        activations=act[top.indices].cpu().numpy(),
        experts=None if experts is None else experts[top.indices].cpu().numpy(),
    )


def update_vector(
    trace: Trace,
    arch: Architecture,
    layer: int,
    position: int,
    component: str = "ffn",
    *,
    head: int | None = None,
    neuron: int | None = None,
    source: int | None = None,
    expert: int | None = None,
) -> torch.Tensor:
    """The update ``[d_model]`` (float32) one component writes into the residual stream at ``position``.

    ``component="attention"``: the block output ``attn_out`` (bias included); with ``head`` and/or
    ``source`` only those terms ``Σ A[h,q,k] · u[k,h]``. ``component="ffn"``: ``mlp_out``; with
    ``neuron`` the neuron's ``mlp_act[q, n] · W_out[:, n]``. In a mixture-of-experts layer,
    ``expert`` (``-1``: the shared expert) selects one expert's update, router weight included,
    and ``neuron`` a neuron of that expert.
    """
    q = trace.position(position)
    if component == "attention":
        if head is None and source is None:
            return trace.at("attn_out", layer)[q].float()
        probs = trace.attention(layer, rows=[q])[:, 0]  # [head, pos_k]
        terms = probs.T[:, :, None] * head_updates(trace, arch, layer)  # [pos_k, head, d_model]
        if head is not None:
            if not -arch.n_heads <= head < arch.n_heads:
                raise LmscopeError(f"head {head} is out of range: the model has heads 0..{arch.n_heads - 1}")
            terms = terms[:, head]
        else:
            terms = terms.sum(1)
        return terms.sum(0) if source is None else terms[trace.position(source)]
    if component == "ffn" and (expert is not None or (neuron is not None and arch.experts(layer) is not None)):
        return _expert_update(trace, arch, layer, q, expert, neuron)
    if expert is not None:
        raise LmscopeError("expert applies to the FFN of a mixture-of-experts layer (component='ffn')")
    if component == "ffn":
        if neuron is None:
            return trace.at("mlp_out", layer)[q].float()
        check_decomposable(arch)
        act = trace.at("mlp_act", layer)[q]
        if not -len(act) <= neuron < len(act):
            raise LmscopeError(f"neuron {neuron} is out of range: layer {layer} has neurons 0..{len(act) - 1}")
        weight = arch.linear_weight(arch.mlp_down(layer)).detach().float() * arch.residual_scale
        return act[neuron].float() * weight[:, neuron].to(act.device)
    raise LmscopeError(f"component must be 'attention' or 'ffn', not {component!r}")


def _expert_update(
    trace: Trace, arch: Architecture, layer: int, q: int, expert: int | None, neuron: int | None
) -> torch.Tensor:
    """One expert's update at position ``q`` (or one of its neurons')."""
    check_decomposable(arch)
    parts = expert_parts(trace, arch, layer)
    if parts is None:
        raise LmscopeError(f"layer {layer} has a dense FFN, not a mixture of experts: leave out expert")
    ran = [int(e) for e in parts.ids[q]]
    if expert is None:
        raise LmscopeError(f"name the expert of neuron {neuron}: the experts that ran at position {q} are {ran}")
    if expert not in ran:
        names = ", ".join("shared" if e == SHARED else str(e) for e in ran)
        raise LmscopeError(f"expert {expert} did not run at position {q} of layer {layer}: the router chose {names}")
    if neuron is None:
        return parts.updates[q, ran.index(expert)]
    n = expert_neurons(trace, arch, layer, q, parts)
    mine = (n.experts == expert).nonzero().squeeze(1)
    if not -len(mine) <= neuron < len(mine):
        raise LmscopeError(f"neuron {neuron} is out of range: expert {expert} has neurons 0..{len(mine) - 1}")
    return n.updates[mine[neuron]]


def _top_bottom(unembed: Unembed, vectors: torch.Tensor, norm: bool, k: int) -> list[tuple[tuple, tuple]]:
    """(promoted, suppressed) lists of (token, logit) per row of ``vectors [n, d_model]``."""
    out = []
    for chunk in vectors.split(256):
        logits = unembed(chunk, norm=norm)  # [n, vocab]
        top, bottom = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        ids = torch.cat([top.indices, bottom.indices], -1).unique().tolist()  # each token decoded once per chunk
        text = dict(zip(ids, unembed.token_strings(ids), strict=True))
        for ti, tv, bi, bv in zip(top.indices.tolist(), top.values.tolist(), bottom.indices.tolist(),
                                  bottom.values.tolist(), strict=True):  # fmt: skip
            out.append((tuple((text[i], v) for i, v in zip(ti, tv, strict=True)),
                        tuple((text[i], v) for i, v in zip(bi, bv, strict=True))))  # fmt: skip
    return out


def _dense_neurons(
    trace: Trace, arch: Architecture, layer: int, positions: Sequence[int], topk: int
) -> dict[int, tuple[tuple[int, float, float], ...]]:
    """The ``topk`` neurons of the FFN block output at each of ``positions`` of a dense layer: the parts and
    proximities of :func:`expert_neuron_contributions`, with the weights read once and a block of
    positions' parts made at a time."""
    module = arch.mlp_down(layer)
    acts = trace.at("mlp_act", layer)  # [pos, neuron]
    weight = arch.linear_weight(module).detach().float().to(acts.device) * arch.residual_scale  # [d_model, neuron]
    bias = tensor_of(module, "bias")
    bias = None if bias is None else bias.detach().float().to(acts.device) * arch.residual_scale
    block = max(1, (64 << 20) // (4 * (weight.shape[1] + 2) * weight.shape[0]))
    out = {}
    for start in range(0, len(positions), block):
        rows = torch.as_tensor(list(positions[start : start + block]), dtype=torch.long)
        act = acts[rows].float()  # [row, neuron]
        whole = trace.at("resid_post", layer)[rows].float()  # [row, d_model]
        rest = whole - trace.at("mlp_out", layer)[rows].float()
        extra = torch.stack([rest] if bias is None else [bias.expand_as(rest), rest], 1)  # [row, 1 or 2, d_model]
        parts = torch.cat([act[:, :, None] * weight.T, extra], 1)  # [row, part, d_model]
        for i, pos in enumerate(rows.tolist()):
            c = proximity(parts[i], whole[i])[: act.shape[1]]
            top = c.topk(min(topk, len(c)))
            out[pos] = tuple((int(n), float(v), float(act[i, n])) for n, v in zip(top.indices, top.values, strict=True))
    return out


def promoted(
    trace: Trace,
    arch: Architecture,
    unembed: Unembed,
    layer: int,
    position: int,
    component: str = "ffn",
    *,
    head: int | None = None,
    neuron: int | None = None,
    source: int | None = None,
    expert: int | None = None,
    topk: int = 10,
    norm: bool = True,
) -> Promoted:
    """The ``topk`` tokens an update promotes and suppresses (see :func:`update_vector`)."""
    if topk < 1:
        raise LmscopeError(f"topk must be at least 1, not {topk}")
    vector = update_vector(
        trace, arch, layer, position, component, head=head, neuron=neuron, source=source, expert=expert
    )
    (up, down) = _top_bottom(unembed, vector[None], norm, topk)[0]
    label = component
    for name, value in (("expert", expert), ("head", head), ("neuron", neuron), ("source", source)):
        if value is not None:
            label += f" {name} {value}"
    return Promoted(
        layer=trace.layers[trace.layer_index(layer)],
        position=trace.position(position),
        component=label,
        norm=norm,
        tokens=trace.tokens,
        promoted=tuple(t for t, _ in up),
        promoted_logits=np.array([v for _, v in up]),
        suppressed=tuple(t for t, _ in down),
        suppressed_logits=np.array([v for _, v in down]),
    )


def graph_details(
    trace: Trace, arch: Architecture, unembed: Unembed, nodes: Sequence[Node], edges: Sequence[Edge], topk: int = 5
) -> dict[str, Details]:
    """Details of every node and attention edge of a flow subgraph, batched per kind."""
    from lmscope.analysis.flow import Details

    pre, attn, mlp = trace.get("resid_pre"), trace.get("attn_out"), trace.get("mlp_out")
    post = trace.get("resid_post")
    index = trace.layer_index
    residual = [n for n in nodes if n.kind == "residual"]
    states = []
    for n in residual:
        i = index(n.layer)
        state = {"pre": pre[i, n.pos], "mid": pre[i, n.pos] + attn[i, n.pos], "post": post[i, n.pos]}[n.state]
        states.append(state.float())
    info: dict[str, dict] = {n.id: {} for n in residual}
    for start in range(0, len(states), 256):
        logits = unembed(torch.stack(states[start : start + 256]), norm=True)
        top = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
        for n, ids, probs in zip(residual[start : start + 256], top.indices, top.values, strict=False):
            info[n.id]["lens"] = tuple(zip(unembed.token_strings(ids.tolist()), probs.tolist(), strict=True))
    # updates: attention block at mid nodes, FFN block at FFN nodes, each attention edge
    keys, vectors = [], []
    routed: dict[int, ExpertParts | None] = {}  # per layer: its experts' routing and updates (MoE)
    dense: dict[int, dict] = {}  # per layer of a dense family: each FFN node's top neurons
    if arch.family.experts is None:
        ffn_at: dict[int, list[int]] = {}
        for n in nodes:
            if n.kind == "ffn":
                ffn_at.setdefault(n.layer, []).append(n.pos)
        dense = {layer: _dense_neurons(trace, arch, layer, at, topk) for layer, at in ffn_at.items()}
    for n in nodes:
        if n.state == "mid":
            keys.append(n.id)
            vectors.append(attn[index(n.layer), n.pos].float())
        elif n.kind == "ffn":
            keys.append(n.id)
            vectors.append(mlp[index(n.layer), n.pos].float())
            if n.layer in dense:
                info[n.id] = {"neurons": dense[n.layer][n.pos]}
                continue
            if n.layer not in routed:
                routed[n.layer] = expert_parts(trace, arch, n.layer)
            c, act, ids, experts = expert_neuron_contributions(trace, arch, n.layer, n.pos, routed[n.layer])
            top = c.topk(min(topk, len(c)))
            info[n.id] = {
                "neurons": tuple(
                    (int(ids[i]), float(v), float(act[i])) for i, v in zip(top.indices, top.values, strict=True)
                )
            }
            if experts is not None:
                info[n.id]["neuron_experts"] = tuple(int(experts[i]) for i in top.indices)
    by_layer: dict[int, list[Edge]] = {}
    for e in edges:
        if e.kind == "attention":
            by_layer.setdefault(e.layer, []).append(e)
    for layer, group in by_layer.items():
        targets = sorted({e.target.pos for e in group})
        probs = trace.attention(layer, rows=targets)  # [head, target, pos_k]: only the rows the edges end in
        row = {pos: i for i, pos in enumerate(targets)}
        updates = head_updates(trace, arch, layer)  # [pos_k, head, d_model]
        for e in group:
            keys.append(e.id)
            vectors.append((probs[:, row[e.target.pos], e.source.pos, None] * updates[e.source.pos]).sum(0))
    if vectors:
        for key, (up, down) in zip(keys, _top_bottom(unembed, torch.stack(vectors), True, topk), strict=True):
            info.setdefault(key, {}).update(promoted=up, suppressed=down)
    return {key: Details(**value) for key, value in info.items()}
