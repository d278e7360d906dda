"""Attention maps against the model's own eager attention and straightforward references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmscope
from conftest import FAMILIES, tiny
from lmscope import LmscopeError
from lmscope.analysis.attention import (
    attention,
    auto_top_k,
    neuron_scores,
    neuron_scores_of,
    sparsify,
)
from lmscope.cli import main
from lmscope.views.attention import SCALE, view_data

# 25+ tokens, so mistral's sliding window of 16 masks keys
TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill, and the cat sat on the mat all day long."


def eager_attentions(lm: lmscope.LM, text: str, text_pair: str | None = None) -> torch.Tensor:
    """The model's own attention weights ``[layer, head, pos_q, pos_k]`` from its eager implementation."""
    encoding = lm.tokenizer(text, text_pair, return_tensors="pt")
    model = lm.model
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(**encoding, output_attentions=True)
    finally:
        model.set_attn_implementation(original)
    return torch.stack([a[0] for a in out.attentions])


def reference_mask(lm: lmscope.LM, n: int) -> np.ndarray:
    """Which keys each query may see: causal (plus a sliding window) for decoders, all for encoders."""
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    if lm.arch.family.post_norm:  # BERT, RoBERTa: bidirectional
        return np.ones((n, n), dtype=bool)
    window = getattr(lm.model.config, "sliding_window", None) or n
    return (k <= q) & (k > q - window)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_weights_and_view_data_equal_eager_attention(family: str) -> None:
    lm = tiny(family)
    result = lm.trace(TEXT).attention()
    eager = eager_attentions(lm, TEXT).numpy()
    assert result.weights.shape == eager.shape == (3, 4, len(result.tokens), len(result.tokens))
    np.testing.assert_allclose(result.weights, eager, atol=1e-5, rtol=0)
    # what the page draws, decoded, is the same weights to the shipped precision
    data = view_data(result)
    assert data["top_k"] is None and data["k"] == len(result.tokens)
    decoded = np.array([[m["w"] for m in layer] for layer in data["maps"]], dtype=float) / SCALE
    np.testing.assert_allclose(decoded.reshape(eager.shape), eager, atol=0.5 / SCALE + 1e-7, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_view_softmax_reproduces_eager_weights(family: str) -> None:
    """RoPE (llama, qwen2, mistral, gemma, phi, neox), GQA, OPT's pre-scaled queries, GPT-2, BERT."""
    lm = tiny(family)
    result = lm.trace(TEXT).attention(view="neuron")  # re-captures q and k on the same tokens
    eager = eager_attentions(lm, TEXT).numpy()
    n = len(result.tokens)
    mask = reference_mask(lm, n)
    groups = lm.arch.n_heads // lm.arch.n_kv_heads
    for layer in result.layers:
        for head in range(lm.arch.n_heads):
            for query in range(n):
                scores = neuron_scores_of(result, layer, head, query)
                assert scores.kv_head == head // groups
                np.testing.assert_array_equal(scores.visible, mask[query])
                np.testing.assert_allclose(scores.probs, eager[layer, head, query], atol=2e-6, rtol=0)
                # the displayed pieces compose: score = Σ products · scaling
                np.testing.assert_allclose(
                    scores.scores, scores.products.sum(-1) * scores.scaling, rtol=1e-5, atol=1e-6
                )
                np.testing.assert_allclose(scores.products, scores.query_vector * scores.keys, rtol=1e-6)


def test_scaling_is_what_the_attention_function_applies() -> None:
    assert tiny("llama").trace("hi there", sites=["q", "k"]).trace.attn_scaling == (0.25, 0.25, 0.25)
    # OPT scales the query inside its projection step and calls attention with scaling 1.0
    assert tiny("opt").trace("hi there", sites=["attn_probs"]).trace.attn_scaling == (1.0, 1.0, 1.0)
    assert tiny("llama").trace("hi there", sites=["resid_post"]).trace.attn_scaling == ()


@pytest.mark.embedded
def test_neuron_view_on_the_embedded_model(embedded: lmscope.LM) -> None:
    layers = [0, 13, 29]
    trace = embedded.trace(TEXT, sites=["q", "k", "attn_probs"], layers=layers).trace
    eager = eager_attentions(embedded, TEXT).numpy()
    assert trace.get("k").shape[2] == 3  # 9 query heads share 3 key/value heads
    for layer in layers:
        for head in range(9):
            for query in range(0, trace.n_pos, 3):
                scores = neuron_scores(trace, layer, head, query)
                assert scores.kv_head == head // 3
                np.testing.assert_allclose(scores.probs, eager[layer, head, query], atol=2e-5, rtol=0)


def test_rollout_matches_a_straightforward_reference() -> None:
    lm = tiny("qwen2")
    trace = lm.trace(TEXT).trace
    probs = trace.get("attn_probs").double().numpy()
    n = trace.n_pos
    expected, running = [], None
    for layer in range(3):
        mixed = 0.5 * probs[layer].mean(0) + 0.5 * np.eye(n)
        mixed = mixed / mixed.sum(1, keepdims=True)
        running = mixed if running is None else mixed @ running
        expected.append(running)
    result = attention(trace, kind="rollout")
    assert result.weights.shape == (3, 1, n, n)
    np.testing.assert_allclose(result.weights[:, 0], np.array(expected), atol=1e-5)
    np.testing.assert_allclose(result.weights.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(result.weights[2, 0], 1), 0)  # causal: nothing flows back from the future
    one = attention(trace, kind="rollout", layer=1)
    np.testing.assert_allclose(one.weights[0, 0], expected[1], atol=1e-5)
    gapped = lm.trace(TEXT, layers=[0, 2]).trace
    with pytest.raises(LmscopeError, match=r"capture layers 0\.\.L"):
        attention(gapped, kind="rollout")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_value_norms_match_a_per_head_reference(family: str) -> None:
    lm = tiny(family)
    trace = lm.trace(TEXT).trace
    arch = lm.arch
    result = lm.trace(TEXT).attention(kind="value_norm")
    probs, v = trace.get("attn_probs").double(), trace.get("v").double()
    groups = arch.n_heads // arch.n_kv_heads
    for layer in range(arch.n_layers):
        o_proj = arch.o_proj(layer)
        w_o = arch.linear_weight(o_proj).detach().double()  # [d_model, head·d_head]
        moved = torch.zeros(trace.n_pos, arch.d_model, dtype=torch.float64)
        for head in range(arch.n_heads):
            part = w_o[:, head * arch.d_head : (head + 1) * arch.d_head]  # W_O^h [d_model, d_head]
            f = v[layer, :, head // groups] @ part.T  # f_h(x_k) [pos_k, d_model]
            expected = probs[layer, head] * f.norm(dim=-1)[None, :]  # ‖α·f_h(x_k)‖ [pos_q, pos_k]
            np.testing.assert_allclose(result.weights[layer, head], expected.numpy(), rtol=1e-4, atol=1e-6)
            moved += probs[layer, head] @ f
        # the per-head terms are the real decomposition: they sum (+ output bias) to the attention output
        bias = o_proj.bias.detach().double() if o_proj.bias is not None else 0
        attn_out = trace.at("attn_out", layer).double()
        torch.testing.assert_close(moved + bias, attn_out, atol=1e-4, rtol=0)


def test_sparsify_keeps_the_strongest_keys_and_reports_the_cut() -> None:
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(50), size=(2, 3, 50)).astype(np.float32)  # [layer, head, pos_q, pos_k]
    sparse = sparsify(weights, 5)
    order = np.sort(weights, axis=-1)[..., ::-1]
    np.testing.assert_allclose(np.sort(sparse.val, axis=-1)[..., ::-1], order[..., :5], rtol=1e-6)
    picked = np.take_along_axis(weights, sparse.idx.astype(np.int64), axis=-1)
    np.testing.assert_array_equal(picked, sparse.val)
    np.testing.assert_allclose(sparse.cutoff, order[..., 5].max(-1), rtol=1e-6)
    np.testing.assert_allclose(sparse.kept, (order[..., :5].sum(-1) / weights.sum(-1)).mean(-1), rtol=1e-5)
    assert auto_top_k(3, 4, 100) is None  # 120,000 pairs: every weight is shown
    assert auto_top_k(3, 4, 1000) == 20
    assert auto_top_k(30, 9, 1000) == 7


def test_long_input_is_sparsified_with_the_cutoff_in_the_text() -> None:
    lm = tiny("llama")
    result = lm.trace("word " * 900, layers=[1]).attention(layer=1)
    n = len(result.tokens)
    assert result.top_k == 20 and result.weights.shape == (1, 4, n, n)
    data = view_data(result)
    assert data["k"] == 20 and len(data["maps"][0][0]["w"]) == n * 20
    text = str(result)
    assert "the strongest 20 keys per query" in text
    assert f"largest weight left out {float(sparsify(result.weights, 20).cutoff.max()) * 100:.2f}%" in text


def test_text_twin_names_the_strongest_keys() -> None:
    lm = tiny("gpt2")
    result = lm.trace(TEXT).attention(query=5)
    text = str(result)
    assert text.startswith(f"Attention weights of tiny-gpt2: {len(result.tokens)} tokens, layers 0, 1, 2, 4 heads")
    assert "Strongest keys of query 5 ('·are')" in text
    row = result.weights[1, 2, 5]
    k = int(row.argmax())
    line = next(line for line in text.splitlines() if line.startswith("1      head 2"))
    assert line.split()[3] == str(k)
    assert f"{100 * row[k]:.2f}%" in line
    neuron = str(lm.trace(TEXT).attention(view="neuron", layer=2, head=3, query=4))
    assert "Neuron view: layer 2, head 3, query 4 ('·cabinet'), score = (q·k) × 0.25" in neuron
    assert "shared by heads" not in neuron  # GPT-2 has no grouped-query attention
    gqa = str(tiny("llama").trace(TEXT).attention(view="neuron", layer=0, head=3, query=4))
    assert "key/value head 1, shared by heads 2..3" in gqa
    assert gqa.count("masked") == len(tiny("llama").encode(TEXT)) - 5


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sentence_pairs_are_faithful_and_marked(family: str) -> None:
    lm = tiny(family)
    first, second = "The cat sat on the mat.", "It was happy."
    encoding = lm.tokenizer(first, second, return_tensors="pt")
    out = lm.trace(first, text_pair=second)
    assert out.token_ids.tolist() == encoding["input_ids"][0].tolist()
    assert lm.encode(first, second).tolist() == encoding["input_ids"][0].tolist()
    b = out.trace.segment_b
    assert out.tokens[b - 1] == "[SEP]" and out.tokens[b] == "it"
    # segment B gets token type 1, as the tokenizer says: logits equal Hugging Face's on the same encoding
    with torch.no_grad():
        reference = lm.model(**encoding).logits[0]
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)
    result = out.attention()
    np.testing.assert_allclose(result.weights, eager_attentions(lm, first, second).numpy(), atol=1e-5, rtol=0)
    assert result.segment_b == b
    assert f"sentence A: tokens 0..{b - 1}, sentence B: tokens {b}..{len(out.tokens) - 1}" in str(result)
    with pytest.raises(LmscopeError, match="both texts of a sentence pair"):
        lm.trace(first, text_pair=" ")


def test_trace_files_keep_scaling_and_segments(tmp_path) -> None:
    lm = tiny("bert")
    out = lm.trace("The cat sat.", text_pair="It was happy.", sites=["q", "k", "attn_probs"])
    loaded = lmscope.load_trace(out.save(tmp_path / "pair.safetensors"))
    assert loaded.trace.segment_b == out.trace.segment_b
    assert loaded.trace.attn_scaling == out.trace.attn_scaling == (0.25, 0.25, 0.25)
    # without the model, the neuron view works from the saved q and k
    a = loaded.attention(view="neuron", layer=1, head=2, query=3)
    b = out.attention(view="neuron", layer=1, head=2, query=3)
    np.testing.assert_array_equal(neuron_scores_of(a, 1, 2, 3).probs, neuron_scores_of(b, 1, 2, 3).probs)


def test_bad_requests_are_clear_errors() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    with pytest.raises(LmscopeError, match="unknown view 'heads': choose one of head, model, neuron"):
        out.attention(view="heads")
    with pytest.raises(LmscopeError, match="unknown kind"):
        out.attention(kind="raw")
    with pytest.raises(LmscopeError, match="head 7 is out of range"):
        out.attention(head=7)
    with pytest.raises(LmscopeError, match="top_k must be at least 1"):
        out.attention(top_k=0)
    # no model attached, and no queries and keys (a default trace keeps them: attention is computed from them)
    saved = lmscope.Output(lm.trace(TEXT, sites=["attn_probs_stored", "v"]).trace)
    with pytest.raises(LmscopeError, match="did not capture 'q'"):
        saved.attention(view="neuron")
    with pytest.raises(LmscopeError, match="needs the model's weights"):
        saved.attention(kind="value_norm")


def test_cli_writes_the_view(tmp_path, capsys) -> None:
    page = tmp_path / "attention.html"
    argv = ["attention", TEXT, "--model", "tiny-llama", "--layer", "1", "--view", "neuron", "--html", str(page)]
    assert main([*argv, "--head", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Attention weights of tiny-llama:")
    assert "Neuron view: layer 1, head 3" in out.out
    html = page.read_text(encoding="utf-8")
    assert 'data-view="attention"' in html and "<script" in html
    assert main(["attention", TEXT, "--model", "tiny-llama", "--layer", "5"]) == 2
    assert "layer 5 is out of range" in capsys.readouterr().err
