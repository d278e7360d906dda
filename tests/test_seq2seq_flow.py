"""The information-flow graph of encoder-decoder models: cross-attention edges, the encoder's own graph.

Checked against the captured tensors: the decoder block's parts (self-attention terms per source
position and head, cross-attention terms per encoder position and head, biases, the FFN output
and the residual) add up to the block output, and each sum's contributions are the normalized
L1 proximities of its parts, computed here directly from the materialized parts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmscope
from lmscope.analysis._contributions import proximity
from lmscope.analysis._seq2seq_flow import Seq2SeqFlowGraph, decoder_parts, layer_weights
from lmscope.errors import LmscopeError

SOURCE = "The keys to the old cabinet are on the table"
TARGET = "Die Schlüssel zum alten Schrank"


@pytest.fixture(scope="module")
def t5() -> tuple[lmscope.LM, lmscope.Output]:
    lm = lmscope.from_pretrained("tiny-t5")
    return lm, lm.trace(SOURCE, target=TARGET)


def test_parts_sum_to_each_block_output(t5: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = t5
    trace = out.trace
    for layer in trace.layers:
        for q in range(trace.n_pos):
            p = decoder_parts(trace, lm.arch, layer, q)
            mid = p.resid_pre + p.self_terms.sum((0, 1)) + p.self_bias
            cross = mid + p.cross_terms.sum((0, 1)) + p.cross_bias
            post = cross + p.mlp_out
            torch.testing.assert_close(mid, trace.at("resid_mid", layer)[q], atol=1e-5, rtol=0)
            torch.testing.assert_close(cross, trace.at("resid_cross", layer)[q], atol=1e-5, rtol=0)
            torch.testing.assert_close(post, trace.at("resid_post", layer)[q], atol=1e-5, rtol=0)
            assert p.cross_terms.shape == (len(trace.encoder.tokens), lm.arch.n_heads, lm.arch.d_model)


def test_contributions_are_proximities_of_the_parts(t5: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = t5
    trace = out.trace
    for layer in trace.layers:
        w = layer_weights(trace, lm.arch, layer)
        for q in range(trace.n_pos):
            p = decoder_parts(trace, lm.arch, layer, q)
            n_k, n_s, n_h = q + 1, p.cross_terms.shape[0], lm.arch.n_heads
            # self-attention: (k, h) terms of the causal prefix, the bias, the residual
            parts = torch.cat([p.self_terms[:n_k].reshape(-1, lm.arch.d_model), p.self_bias[None], p.resid_pre[None]])
            share = proximity(parts, trace.at("resid_mid", layer)[q])
            torch.testing.assert_close(w.attention[q, :n_k].reshape(-1), share[:-2], atol=1e-5, rtol=1e-4)
            assert float(w.attention[q, n_k:].abs().sum()) == 0  # causal: no later source
            assert float(w.attn_residual[q]) == pytest.approx(float(share[-1]), rel=1e-4, abs=1e-5)
            # cross-attention: (encoder position, head) terms, the bias, the residual resid_mid
            mid = trace.at("resid_mid", layer)[q]
            parts = torch.cat([p.cross_terms.reshape(-1, lm.arch.d_model), p.cross_bias[None], mid[None]])
            share = proximity(parts, trace.at("resid_cross", layer)[q])
            torch.testing.assert_close(w.cross[q].reshape(-1), share[: n_s * n_h], atol=1e-5, rtol=1e-4)
            assert float(w.cross_residual[q]) == pytest.approx(float(share[-1]), rel=1e-4, abs=1e-5)
            # FFN: its output and the residual resid_cross
            share = proximity(
                torch.stack([p.mlp_out, trace.at("resid_cross", layer)[q]]), trace.at("resid_post", layer)[q]
            )
            assert float(w.ffn[q]) == pytest.approx(float(share[0]), rel=1e-4, abs=1e-5)
        for total in (
            w.attention.sum((1, 2)) + w.attn_residual + w.attn_bias,
            w.cross.sum((1, 2)) + w.cross_residual + w.cross_bias,
            w.ffn + w.ffn_residual,
        ):
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_decoder_graph_has_cross_edges_from_encoder_outputs(t5: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = t5
    graph = out.flow(threshold=0.0)
    assert isinstance(graph, Seq2SeqFlowGraph) and graph.stack == "decoder"
    assert graph.source_tokens == out.trace.encoder.tokens
    assert graph.positions == (out.trace.n_pos - 1,)
    cross = [e for e in graph.edges if e.kind == "cross"]
    assert cross, "threshold 0 keeps every positive cross-attention term"
    weights = {layer: layer_weights(out.trace, lm.arch, layer) for layer in out.trace.layers}
    for e in cross:
        assert e.source.state == "source" and e.source.id == f"e.{e.source.pos}"
        assert e.target.state == "cross" and e.target.id == f"c{e.layer}.{e.target.pos}"
        expected = weights[e.layer].cross[e.target.pos, e.source.pos]  # [head]
        assert e.weight == pytest.approx(float(expected.sum()), abs=1e-6)
        assert sum(e.heads) == pytest.approx(1, abs=1e-5)
    nodes = {n.id: n for n in graph.nodes}
    assert {e.source.id for e in cross} <= {i for i, n in nodes.items() if n.kind == "source"}
    kinds = {(e.kind, e.source.state, e.target.state) for e in graph.edges}
    assert kinds <= {
        ("attention", "pre", "mid"), ("residual", "pre", "mid"), ("cross", "source", "cross"),
        ("residual", "mid", "cross"), ("ffn", "cross", "post"), ("residual", "cross", "post"),
    }  # fmt: skip
    pruned = out.flow(threshold=0.04)
    assert all(e.weight >= 0.04 for e in pruned.edges)
    assert {e.id for e in pruned.edges} <= {e.id for e in graph.edges}
    renormalized = out.flow(threshold=0.04, mode="renormalize")
    assert renormalized.edges


def test_encoder_graph_on_its_own(t5: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = t5
    graph = out.flow(stack="encoder", position=None, threshold=0.0)
    assert graph.stack == "encoder" and graph.tokens == out.trace.encoder.tokens
    assert {e.kind for e in graph.edges} <= {"attention", "ffn", "residual"}
    assert graph.positions == tuple(range(len(out.trace.encoder.tokens)))
    enc = out.trace.encoder
    sources = {e.source.pos for e in graph.edges if e.kind == "attention" and e.target.pos == 0}
    assert max(sources) > 0, "the encoder attends both ways"
    w = layer_weights(enc, lm.arch.encoder, enc.layers[-1])
    assert w.cross.numel() == 0
    torch.testing.assert_close(w.attention.sum((1, 2)) + w.attn_residual + w.attn_bias, torch.ones(enc.n_pos))
    one = out.flow(stack="encoder", position=2)
    assert one.positions == (2,)
    assert "Encoder stack" in str(one)


def test_post_norm_models_are_refused_clearly() -> None:
    for name in ("tiny-bart", "tiny-marian"):
        lm = lmscope.from_pretrained(name)
        out = lm.trace("The house", target="Das")
        with pytest.raises(LmscopeError, match="post-norm"):
            out.flow()
        with pytest.raises(LmscopeError, match="post-norm"):
            out.flow(stack="encoder")


def test_bad_stack() -> None:
    lm = lmscope.from_pretrained("tiny-t5")
    out = lm.trace("The house", target="Das")
    with pytest.raises(LmscopeError, match="unknown stack"):
        out.flow(stack="middle")
    causal = lmscope.from_pretrained("tiny-llama").trace("The house")
    with pytest.raises(LmscopeError, match="not an encoder-decoder"):
        causal.flow(stack="encoder")


def test_views_name_the_stack_and_source_tokens(t5: tuple[lmscope.LM, lmscope.Output]) -> None:
    _, out = t5
    graph = out.flow(threshold=0.0)
    text = str(graph)
    assert text.startswith("Decoder stack of an encoder-decoder model.")
    assert "cross" in text and "src " in text
    last = out.trace.layers[-1] + 1
    top = graph.details[f"x{last}.{out.trace.n_pos - 1}"].lens[0]  # the final state's lens: the model's own output
    assert top[1] == pytest.approx(float(torch.softmax(out.logits[-1].float(), -1).max()), abs=1e-5)
    cross = next(e for e in graph.edges if e.kind == "cross")
    assert graph.details[cross.id].promoted and graph.details[f"c{cross.layer}.{cross.target.pos}"].lens
    page = graph.to_html()
    assert '"source_tokens"' in page and '"stack":"decoder"' in page.replace(" ", "")


@pytest.mark.browser
def test_flow_view_draws_encoder_nodes_and_cross_edges(browser, t5: tuple[lmscope.LM, lmscope.Output]) -> None:
    from browser import open_html

    _, out = t5
    evil = "<img src=x onerror=alert(1)>"
    graph = out.flow(threshold=0.02)
    graph = dataclasses.replace(graph, source_tokens=(evil, *graph.source_tokens[1:]))
    opened = open_html(browser, lmscope.views.page(graph.to_html()))
    page = opened.page
    assert page.locator(".lms-flow-edge").count() == len(graph.edges)
    assert page.locator(".lms-flow-cross").count() == sum(e.kind == "cross" for e in graph.edges) > 0
    encoder = sum(n.kind == "source" for n in graph.nodes)
    assert page.locator("circle.lms-flow-encoder").count() == encoder > 0
    assert page.locator("circle.lms-flow-node").count() == sum(n.kind in ("residual", "source") for n in graph.nodes)
    assert page.locator("text.lms-flow-source").count() == len(graph.source_tokens)
    page.locator("circle.lms-flow-encoder").first.click()
    assert "encoder output" in page.locator(".lms-flow-details").inner_text()
    assert page.locator("img").count() == 0
    opened.assert_clean()


def test_cli_flow_of_either_stack() -> None:
    import contextlib
    import io
    import json

    from lmscope.cli import main

    def run(*extra: str) -> dict:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["flow", SOURCE, "--target", TARGET, "--model", "tiny-t5", "--json", *extra]) == 0
        return json.loads(buffer.getvalue())

    decoder, encoder = run(), run("--stack", "encoder", "--position", "2")
    assert decoder["stack"] == "decoder" and any(e["kind"] == "cross" for e in decoder["edges"])
    assert encoder["stack"] == "encoder" and encoder["positions"] == [2]
    assert {e["kind"] for e in encoder["edges"]} <= {"attention", "ffn", "residual"}
