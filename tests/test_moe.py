"""Mixtures of experts as components: each routed expert (router weight × expert output) and each shared
expert is a part of the FFN block output; the parts sum to it, and each share equals the one computed by
hand from the router's weights and the experts' outputs (issue 18)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis._contributions import block_contributions
from lmscope.analysis._experts import SHARED, expert_neurons, expert_parts
from lmscope.analysis.components import top_neurons, update_vector
from lmscope.models import family_of
from lmscope.models._tiny import TINY_FAMILIES

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_probs", "v", "mlp_act")
HAND = ("mixtral", "deepseek_v3", "deepseek_v2", "qwen2_moe")


@functools.cache
def traced(name: str) -> lmscope.Output:
    return tiny(name).trace(TEXT, sites=list(SITES))


def _moe_layers(lm: lmscope.LM) -> list[int]:
    return [layer for layer in range(lm.arch.n_layers) if lm.arch.experts(layer) is not None]


def _expert(experts: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """``E_e(x) = W_down[e] · (silu(W_gate[e] x) * W_up[e] x)`` from the fused 3-D weights, by hand."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def _router_by_hand(name: str, lm: lmscope.LM, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids, router weights) ``[pos, k]`` from the router's weights and the config, by hand."""
    config, mlp = lm.model.config, lm.arch.blocks[layer].mlp
    k = config.num_experts_per_tok
    logits = x @ mlp.gate.weight.T  # [pos, expert]
    if name == "deepseek_v3":  # sigmoid scores, group-limited choice, renormalized, scaled
        scores = logits.sigmoid()
        choice = scores + mlp.gate.e_score_correction_bias
        groups = choice.view(len(x), config.n_group, -1)
        best = groups.topk(2, dim=-1).values.sum(-1).topk(config.topk_group, dim=-1).indices  # [pos, topk_group]
        allowed = torch.zeros_like(groups[..., 0]).scatter(1, best, 1).bool()  # [pos, group]
        choice = choice.masked_fill(~allowed.repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) if config.norm_topk_prob else weights
        return ids, weights * config.routed_scaling_factor
    probs = logits.softmax(-1)
    weights, ids = probs.topk(k, dim=-1)
    if name == "mixtral" or getattr(config, "norm_topk_prob", False):
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * getattr(config, "routed_scaling_factor", 1.0)


def _l1_shares(parts: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``max(‖y‖₁ − ‖y − z_i‖₁, 0)`` normalized over the parts ``[part, d]`` (Ferrando & Voita 2024), by hand."""
    prox = (whole.abs().sum() - (whole - parts).abs().sum(-1)).clamp_min(0)
    return prox / prox.sum()


@pytest.mark.parametrize("name", HAND)
def test_expert_contributions_sum_to_the_block_output_and_equal_the_hand_computed_shares(name: str) -> None:
    lm, trace = tiny(name), traced(name).trace
    arch = lm.arch
    layers = _moe_layers(lm)
    assert layers and arch.n_experts >= 4 and arch.top_k == 2
    for layer in layers:
        parts = expert_parts(trace, arch, layer)
        mlp_out = trace.at("mlp_out", layer)
        # the experts' updates sum to the FFN output (up to float rounding) ...
        torch.testing.assert_close(parts.updates.sum(1), mlp_out, atol=1e-5, rtol=0)
        c = block_contributions(trace, arch, layer)
        # ... and the experts' contributions and the residual's sum to 1 at every position
        torch.testing.assert_close(c.experts.sum(-1) + c.mlp_residual, torch.ones(trace.n_pos))
        torch.testing.assert_close(c.mlp, c.experts.sum(-1))
        x = trace.at("mlp_act", layer)  # the FFN's input
        with torch.no_grad():
            torch.testing.assert_close(x, arch.blocks[layer].post_attention_layernorm(trace.at("resid_mid", layer)))
            ids, weights = _router_by_hand(name, lm, layer, x)
            experts = arch.experts(layer)
            for q in range(trace.n_pos):
                routed = dict(zip(ids[q].tolist(), weights[q].tolist(), strict=True))
                chosen = dict(zip(parts.ids[q, :2].tolist(), parts.weights[q, :2].tolist(), strict=True))
                assert chosen == pytest.approx(routed)
                hand = [w * _expert(experts, e, x[q]) for e, w in zip(ids[q].tolist(), weights[q], strict=True)]
                mlp = arch.blocks[layer].mlp
                if getattr(mlp, "shared_experts", None) is not None:  # DeepSeek: ungated
                    hand.append(mlp.shared_experts(x[q][None])[0])
                elif getattr(mlp, "shared_expert", None) is not None:  # Qwen2-MoE: a sigmoid gate
                    hand.append(torch.sigmoid(mlp.shared_expert_gate(x[q])) * mlp.shared_expert(x[q][None])[0])
                post = trace.at("resid_post", layer)[q]
                whole = torch.stack(hand)
                shares = _l1_shares(torch.cat([whole, (post - whole.sum(0))[None]]), post)
                order = [ids[q].tolist().index(e) if e != SHARED else len(hand) - 1 for e in parts.ids[q].tolist()]
                torch.testing.assert_close(c.experts[q], shares[order], atol=2e-5, rtol=0)
                torch.testing.assert_close(c.mlp_residual[q], shares[-1], atol=2e-5, rtol=0)
                assert (parts.ids[q] == SHARED).sum() == (len(hand) - 2)


@pytest.mark.parametrize("name", ("mixtral", "deepseek_v3"))
def test_flow_graph_ffn_edges_carry_the_router_choice_and_expert_shares(name: str) -> None:
    lm, out = tiny(name), traced(name)
    graph = out.flow(threshold=0.01, position=None)
    moe = set(_moe_layers(lm))
    ffn = [e for e in graph.edges if e.kind == "ffn"]
    assert ffn
    parts = {layer: expert_parts(out.trace, lm.arch, layer) for layer in moe}
    contributions = {layer: block_contributions(out.trace, lm.arch, layer) for layer in moe}
    for edge in ffn:
        if edge.layer not in moe:  # DeepSeek's dense first layer: one FFN component
            assert edge.experts is None
            continue
        q, routed = edge.target.pos, parts[edge.layer]
        ran = dict(zip(routed.ids[q].tolist(), routed.weights[q].tolist(), strict=True))
        assert {x.expert: x.router_weight for x in edge.experts} == pytest.approx(ran)
        assert sum(x.share for x in edge.experts) == pytest.approx(1, abs=1e-5)
        assert edge.weight == pytest.approx(float(contributions[edge.layer].mlp[q]), abs=1e-6)
    # the view and the JSON carry the experts
    json.dumps(graph.to_dict())
    html, text = graph.to_html(), str(graph)
    assert "experts (router" in html and "top heads / experts" in text


def test_renormalize_mode_keeps_expert_shares_summing_to_one() -> None:
    graph = traced("mixtral").flow(threshold=0.1, mode="renormalize", position=None)
    for edge in (e for e in graph.edges if e.kind == "ffn"):
        assert sum(x.share for x in edge.experts) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("name", ("mixtral", "qwen2_moe", "deepseek_v2", "granitemoe", "llama4"))
def test_top_neurons_per_expert_and_expert_updates(name: str) -> None:
    lm, out = tiny(name), traced(name)
    trace, arch = out.trace, lm.arch
    layer, q = _moe_layers(lm)[-1], trace.n_pos - 1
    parts = expert_parts(trace, arch, layer)
    neurons = expert_neurons(trace, arch, layer, q)
    for j, expert in enumerate(parts.ids[q].tolist()):
        mine = neurons.experts == expert
        torch.testing.assert_close(neurons.updates[mine].sum(0), parts.updates[q, j], atol=1e-5, rtol=0)
        torch.testing.assert_close(update_vector(trace, arch, layer, q, expert=expert), parts.updates[q, j])
        first = update_vector(trace, arch, layer, q, expert=expert, neuron=0)
        torch.testing.assert_close(first, neurons.updates[mine][0])
    top = top_neurons(trace, arch, layer, q, topk=5)
    assert top.experts is not None and set(top.experts.tolist()) <= set(parts.ids[q].tolist())
    assert "expert" in str(top)
    idle = next(e for e in range(arch.n_experts) if e not in parts.ids[q].tolist())
    with pytest.raises(LmscopeError, match=f"expert {idle} did not run at position {q}"):
        update_vector(trace, arch, layer, q, expert=idle)
    label = out.promoted_tokens(layer, q, expert=int(parts.ids[q, 0])).component
    assert label == f"ffn expert {int(parts.ids[q, 0])}"


def test_llama4_experts_scale_their_input_and_sum_with_the_shared_expert() -> None:
    """Llama 4: slot ``j`` writes ``E_{i_j}(w_j · x)``, ``w = sigmoid(top-k router logits)``, plus a shared expert."""
    lm, trace = tiny("llama4"), traced("llama4").trace
    arch = lm.arch
    assert _moe_layers(lm) == [0, 2]
    for layer in _moe_layers(lm):
        parts = expert_parts(trace, arch, layer)
        x = trace.at("mlp_act", layer)  # [pos, d_model]
        moe = arch.blocks[layer].feed_forward
        with torch.no_grad():
            top = (x @ moe.router.weight.T).topk(2, dim=-1)
            ids, weights = top.indices, torch.sigmoid(top.values)
            experts = moe.experts
            for q in range(trace.n_pos):
                assert parts.ids[q, :2].tolist() == ids[q].tolist() and parts.ids[q, 2] == SHARED
                torch.testing.assert_close(parts.weights[q, :2], weights[q])
                for j, e in enumerate(ids[q].tolist()):
                    gate, up = (weights[q, j] * x[q] @ experts.gate_up_proj[e]).chunk(2, dim=-1)
                    hand = (F.silu(gate) * up) @ experts.down_proj[e]
                    torch.testing.assert_close(parts.updates[q, j], hand, atol=1e-5, rtol=0)
                torch.testing.assert_close(parts.updates[q, 2], moe.shared_expert(x[q][None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(parts.updates.sum(1), trace.at("mlp_out", layer), atol=1e-5, rtol=0)


def test_dense_layer_of_an_moe_family_is_one_component() -> None:
    lm, out = tiny("deepseek_v2"), traced("deepseek_v2")
    assert lm.arch.experts(0) is None and expert_parts(out.trace, lm.arch, 0) is None
    assert block_contributions(out.trace, lm.arch, 0).experts is None
    top = top_neurons(out.trace, lm.arch, 0, -1, topk=3)
    assert top.experts is None and len(top.neurons) == 3
    with pytest.raises(LmscopeError, match="dense FFN"):
        update_vector(out.trace, lm.arch, 0, -1, expert=0)


def test_quantized_experts_are_named_and_other_analyses_offered() -> None:
    lm = lmscope.from_pretrained("tiny-mixtral")  # a fresh copy: its expert weights are changed below
    out = lm.trace(TEXT)
    experts = lm.arch.experts(0)
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(
        LmscopeError, match=r"weights are quantized .*MixtralExperts holds Parameter.* the logit lens"
    ) as e:
        out.flow()
    assert "\n" not in str(e.value)
    assert out.layer_predictions(position=-1).tokens  # the lens does not read those weights


MOE = tuple(name for name, (model_type, _, _) in TINY_FAMILIES.items() if family_of(model_type).experts is not None)


@pytest.mark.parametrize("name", MOE)
def test_every_moe_family_splits_its_ffn_into_experts(name: str) -> None:
    """Every mixture-of-experts type in the table: experts' updates sum to the FFN output, shares to 1."""
    lm, trace = tiny(name), traced(name).trace
    layers = _moe_layers(lm)
    assert layers and lm.arch.top_k >= 1
    for layer in layers:
        parts = expert_parts(trace, lm.arch, layer)
        assert parts.n_routed == lm.arch.top_k and bool((parts.ids[:, : parts.n_routed] < lm.arch.n_experts).all())
        torch.testing.assert_close(parts.updates.sum(1), trace.at("mlp_out", layer), atol=1e-5, rtol=0)
        c = block_contributions(trace, lm.arch, layer)
        torch.testing.assert_close(c.experts.sum(-1) + c.mlp_residual, torch.ones(trace.n_pos))
