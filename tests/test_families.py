"""Every model type in the architecture table, verified on its seeded tiny model (issue 18).

For each family: logits under capture equal the plain Hugging Face forward (fp32, max abs diff ≤
1e-5); the residual stream decomposes as the family says; the final-layer lens is the model's own
distribution; attention probabilities equal eager attention's; block contributions sum to block
outputs where blocks are sums of parts (and the flow graph refuses clearly where they are not);
batched saliency equals the per-token loop; greedy generation equals ``model.generate``; fused
projections split into the pieces the model computes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import lens_logits
from lmscope.analysis._contributions import attention_parts, block_contributions, check_decomposable
from lmscope.analysis.components import update_vector
from lmscope.models import FAMILIES, UNSUPPORTED, family_of
from lmscope.models._tiny import TINY_FAMILIES
from test_attention import eager_attentions, neuron_scores_of
from test_saliency import assert_equal_to_loop, loop_gradients

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."
ALL = tuple(TINY_FAMILIES)
CAUSAL = tuple(name for name, (_, masked, _) in TINY_FAMILIES.items() if not masked)
# state-space models (Mamba) have no attention: tests/test_mamba.py checks their capture
ATTENTION = tuple(name for name in ALL if family_of(TINY_FAMILIES[name][0]).attn is not None)
ATOL = 1e-5


@functools.cache
def traced(name: str) -> tuple[lmscope.Output, torch.Tensor]:
    """The capture of every site, and the plain Hugging Face logits ``[pos, vocab]`` for the same ids."""
    lm = tiny(name)
    out = lm.trace(TEXT, sites=lmscope.capture.ALL_SITES)
    with torch.no_grad():
        logits = lm.model(out.token_ids[None]).logits[0]
    return out, logits


def test_every_model_type_in_the_table_has_a_tiny_model_and_is_counted() -> None:
    in_table = {t for f in FAMILIES if f.encoder is None for t in f.model_types}
    verified = {model_type for model_type, _, _ in TINY_FAMILIES.values()}
    assert in_table == verified, in_table ^ verified  # encoder-decoder types: tests/test_seq2seq.py
    assert not in_table & set(UNSUPPORTED)
    print(f"\nverified model types: {len(verified)} ({', '.join(sorted(verified))})")
    state_space = sorted(t for f in FAMILIES if f.attn is None for t in f.model_types)
    print(f"of which without attention (lens, rankings, saliency, activations): {', '.join(state_space)}")


@pytest.mark.parametrize("name", ATTENTION)
def test_capture_is_faithful(name: str) -> None:
    out, logits = traced(name)
    lm, trace = tiny(name), out.trace
    assert lm.model.config.model_type == TINY_FAMILIES[name][0]
    assert (out.logits - logits).abs().max() <= ATOL
    # the residual stream: block to block, and within each block as the family says
    pre, mid, post = trace.get("resid_pre"), trace.get("resid_mid"), trace.get("resid_post")
    attn, mlp = trace.get("attn_out"), trace.get("mlp_out")
    torch.testing.assert_close(pre[1:], post[:-1], atol=0, rtol=0)
    arch = lm.arch
    if arch.family.post_norm:
        for layer in range(arch.n_layers):
            ln_attn = arch.block_part(layer, arch.family.ln_attn)
            ln_mlp = arch.block_part(layer, arch.family.ln_mlp)
            with torch.no_grad():
                torch.testing.assert_close(mid[layer], ln_attn(pre[layer] + attn[layer]), atol=ATOL, rtol=0)
                torch.testing.assert_close(post[layer], ln_mlp(mid[layer] + mlp[layer]), atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(mid, pre + attn, atol=ATOL, rtol=0)
        torch.testing.assert_close(post, (pre + attn if arch.parallel else mid) + mlp, atol=ATOL, rtol=0)
    # the final-layer lens is the model's own distribution
    lens = torch.softmax(lens_logits(trace, lm.unembed)[-1], dim=-1)
    torch.testing.assert_close(lens, torch.softmax(logits, dim=-1), atol=1e-6, rtol=1e-4)
    # mlp_act is the input of the MLP's output projection (a mixture of experts: the FFN's input)
    if arch.family.experts is not None:
        with torch.no_grad():
            normed = arch.block_part(0, arch.family.ln_mlp)(mid[0])
        torch.testing.assert_close(trace.at("mlp_act", 0), normed, atol=ATOL, rtol=0)
    elif arch.family.mlp_out in (arch.family.mlp_down, "mlp"):
        down = arch.mlp_down(0)
        weight = arch.linear_weight(down)
        bias = down.bias if down.bias is not None else 0
        expected = (trace.at("mlp_act", 0) @ weight.T + bias) * arch.residual_scale
        torch.testing.assert_close(expected, trace.at("mlp_out", 0), atol=ATOL, rtol=0)
    assert trace.at("v", 0).shape[1:] == (arch.n_kv_heads, arch.d_head)


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_probabilities_equal_eager_attention(name: str) -> None:
    out, _ = traced(name)
    lm = tiny(name)
    if lm.arch.family.eager_differs:  # tests/test_falcon.py checks Falcon against its definition
        pytest.skip(f"transformers' eager {name} {lm.arch.family.eager_differs}")
    probs = out.trace.get("attn_probs")  # [layer, head, pos_q, pos_k]
    assert probs.shape[1] == lm.arch.n_heads
    original = lm.model.config._attn_implementation
    try:
        lm.model.set_attn_implementation("eager")
        with torch.no_grad():
            eager = lm.model(out.token_ids[None], output_attentions=True).attentions
    finally:
        lm.model.set_attn_implementation(original)
    for layer, weights in enumerate(eager):
        torch.testing.assert_close(probs[layer], weights[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", [name for name in CAUSAL if name in ATTENTION])
def test_block_contributions_sum_to_block_outputs(name: str) -> None:
    out, _ = traced(name)
    lm, trace = tiny(name), out.trace
    arch = lm.arch
    if arch.family.attn_out not in (arch.family.attn, arch.family.o_proj):
        # sublayer outputs are normalized before they join the residual: not a sum of parts
        with pytest.raises(LmscopeError, match="cannot be split into per-head and per-neuron parts"):
            check_decomposable(arch)
        return
    for layer in trace.layers:
        for q in (0, trace.n_pos - 1):
            parts = attention_parts(trace, arch, layer, q)
            total = parts.terms.sum((0, 1)) + parts.bias + parts.residual
            scale = parts.whole.abs().max()
            torch.testing.assert_close(total / scale, parts.whole / scale, atol=1e-4, rtol=0)
            torch.testing.assert_close(parts.whole, trace.at("resid_mid", layer)[q], atol=ATOL, rtol=0)
        # per-head and per-neuron updates add up to what the sublayers write (scaled as the block scales them)
        q = trace.n_pos - 1
        heads = sum(update_vector(trace, arch, layer, q, "attention", head=h) for h in range(arch.n_heads))
        o_bias = arch.o_proj(layer).bias
        heads = heads + (0 if o_bias is None else o_bias.detach() * arch.residual_scale)
        torch.testing.assert_close(heads, trace.at("attn_out", layer)[q], atol=1e-4, rtol=0)
        if arch.family.mlp_out in (arch.family.mlp_down, "mlp") and arch.family.experts is None:
            n = trace.at("mlp_act", layer).shape[-1]
            neurons = sum(update_vector(trace, arch, layer, q, "ffn", neuron=i) for i in range(n))
            d_bias = arch.mlp_down(layer).bias
            neurons = neurons + (0 if d_bias is None else d_bias.detach() * arch.residual_scale)
            torch.testing.assert_close(neurons, trace.at("mlp_out", layer)[q], atol=1e-4, rtol=0)
        c = block_contributions(trace, arch, layer)
        attention = c.attention.sum((1, 2)) + c.attn_residual + c.bias
        ones = torch.ones(trace.n_pos)
        if arch.parallel:
            torch.testing.assert_close(attention + c.mlp, ones)
        else:
            torch.testing.assert_close(attention, ones)
            torch.testing.assert_close(c.mlp + c.mlp_residual, ones)


@pytest.mark.parametrize("name", CAUSAL)
def test_generation_and_saliency_equal_the_references(name: str) -> None:
    lm = tiny(name)
    prompt = "The keys to the cabinet"
    out = lm.generate(prompt, generate=3)
    ids = lm.encode(prompt)[None]
    with torch.no_grad():
        reference = lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0
        )[0]
    assert out.token_ids.tolist() == reference.tolist()
    positions = range(out.n_input, len(out.tokens))
    assert_equal_to_loop(out.saliency(), loop_gradients(lm, out.token_ids, positions), "grad_x_input")


FUSED = [(name, f.path) for name in ALL for f in family_of(TINY_FAMILIES[name][0]).fused]


@pytest.mark.parametrize(("name", "path"), FUSED)
def test_fused_projections_split_into_what_the_model_computes(name: str, path: str) -> None:
    lm = tiny(name)
    arch, family = lm.arch, lm.arch.family
    seen: dict[str, torch.Tensor] = {}  # the fused projection's input
    handles = [arch.block_part(0, path).register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))]
    try:
        out = lm.trace(TEXT, sites=["v", "mlp_act"], layers=[0])
    finally:
        for handle in handles:
            handle.remove()
    parts = arch.split(0, path)
    fused = next(f for f in family.fused if f.path == path)

    def project(part: str, x: torch.Tensor) -> torch.Tensor:
        bias = parts.get(part + ".bias")
        return x @ parts[part].T + (0 if bias is None else bias)

    with torch.no_grad():
        if "v" in fused.parts:
            v = project("v", seen["x"][0])  # [pos, kv_head·d_head]
            torch.testing.assert_close(v.view(v.shape[0], arch.n_kv_heads, -1), out.trace.at("v", 0), atol=ATOL, rtol=0)
            assert parts["q"].shape[0] == arch.n_heads * arch.d_head
        else:
            mlp = arch.block_part(0, path.rpartition(".")[0])
            act = getattr(mlp, "activation_fn", None) or getattr(mlp, "act_fn", None) or mlp.act
            x = seen["x"][0]
            expected = act(project("gate", x)) * project("up", x)
            torch.testing.assert_close(expected, out.trace.at("mlp_act", 0), atol=ATOL, rtol=0)


OWN_ATTENTION = tuple(
    name
    for name in CAUSAL
    if family_of(TINY_FAMILIES[name][0]).qkv and not family_of(TINY_FAMILIES[name][0]).eager_differs
)


@pytest.mark.parametrize("name", OWN_ATTENTION)
def test_neuron_view_of_a_module_with_its_own_attention(name: str) -> None:
    """GPT-Neo (unscaled scores, local layers), XGLM, BLOOM and MPT (ALiBi): q, k and bias reproduce eager attention."""
    lm = tiny(name)
    result = lm.trace(TEXT).attention(view="neuron")
    eager = eager_attentions(lm, TEXT).numpy()
    for layer in result.layers:
        for head in range(lm.arch.n_heads):
            for query in range(len(result.tokens)):
                scores = neuron_scores_of(result, layer, head, query)
                np.testing.assert_allclose(scores.probs, eager[layer, head, query], atol=2e-6, rtol=0)


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_model_types_say_why(model_type: str) -> None:
    with pytest.raises(LmscopeError, match=rf"unsupported architecture '{model_type}': .+"):
        family_of(model_type)


def test_neuron_view_of_disentangled_attention() -> None:
    """DeBERTa-v2: its relative-position (c2p, p2c) term, recorded as ``position_bias``, and scaling ``1/√(3d)``."""
    lm = tiny("deberta-v2")
    result = lm.trace(TEXT).attention(view="neuron")
    eager = eager_attentions(lm, TEXT).numpy()
    assert result.layers == (0, 1, 2) or list(result.layers) == [0, 1, 2]
    for layer in result.layers:
        for head in range(lm.arch.n_heads):
            for query in range(len(result.tokens)):
                scores = neuron_scores_of(result, layer, head, query)
                np.testing.assert_allclose(scores.probs, eager[layer, head, query], atol=2e-6, rtol=0)


def test_mpt_with_clipped_qkv_and_a_scaling_of_its_own() -> None:
    """MPT's ``clip_qkv`` clamps q, k and v, and ``softmax_scale`` replaces ``1/√d``: both read from the module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mpt", d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=300, max_seq_len=64,
        attn_config={"clip_qkv": 0.05, "softmax_scale": 0.8},
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    lm = lmscope.wrap(model, tiny("mpt").tokenizer)
    ids = torch.arange(3, 15)
    out = lm.trace(ids, sites=["attn_probs", "q", "k", "v", "position_bias", "attn_out"])
    trace, arch = out.trace, lm.arch
    assert trace.attn_scaling == (0.8, 0.8) and float(trace.get("v").abs().max()) <= 0.05 + 1e-7
    for layer in range(arch.n_layers):
        q, k = trace.at("q", layer).transpose(0, 1), trace.at("k", layer).transpose(0, 1)  # [head, pos, d_head]
        scores = q @ k.transpose(-1, -2) * 0.8 + trace.at("position_bias", layer)
        scores = scores.masked_fill(torch.ones(len(ids), len(ids), dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(torch.softmax(scores, -1), trace.attention(layer), atol=ATOL, rtol=0)
        values = trace.at("v", layer).transpose(0, 1)  # [head, pos, d_head]
        mixed = (trace.attention(layer) @ values).transpose(0, 1).reshape(len(ids), -1)
        with torch.no_grad():
            torch.testing.assert_close(arch.o_proj(layer)(mixed), trace.at("attn_out", layer), atol=ATOL, rtol=0)
