"""Corpus collection: batched, padded, sharded collection equals tracing one sentence at a time."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis.collect import read_texts
from lmscope.probing import ud_file


def ud_sentences(n: int, start: int = 0) -> list[str]:
    return read_texts(ud_file("dev"))[start : start + n]


def assert_equals_per_sentence(lm: lmscope.LM, col: lmscope.Collection, texts: list[str], tol: float) -> None:
    """Every text's slice of the collection equals a plain ``lm.trace`` of that text alone.

    Up to float32 rounding of different matmul shapes: ``tol`` relative to the largest magnitude.
    """
    assert len(col) == len(texts) and col.texts == tuple(texts)
    assert col.offsets[0] == 0 and col.n_tokens == sum(len(ids) for ids in col.token_ids)
    stored = {(site, layer): col.get(site, layer) for site in col.sites for layer in col.layers}
    for i, text in enumerate(texts):
        trace = lm.trace(text, sites=col.sites, layers=col.layers).trace
        assert col.token_ids[i] == list(lm.tokenizer(text)["input_ids"]) == trace.token_ids.tolist()
        assert col.tokens[i] == list(trace.tokens)
        assert col.offsets[i] == sum(len(ids) for ids in col.token_ids[:i])
        for site in col.sites:
            for layer in col.layers:
                expected = trace.at(site, layer).float().numpy().reshape(trace.n_pos, -1)
                atol = tol * max(1.0, float(np.abs(expected).max()))
                np.testing.assert_allclose(stored[site, layer][col.span(i)], expected, atol=atol, rtol=0)


def test_batched_collection_of_200_ud_sentences_equals_per_sentence() -> None:
    lm = tiny("llama")
    texts = ud_sentences(200)
    col = lmscope.collect(lm, texts, sites=("resid_post", "mlp_act", "resid_mid"), batch_size=16, progress=False)
    assert col.layers == (0, 1, 2) and col.get("mlp_act", 1).dtype == np.float32
    assert_equals_per_sentence(lm, col, texts, tol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt", "roberta", "phi"])
def test_padding_never_leaks_into_real_tokens(family: str) -> None:
    # Very different lengths in one batch: long right padding for the short texts.
    lm = tiny(family)
    texts = ["Hi.", *ud_sentences(6, start=40), "Yes", "A much longer sentence " * 6]
    col = lmscope.collect(lm, texts, sites=("resid_post", "attn_out", "v"), layers=[0, 2], batch_size=4, progress=False)
    assert_equals_per_sentence(lm, col, texts, tol=1e-5)


def test_bert_family_model_minilm() -> None:
    lm = lmscope.from_pretrained("minilm-l6")
    texts = ud_sentences(24, start=200)
    col = lmscope.collect(lm, texts, sites=("resid_post", "mlp_act"), layers=[0, 3, 5], batch_size=8, progress=False)
    assert col.token_ids[0][0] == lm.tokenizer.cls_token_id  # special tokens as the tokenizer adds them
    assert_equals_per_sentence(lm, col, texts, tol=1e-5)


@pytest.mark.embedded
def test_embedded_model_batched_equals_per_sentence(embedded: lmscope.LM) -> None:
    texts = ud_sentences(12, start=300)
    col = lmscope.collect(embedded, texts, sites=("resid_post", "mlp_act"), layers=[0, 29], progress=False)
    assert_equals_per_sentence(embedded, col, texts, tol=1e-5)


def test_shards_on_disk_read_back_lazily_and_memory_stays_bounded(tmp_path: Path) -> None:
    lm = tiny("llama")
    # The small corpus is the 32 longest of 320 sentences: both corpora share their longest batches.
    texts = sorted(ud_sentences(320, start=400), key=lambda t: -len(lm.tokenizer(t)["input_ids"]))
    sites = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_act")
    memory = lmscope.collect(lm, texts, sites=sites, batch_size=16, progress=False)

    def peak_while_collecting(n: int, out: Path) -> tuple[int, int]:
        tracemalloc.start()
        try:
            lmscope.collect(lm, texts[:n], sites=sites, batch_size=16, out_dir=out, progress=False, shard_mb=0.25)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))

    small_peak, small_bytes = peak_while_collecting(32, tmp_path / "small")
    big_peak, big_bytes = peak_while_collecting(320, tmp_path / "big")
    # The files grow with the corpus, memory does not: it holds one shard and one batch of
    # activations, plus the token ids and strings (small, and linear in the corpus).
    assert big_bytes > 2.5 * small_bytes
    assert big_peak - small_peak < 0.1 * (big_bytes - small_bytes)
    assert big_peak < big_bytes / 3

    loaded = lmscope.load_collection(tmp_path / "big")
    assert len(list((tmp_path / "big").glob("shard-*.safetensors"))) > 4
    assert loaded.tokens == memory.tokens and loaded.offsets == memory.offsets and loaded.layers == memory.layers
    for site in sites:
        np.testing.assert_array_equal(loaded.get(site, 2), memory.get(site, 2))
    assert "320 texts" in repr(loaded)


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    lm = tiny("llama")
    with pytest.raises(LmscopeError, match="per-token sites"):
        lmscope.collect(lm, ["a text"], sites=("attn_probs",), progress=False)
    with pytest.raises(LmscopeError, match="text 1 is empty"):
        lmscope.collect(lm, ["a text", "  "], progress=False)
    with pytest.raises(LmscopeError, match="no texts"):
        lmscope.collect(lm, [], progress=False)
    col = lmscope.collect(lm, ["a text"], out_dir=tmp_path, progress=False)
    with pytest.raises(LmscopeError, match="already holds a collection"):
        lmscope.collect(lm, ["a text"], out_dir=tmp_path, progress=False)
    with pytest.raises(LmscopeError, match="not 'mlp_act'"):
        col.get("mlp_act", 0)
    with pytest.raises(LmscopeError, match="no lmscope collection"):
        lmscope.load_collection(tmp_path / "elsewhere")
