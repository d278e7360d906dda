"""Attention kept as queries and keys: probabilities computed on demand equal stored ones, everywhere.

A default trace keeps each layer's post-rotary q and k plus a recipe (scaling, soft-cap, mask, T5's
position bias) and computes ``softmax(q·kᵀ·scaling + bias + mask)`` for the layers, heads and rows asked
for (``capture._lazy_attention``); the site ``attn_probs_stored`` stores the probabilities in full as
before. The two must agree bit for bit on every family (sliding windows, soft-capping, grouped-query
attention, OPT's pre-scaled queries, T5's relative bias, BART/Marian cross-attention, BERT's
bidirectional attention and sentence pairs), and every analysis must give the same result on both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmscope
from conftest import tiny
from lmscope.analysis import verify as verify_module
from lmscope.capture import DEFAULT_SITES, SEQ2SEQ_SITES, _lazy_attention
from lmscope.errors import LmscopeError
from lmscope.models._tiny import TINY_FAMILIES, TINY_SEQ2SEQ

TEXT = "The keys to the cabinet are on the table, and the cat sat on the mat near the door of the old house."
SOURCE, TARGET = "The keys to the cabinet are on the table near the door.", "Les clés sont sur la table."
STORED = (*(s for s in DEFAULT_SITES if s != "attn_probs"), "attn_probs_stored")
STORED_SEQ2SEQ = (*(s for s in (*DEFAULT_SITES, *SEQ2SEQ_SITES) if not s.endswith("attn_probs")),
                  "attn_probs_stored", "cross_attn_probs_stored")  # fmt: skip


def _kept_as_qk(lm: lmscope.LM) -> bool:
    """Whether attention is kept as q/k: not where the family computes its own attention (GPT-Neo, XGLM, DeBERTa:
    lmscope's hooks hand out their probabilities) nor where an ALiBi bias rides in the additive mask (BLOOM, MPT,
    Falcon with ALiBi): the recorder stores those probabilities as before."""
    family = lm.loaded.arch.family
    return not family.qkv and not getattr(family, "alibi", None) and not getattr(family, "alibi_in_mask", False)


def _pair(family: str):
    lm = tiny(family)
    if lm.is_seq2seq:
        return lm.trace(SOURCE, target=TARGET), lm.trace(SOURCE, target=TARGET, sites=STORED_SEQ2SEQ)
    return lm.trace(TEXT), lm.trace(TEXT, sites=STORED)


def _same_attention(lazy, stored, cross: bool = False) -> None:
    for layer in lazy.layers:
        want = stored.attention(layer, cross=cross)  # [head, pos_q, pos_k]
        got = lazy.attention(layer, cross=cross)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want), f"layer {layer}: max diff {(got - want).abs().max()}"
        n_heads, n_q = want.shape[:2]
        heads, rows = [n_heads - 1, 0], [n_q - 1, 2, n_q // 2]
        assert torch.equal(lazy.attention(layer, heads=heads, rows=rows, cross=cross), want[heads][:, rows])
        assert torch.equal(lazy.attention(layer, heads=1, rows=slice(3, None), cross=cross), want[[1], 3:])


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f not in ("mamba", "falcon_mamba", "mamba2")])
def test_lazy_equals_stored_on_every_family(family: str) -> None:
    lazy_out, stored_out = _pair(family)
    lazy, stored = lazy_out.trace, stored_out.trace
    assert torch.equal(lazy_out.logits, stored_out.logits)  # the run itself is the same
    assert "attn_probs" in lazy.sites and "attn_probs" in stored.sites
    assert stored.attn_recipe is None and "attn_probs" in stored.tensors
    if not _kept_as_qk(tiny(family)):
        assert lazy.attn_recipe is None and "attn_probs" in lazy.tensors
    else:
        assert lazy.attn_recipe is not None and "attn_probs" not in lazy.tensors
        assert lazy.nbytes() < stored.nbytes() + lazy.tensors["q"].nbytes + lazy.tensors["k"].nbytes
    _same_attention(lazy, stored)
    assert torch.equal(lazy.get("attn_probs"), stored.get("attn_probs"))
    assert torch.equal(lazy.at("attn_probs", lazy.layers[-1]), stored.at("attn_probs", stored.layers[-1]))


@pytest.mark.parametrize("family", list(TINY_SEQ2SEQ))
def test_lazy_equals_stored_on_both_stacks_and_cross_attention(family: str) -> None:
    lazy_out, stored_out = _pair(family)
    lazy, stored = lazy_out.trace, stored_out.trace
    assert torch.equal(lazy_out.logits, stored_out.logits)
    assert set(lazy.attn_recipe) == {"self", "cross"} and lazy.encoder.attn_recipe is not None
    _same_attention(lazy, stored)
    _same_attention(lazy, stored, cross=True)
    _same_attention(lazy.encoder, stored.encoder)
    assert torch.equal(lazy.get("cross_attn_probs"), stored.get("cross_attn_probs"))
    assert torch.equal(lazy.attention(0, stack="encoder"), stored.encoder.attention(0))
    if family == "t5":  # the relative position bias is stored once per stack, not once per layer
        assert lazy.tensors["attn_bias"].shape[0] == 1 and lazy.encoder.tensors["attn_bias"].shape[0] == 1


def test_masks_are_described_or_stored_once() -> None:
    causal = _pair("llama")[0].trace
    assert {e["mask"] for e in causal.attn_recipe["self"]} == {"causal"} and "attn_mask" not in causal.tensors
    window = _pair("gemma2")[0].trace  # sliding-window layers alternate with global ones
    masks = {e["mask"] for e in window.attn_recipe["self"]}
    assert "causal" in masks and 0 in masks and window.tensors["attn_mask"].shape[0] == 1
    assert all(e["softcap"] == 50.0 for e in window.attn_recipe["self"])  # Gemma 2's attention soft-capping
    assert window.tensors["attn_mask"].dtype == torch.bool
    opt = _pair("opt")[0].trace
    assert all(e["scaling"] == 1.0 for e in opt.attn_recipe["self"])  # OPT scales q before attention


def test_sentence_pairs_of_a_bidirectional_encoder() -> None:
    lm = tiny("bert")
    lazy = lm.trace("The cat sat on the mat.", text_pair="It was warm there.").trace
    stored = lm.trace("The cat sat on the mat.", text_pair="It was warm there.", sites=STORED).trace
    assert lazy.segment_b == stored.segment_b is not None
    _same_attention(lazy, stored)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_views_of_soft_capped_sliding_window_attention_are_unchanged(family: str) -> None:
    lazy, stored = _pair(family)
    for kind in ("weights", "rollout"):
        np.testing.assert_array_equal(lazy.attention(kind=kind).weights, stored.attention(kind=kind).weights)
    x, y = lazy.attention(layer=1, view="neuron"), stored.attention(layer=1, view="neuron")
    np.testing.assert_array_equal(x.weights, y.weights)
    assert str(x) == str(y)
    lm, tol = tiny(family), verify_module.TOLERANCES["float32"]
    assert verify_module._attention_check(lm, lazy.trace.token_ids, lazy.trace, tol) == \
        verify_module._attention_check(lm, stored.trace.token_ids, stored.trace, tol)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "phi", "opt"])
def test_analyses_are_unchanged(family: str) -> None:
    lazy, stored = _pair(family)
    a, b = lazy.flow(threshold=0.02), stored.flow(threshold=0.02)
    assert [e.id for e in a.edges] == [e.id for e in b.edges]
    np.testing.assert_array_equal([e.weight for e in a.edges], [e.weight for e in b.edges])
    assert [e.heads for e in a.edges] == [e.heads for e in b.edges]
    layer = lazy.trace.layers[-1]
    np.testing.assert_array_equal(
        lazy.contribution_map(layer).contributions, stored.contribution_map(layer).contributions
    )
    np.testing.assert_array_equal(lazy.contribution_map(layer).attention, stored.contribution_map(layer).attention)
    for source in (None, 1):
        np.testing.assert_array_equal(lazy.head_shares(layer, source=source).shares,
                                      stored.head_shares(layer, source=source).shares)  # fmt: skip
    for kind in ("weights", "rollout", "value_norm"):
        np.testing.assert_array_equal(lazy.attention(kind=kind).weights, stored.attention(kind=kind).weights)
    np.testing.assert_array_equal(lazy.attention(layer=1, view="head").weights,
                                  stored.attention(layer=1, view="head").weights)  # fmt: skip
    x, y = lazy.attention(layer=1, view="neuron"), stored.attention(layer=1, view="neuron")
    np.testing.assert_array_equal(x.weights, y.weights)
    assert str(x) == str(y)
    assert lazy.promoted_tokens(layer, component="attention", head=1).promoted == \
        stored.promoted_tokens(layer, component="attention", head=1).promoted  # fmt: skip
    lm, tol = tiny(family), verify_module.TOLERANCES["float32"]
    assert verify_module._block_checks(lm, lazy.trace, tol) == verify_module._block_checks(lm, stored.trace, tol)
    assert verify_module._attention_check(lm, lazy.trace.token_ids, lazy.trace, tol) == \
        verify_module._attention_check(lm, stored.trace.token_ids, stored.trace, tol)  # fmt: skip


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_flow_is_unchanged(family: str) -> None:
    lazy, stored = _pair(family)
    for stack in ("decoder", "encoder") if family == "t5" else ():  # BART is post-norm: no flow graph
        a, b = lazy.flow(threshold=0.02, stack=stack), stored.flow(threshold=0.02, stack=stack)
        assert [e.id for e in a.edges] == [e.id for e in b.edges]
        np.testing.assert_array_equal([e.weight for e in a.edges], [e.weight for e in b.edges])
    x, y = lazy.attention(part="cross"), stored.attention(part="cross")
    np.testing.assert_array_equal(x.weights, y.weights)


def test_the_embedded_model(embedded: lmscope.LM) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 3
    lazy, stored = embedded.trace(text).trace, embedded.trace(text, sites=STORED).trace
    for layer in (0, 14, 29):
        want = stored.attention(layer)
        assert torch.equal(lazy.attention(layer), want)
        assert torch.equal(lazy.attention(layer, heads=[8, 3], rows=[-1]), want[[8, 3]][:, [-1]])


@pytest.mark.parametrize("family", ["mistral", "t5", "bart"])
def test_trace_files_keep_attention_as_queries_and_keys(tmp_path, family: str) -> None:
    lazy, stored = (out.trace for out in _pair(family))
    loaded = lmscope.load_trace(lazy.save(tmp_path / "lazy.safetensors")).trace
    assert loaded.attn_recipe == lazy.attn_recipe and set(loaded.sites) == set(lazy.sites)
    _same_attention(loaded, stored)
    if lazy.is_seq2seq:
        _same_attention(loaded, stored, cross=True)
        _same_attention(loaded.encoder, stored.encoder)
    # a file with stored probabilities reads as before, and the accessor slices them
    old = lmscope.load_trace(stored.save(tmp_path / "stored.safetensors")).trace
    assert old.attn_recipe is None and "attn_probs" in old.tensors
    _same_attention(lazy, old)


def test_damaged_recipes_are_refused(tmp_path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lmscope.capture._trace_file import _text_checksum

    path = tmp_path / "t.safetensors"
    _pair("mistral")[0].trace.save(path)
    with safe_open(str(path), framework="pt") as handle:
        header, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["lmscope"])
    meta["attn_recipe"]["self"][1]["mask"] = 7
    text = json.dumps(meta)
    save_file(tensors, str(path), metadata={"lmscope": text, "lmscope_crc32": _text_checksum(text)})
    with pytest.raises(LmscopeError, match="'mask' is 7"):
        lmscope.load_trace(path)


def test_bad_requests_are_clear(monkeypatch) -> None:
    trace = _pair("llama")[0].trace
    with pytest.raises(LmscopeError, match="head 4 is out of range"):
        trace.attention(0, heads=[4])
    with pytest.raises(LmscopeError, match="query row"):
        trace.attention(0, rows=[10_000])
    with pytest.raises(LmscopeError, match="layer 7 is out of range"):
        trace.attention(7)
    with pytest.raises(LmscopeError, match="no cross-attention"):
        trace.attention(0, cross=True)
    monkeypatch.setattr(_lazy_attention, "MATERIALIZE_LIMIT", 1000)
    with pytest.raises(LmscopeError, match=r"trace\.attention\(layer"):
        trace.get("attn_probs")
    assert trace.attention(0, heads=[0], rows=[-1]).shape == (1, 1, trace.n_pos)  # parts still fine


def test_stored_sites_are_an_option_of_the_sites() -> None:
    lm = tiny("qwen2")
    with pytest.raises(LmscopeError, match="attn_probs_stored"):
        lm.trace(TEXT, sites=["attn_prob"])
    trace = lm.trace(TEXT, sites=["attn_probs_stored"]).trace
    assert trace.sites == ("attn_probs",)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "mixtral"])
def test_streamed_flow_graph_equals_the_whole_one(family: str) -> None:
    """Top-down, computing only the rows reached (long inputs), the graph has the same edges and weights."""
    from lmscope.analysis.flow import flow

    lm = tiny(family)
    trace = lm.trace(TEXT).trace
    for mode in ("prune", "renormalize"):
        for position in (-1, [3, -1]):
            whole = flow(trace, lm.loaded.arch, threshold=0.04, position=position, mode=mode, stream=False)
            streamed = flow(trace, lm.loaded.arch, threshold=0.04, position=position, mode=mode, stream=True)
            assert [e.id for e in streamed.edges] == [e.id for e in whole.edges]
            np.testing.assert_allclose([e.weight for e in streamed.edges], [e.weight for e in whole.edges],
                                       rtol=0, atol=1e-6)  # fmt: skip
            for a, b in zip(streamed.edges, whole.edges, strict=True):
                assert (a.heads is None) == (b.heads is None)
                if a.heads is not None:
                    np.testing.assert_allclose(a.heads, b.heads, rtol=0, atol=1e-5)
            assert streamed.all_edges == streamed.edges and streamed.nodes == whole.nodes


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_top_keys_of_one_layer_equal_the_sparsified_dense_map(family: str) -> None:
    """The long-input head view's data, one head and a few rows at a time, equals sparsifying the whole map."""
    from lmscope.analysis.attention import sparsify, top_keys

    trace = _pair(family)[0].trace
    dense = sparsify(trace.attention(1)[None].numpy(), 5)
    blocked = top_keys(trace, 1, 5, rows=7)
    np.testing.assert_array_equal(blocked.val, dense.val)
    np.testing.assert_array_equal(blocked.cutoff, dense.cutoff)
    np.testing.assert_allclose(blocked.kept, dense.kept, rtol=1e-6)
    ties = blocked.val[..., 1:] == blocked.val[..., :-1]  # equal weights may come in either order
    np.testing.assert_array_equal(np.where(ties, 0, blocked.idx[..., 1:]), np.where(ties, 0, dense.idx[..., 1:]))
