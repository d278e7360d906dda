"""Fidelity of capture: the model computes under capture exactly what it computes without us."""

from __future__ import annotations

import pytest
import torch

import lmscope
from conftest import tiny
from lmscope import LmscopeError

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."


def plain_logits(lm: lmscope.LM, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(lm.encode(text)[None]).logits[0]


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_logits_equal_plain_hugging_face(any_family: lmscope.LM) -> None:
    out = any_family.trace(TEXT)
    torch.testing.assert_close(out.logits, plain_logits(any_family, TEXT), atol=1e-5, rtol=0)


def test_residual_decomposition(any_family: lmscope.LM) -> None:
    trace = any_family.trace(TEXT).trace
    pre, mid, post = trace.get("resid_pre"), trace.get("resid_mid"), trace.get("resid_post")
    attn, mlp = trace.get("attn_out"), trace.get("mlp_out")
    arch = any_family.arch
    if arch.family.post_norm:
        # BERT: each sublayer's update is added, then normalized.
        for layer in range(arch.n_layers):
            ln_attn = arch.block_part(layer, arch.family.ln_attn)
            ln_mlp = arch.block_part(layer, arch.family.ln_mlp)
            with torch.no_grad():
                torch.testing.assert_close(mid[layer], ln_attn(pre[layer] + attn[layer]), atol=1e-5, rtol=0)
                torch.testing.assert_close(post[layer], ln_mlp(mid[layer] + mlp[layer]), atol=1e-5, rtol=0)
        return
    torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=0)
    if arch.parallel:
        torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=0)
    # the residual stream runs from one block into the next
    torch.testing.assert_close(pre[1:], post[:-1], atol=0, rtol=0)


def test_attention_probs_match_eager_attention(any_family: lmscope.LM) -> None:
    trace = any_family.trace(TEXT).trace
    probs = trace.get("attn_probs")  # [layer, head, pos_q, pos_k]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    model = any_family.model
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            eager = model(any_family.encode(TEXT)[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    for layer, weights in enumerate(eager):
        torch.testing.assert_close(probs[layer], weights[0], atol=1e-5, rtol=0)


def test_mlp_act_times_output_projection_is_mlp_out(any_family: lmscope.LM) -> None:
    trace = any_family.trace(TEXT).trace
    arch = any_family.arch
    for layer in range(arch.n_layers):
        down = arch.mlp_down(layer)
        weight = arch.linear_weight(down)  # [d_model, neuron]
        bias = down.bias if down.bias is not None else 0
        expected = trace.at("mlp_act", layer) @ weight.T + bias
        if arch.family.mlp_out == arch.family.mlp_down or arch.family.mlp_out.endswith("mlp"):
            torch.testing.assert_close(expected, trace.at("mlp_out", layer), atol=1e-5, rtol=0)


def test_value_vectors_have_kv_head_shape(any_family: lmscope.LM) -> None:
    trace = any_family.trace(TEXT).trace
    arch = any_family.arch
    assert trace.get("v").shape == (arch.n_layers, trace.n_pos, arch.n_kv_heads, arch.d_head)
    assert trace.get("mlp_act").shape[:2] == (arch.n_layers, trace.n_pos)


def test_no_hooks_left_and_model_unchanged(any_family: lmscope.LM) -> None:
    model = any_family.model
    before_hooks = hook_count(model)
    before_attn = model.config._attn_implementation
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    any_family.trace(TEXT, sites=lmscope.capture.ALL_SITES)
    assert hook_count(model) == before_hooks
    assert model.config._attn_implementation == before_attn
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key


def test_hooks_removed_after_an_exception_inside_capture() -> None:
    lm = tiny("llama")
    model = lm.model
    before = hook_count(model)

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = lm.arch.blocks[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            lm.trace(TEXT)
    finally:
        handle.remove()
    assert hook_count(model) == before
    assert model.config._attn_implementation == "sdpa"
    # and the model still runs normally afterwards
    torch.testing.assert_close(lm.trace(TEXT).logits, plain_logits(lm, TEXT), atol=1e-5, rtol=0)


def test_selected_sites_and_layers_only() -> None:
    lm = tiny("qwen2")
    trace = lm.trace(TEXT, sites=["resid_post", "attn_probs"], layers=[0, 2]).trace
    # attention probabilities are computed on demand from the queries and keys the trace keeps
    assert set(trace.sites) == {"resid_post", "attn_probs", "q", "k"}
    assert trace.layers == (0, 2)
    assert trace.get("resid_post").shape[0] == 2
    full = lm.trace(TEXT).trace
    torch.testing.assert_close(trace.at("resid_post", 2), full.at("resid_post", 2), atol=0, rtol=0)
    with pytest.raises(LmscopeError, match="did not capture 'mlp_act'"):
        trace.get("mlp_act")
    with pytest.raises(LmscopeError, match="not captured"):
        trace.at("resid_post", 1)


def test_resid_mid_alone_is_derived_but_not_stored() -> None:
    trace = tiny("llama").trace(TEXT, sites=["resid_mid"]).trace
    assert trace.sites == ("resid_mid",)


def test_queries_and_keys_reproduce_attention() -> None:
    lm = tiny("llama")
    trace = lm.trace(TEXT, sites=["q", "k", "attn_probs"]).trace
    q, k = trace.at("q", 1), trace.at("k", 1)  # [pos, head, d_head], [pos, kv_head, d_head]
    k = k.repeat_interleave(lm.arch.n_heads // lm.arch.n_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / lm.arch.d_head**0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), trace.at("attn_probs", 1), atol=1e-5, rtol=0)


def test_greedy_generate_matches_hugging_face(causal_family: lmscope.LM) -> None:
    lm = causal_family
    out = lm.generate("Once upon a time", generate=5)
    ids = lm.encode("Once upon a time")[None]
    with torch.no_grad():
        reference = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=lm.tokenizer.eos_token_id,
        )[0]
    assert out.token_ids.tolist() == reference.tolist()
    assert out.n_input == ids.shape[1]
    assert out.trace.n_pos == len(reference)
    # every generated token, the last included, has its internals
    assert out.trace.get("resid_post").shape[1] == len(reference)


def test_sampling_is_seeded() -> None:
    lm = tiny("gpt2")
    a = lm.generate("Hello", generate=4, do_sample=True, top_k=50, seed=3)
    b = lm.generate("Hello", generate=4, do_sample=True, top_k=50, seed=3)
    assert a.token_ids.tolist() == b.token_ids.tolist()


def test_empty_and_too_long_text_are_clear_errors() -> None:
    lm = tiny("llama")
    with pytest.raises(LmscopeError, match="empty"):
        lm.trace("   ")
    with pytest.raises(LmscopeError, match="more than tiny-llama's context of 1024"):
        lm.trace("word " * 1500)
    with pytest.raises(LmscopeError, match="position 99 is out of range"):
        lm.trace("short text").layer_predictions(position=99)
    with pytest.raises(LmscopeError, match="unknown site"):
        lm.trace("short text", sites=["resid_middle"])
    with pytest.raises(LmscopeError, match="layer 7 is out of range"):
        lm.trace("short text", layers=[7])


def test_masked_lm_headless_model_has_no_logits_but_captures() -> None:
    lm = lmscope.from_pretrained("minilm-l6")
    out = lm.trace("The cat sat on the mat.")
    assert "logits" not in out.trace.tensors
    assert out.trace.get("attn_probs").shape[:2] == (6, 12)
    with pytest.raises(LmscopeError, match="no language-model head"):
        out.layer_predictions()


def test_overflow_in_half_precision_is_a_clear_error() -> None:
    lm = lmscope.from_pretrained("tiny-llama", dtype="float16")  # a fresh copy: the shared one stays intact
    with torch.no_grad():
        lm.arch.block_part(1, lm.arch.family.mlp_down).weight.fill_(6e4)  # float16 tops out at 65,504
    with pytest.raises(LmscopeError, match=r"float16 produced NaN or infinite values \(first in mlp_out of layer 1\)"):
        lm.trace(TEXT)
    with pytest.raises(LmscopeError, match="dtype='float32' or 'bfloat16'"):
        lm.trace(TEXT, sites=["resid_post"])


def test_resid_pre_and_resid_post_share_memory_only_while_equal() -> None:
    """resid_pre of block i+1 is resid_post of block i: one buffer holds both, unless the stream changes."""
    lm = tiny("llama")
    trace = lm.trace(TEXT).trace
    pre, post = trace.get("resid_pre"), trace.get("resid_post")
    assert pre.untyped_storage().data_ptr() == post.untyped_storage().data_ptr()
    assert torch.equal(pre[1:], post[:-1])
    held = sum(t.numel() * t.element_size() for t in trace.tensors.values())
    assert trace.nbytes() == held - post[:-1].numel() * post.element_size()

    block = lm.loaded.arch.blocks[1]
    handle = block.register_forward_pre_hook(lambda module, args, kwargs: ((args[0] + 1.0, *args[1:]), kwargs),
                                             with_kwargs=True)  # fmt: skip
    try:
        changed = lm.trace(TEXT).trace
    finally:
        handle.remove()
    pre, post = changed.get("resid_pre"), changed.get("resid_post")
    assert pre.untyped_storage().data_ptr() != post.untyped_storage().data_ptr()
    torch.testing.assert_close(pre[1], post[0] + 1.0, rtol=0, atol=0)
    assert torch.equal(pre[2:], post[1:-1])
    torch.testing.assert_close(changed.get("resid_mid"), pre + changed.get("attn_out"), rtol=0, atol=0)
