"""A mixture-of-experts FFN output as a sum of experts, and each expert's neurons.

In a mixture-of-experts block (Shazeer et al. 2017; Mixtral, Jiang et al. 2024; DeepSeekMoE, Dai
et al. 2024) the FFN output at position ``q`` is

    mlp_out[q] = Σ_j w[q, j] · E_{i[q, j]}(x[q])  +  g[q] · S(x[q]),

over the ``k`` routed slots ``j`` (router choice ``i``, router weight ``w``), plus a shared expert
``S`` with an optional sigmoid gate ``g`` (Qwen2-MoE) or ``g = 1`` (DeepSeek). Each term is one
component of the FFN block. Nothing extra is captured: ``mlp_act`` holds the FFN's input ``x``
for MoE families, and the router and experts are the model's own modules, run again on it, so the
router's scoring, top-k choice, renormalization and scaling are exactly the model's.

Each routed expert is ``E(x) = W_down[e] · (act(W_gate[e] x) * W_up[e] x)`` over fused 3-D weights
``gate_up_proj [expert, 2·neuron, d_model]`` and ``down_proj [expert, d_model, neuron]``, so its
neuron ``n`` writes ``w · a[n] · W_down[e][:, n]``; the shared expert is an ordinary gated MLP.
Llama 4 scales the expert's input instead (``w · E(x)`` becomes ``E(w · x)``, Meta 2025, "The Llama 4
herd"): its slot's update is that, and its neuron ``n`` writes ``a[n](w · x) · W_down[e][:, n]``.

Axis vocabulary: ``pos, d_model, neuron``; ``slot`` is one of a position's ``k`` routed choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Architecture

__all__ = ["SHARED", "ExpertNeurons", "ExpertParts", "dense_activations", "expert_neurons", "expert_parts"]

SHARED = -1
"""The expert id of a layer's shared expert (every token goes through it)."""


@dataclass(frozen=True)
class ExpertParts:
    """The updates of one MoE layer's experts at every position (float32, scaled as the block adds them).

    ``ids`` and ``weights`` list the routed slots, then the shared expert (id :data:`SHARED`, weight
    its gate, 1 without one); ``updates`` are what each writes into the residual stream, and
    ``rest`` what the FFN output holds beyond their sum (float rounding only).
    """

    layer: int
    ids: torch.Tensor  # [pos, part] long: routed expert of each slot, then SHARED
    weights: torch.Tensor  # [pos, part]: router weight of each slot (the shared expert's gate)
    updates: torch.Tensor  # [pos, part, d_model]
    rest: torch.Tensor  # [pos, d_model]: mlp_out − Σ updates
    n_routed: int  # slots per position (k)


@dataclass(frozen=True)
class ExpertNeurons:
    """Every neuron update of the experts that run at one position (float32)."""

    experts: torch.Tensor  # [part] long: the expert each neuron belongs to (SHARED for the shared expert)
    neurons: torch.Tensor  # [part] long: the neuron's index inside its expert
    activations: torch.Tensor  # [part]: the neuron's activation a[n]
    updates: torch.Tensor  # [part, d_model]: w · a[n] · W_down[e][:, n]
    bias: torch.Tensor  # [d_model]: the shared expert's output bias times its gate (zeros without)


def _routing(arch: Architecture, layer: int, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Run the layer's MoE module on ``x [pos, d_model]`` and record its routing and its shared expert."""
    moe = arch.family.experts
    if moe is None:
        raise LmscopeError(f"the {arch.family.name!r} family has no mixture of experts")
    block = arch.blocks[layer]
    seen: dict[str, torch.Tensor | None] = {"shared": None, "gate": None}

    def routed(module, args, kwargs):
        hidden, index, weights = (list(args) + list(kwargs.values()))[:3]
        seen.update(hidden=hidden, index=index, weights=weights)

    def keep(name: str):
        def hook(module, args, output):
            # copied: Llama 4 adds the routed experts' sum into its shared expert's output in place
            seen[name] = (output[0] if isinstance(output, tuple) else output).clone()

        return hook

    def scored(module, args, output):  # Llama 4's router: (scores [pos, expert], zero off the top-k; logits)
        scores, logits = output
        index = logits.topk(int(getattr(module, "top_k", arch.top_k)), dim=1).indices  # the router's own choice
        seen.update(hidden=args[0], index=index, weights=scores.gather(1, index))

    if moe.input_scaled:
        handles = [block.get_submodule(moe.router).register_forward_hook(scored)]
    else:
        handles = [block.get_submodule(moe.experts).register_forward_pre_hook(routed, with_kwargs=True)]
    if moe.shared:
        shared = block.get_submodule(moe.shared)
        handles.append(shared.register_forward_hook(keep("shared")))
    if moe.shared_gate:
        handles.append(block.get_submodule(moe.shared_gate).register_forward_hook(keep("gate")))
    weight = next(block.get_submodule(moe.experts).parameters())
    try:
        with torch.no_grad():
            block.get_submodule(arch.family.mlp_out)(x[None].to(weight.device, weight.dtype))
    finally:
        for handle in handles:
            handle.remove()
    if "index" not in seen:
        raise LmscopeError(
            f"layer {layer}: the experts module was not called as experts(x, top_k_index, top_k_weights)"
        )
    return seen


def expert_parts(trace: Trace, arch: Architecture, layer: int) -> ExpertParts | None:
    """The routed and shared experts' updates at layer ``layer`` (``None`` where its FFN is dense)."""
    experts = arch.experts(layer)
    if experts is None:
        return None
    x = trace.at("mlp_act", layer)  # [pos, d_model]: the FFN's input
    seen = _routing(arch, layer, x)
    hidden, index, weights = seen["hidden"], seen["index"], seen["weights"]
    n_pos, k = index.shape
    if arch.family.experts.input_scaled:
        updates = _input_scaled_slots(experts, arch.n_experts, hidden, index, weights)
    else:
        with torch.no_grad():  # every slot in one call: slot j of position q is row j·pos + q
            slots = experts(hidden.repeat(k, 1), index.T.reshape(-1, 1), weights.T.reshape(-1, 1).to(hidden.dtype))
        updates = slots.view(k, n_pos, -1).transpose(0, 1).float()  # [pos, slot, d_model]
    ids, gates = index.long(), weights.float()
    if seen["shared"] is not None:
        shared = seen["shared"].reshape(n_pos, -1).float()
        gate = torch.ones(n_pos, device=shared.device)
        if seen["gate"] is not None:
            gate = torch.sigmoid(seen["gate"].reshape(n_pos).float())
        updates = torch.cat([updates, (gate[:, None] * shared)[:, None]], dim=1)
        ids = torch.cat([ids, torch.full((n_pos, 1), SHARED, device=ids.device)], dim=1)
        gates = torch.cat([gates, gate[:, None]], dim=1)
    updates = updates.to(x.device) * arch.residual_scale
    rest = trace.at("mlp_out", layer).float() - updates.sum(1)
    return ExpertParts(trace.layers[trace.layer_index(layer)], ids.to(x.device), gates.to(x.device), updates, rest, k)


def _input_scaled_slots(
    experts: nn.Module, n_experts: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:  # [pos, slot, d_model]
    """Each slot's ``E_{i_j}(w_j · x)``, by the experts module as the model calls it (one scaled copy per expert)."""
    n_pos, k = index.shape
    rows = torch.arange(n_pos, device=hidden.device)
    slots = []
    with torch.no_grad():
        for j in range(k):
            routed = hidden.new_zeros(n_experts, n_pos, hidden.shape[-1])  # [expert, pos, d_model]
            routed[index[:, j], rows] = hidden * weights[:, j, None].to(hidden.dtype)
            slots.append(experts(routed.view(-1, hidden.shape[-1])).view(n_experts, n_pos, -1).sum(0))
    return torch.stack(slots, dim=1).float()


def expert_neurons(
    trace: Trace, arch: Architecture, layer: int, position: int, parts: ExpertParts | None = None
) -> ExpertNeurons:
    """The neuron updates of every expert that runs at ``position`` (routed slots, then the shared expert).

    ``parts`` (the layer's :func:`expert_parts`) saves running the router again when asking for
    several positions of one layer.
    """
    experts = arch.experts(layer)
    if experts is None:
        raise LmscopeError(f"layer {layer} has a dense FFN, not a mixture of experts")
    parts = parts or expert_parts(trace, arch, layer)
    q = trace.position(position)
    x = trace.at("mlp_act", layer)[q].float()  # [d_model]
    k = parts.n_routed
    index, weights = parts.ids[q, :k], parts.weights[q, :k]  # [slot]
    gate_up = experts.gate_up_proj.detach()[index.to(experts.gate_up_proj.device)].float()  # [slot, 2·neuron, d]
    down = experts.down_proj.detach()[index.to(experts.down_proj.device)].float()  # [slot, d_model, neuron]
    inputs = x.to(gate_up.device).expand(k, -1)  # [slot, d_model]
    if arch.family.experts.input_scaled:  # Llama 4: [slot, d_model, 2·neuron], [slot, neuron, d_model]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        inputs, weights = inputs * weights[:, None].to(inputs.device), torch.ones_like(weights)
    gate, up = (gate_up @ inputs[..., None])[..., 0].chunk(2, dim=-1)  # [slot, neuron]
    act = (experts.act_fn(gate) * up).to(x.device)  # [slot, neuron]
    scale = arch.residual_scale
    updates = weights[:, None, None] * act[:, :, None] * down.to(x.device).transpose(1, 2) * scale  # [slot, n, d]
    n_neurons = act.shape[1]
    ids = [index.repeat_interleave(n_neurons)]
    neurons = [torch.arange(n_neurons, device=x.device).repeat(k)]
    acts, vectors = [act.reshape(-1)], [updates.reshape(-1, updates.shape[-1])]
    bias = torch.zeros(updates.shape[-1], device=x.device)
    if parts.ids.shape[1] > k:  # the shared expert: an ordinary gated MLP, times its gate
        shared = arch.blocks[layer].get_submodule(arch.family.experts.shared)
        a, shared_down = dense_activations(arch, layer, x[None], shared)
        a, gate_value = a[0], parts.weights[q, k]
        weight = shared_down.weight.detach().float().to(x.device)  # [d_model, neuron]
        vectors.append(gate_value * a[:, None] * weight.T * scale)
        ids.append(torch.full((len(a),), SHARED, device=x.device))
        neurons.append(torch.arange(len(a), device=x.device))
        acts.append(a)
        if shared_down.bias is not None:
            bias = gate_value * shared_down.bias.detach().float().to(x.device) * scale
    return ExpertNeurons(torch.cat(ids), torch.cat(neurons), torch.cat(acts), torch.cat(vectors), bias)


def dense_activations(
    arch: Architecture, layer: int, x: torch.Tensor, mlp: nn.Module | None = None
) -> tuple[torch.Tensor, nn.Module]:
    """A gated MLP's activations ``[pos, neuron]`` (its down projection's input) on ``x``, and that projection.

    The MLP is a dense FFN layer of an MoE family (``x [pos, d_model]`` is the FFN's input, what
    ``mlp_act`` records for MoE families), or ``mlp``, e.g. a shared expert.
    """
    mlp = mlp if mlp is not None else arch.blocks[layer].get_submodule(arch.family.mlp_out)
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise LmscopeError(f"layer {layer}: the dense FFN has no down_proj whose input is its activations")
    seen: list[torch.Tensor] = []
    handle = down.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            mlp(x[None].to(down.weight.device, down.weight.dtype))
    finally:
        handle.remove()
    return seen[0][0].float().to(x.device), down
