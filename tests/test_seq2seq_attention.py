"""Encoder-decoder attention (T5, BART): BertViz's Encoder / Decoder / Cross views against the model's
own eager attention, the neuron view's scores (T5's relative position bias a term of them), and the
views in headless Chromium."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lmscope
from app_server import serving
from browser import open_html, watch
from conftest import tiny
from lmscope import LmscopeError, views
from lmscope.analysis.attention import EncoderDecoderAttention, attention, neuron_scores_of, seq2seq_sites
from lmscope.analysis.query_key import neuron_scores
from lmscope.app import create_app, load_config
from lmscope.views.attention import SCALE, view_data

SOURCE = "The <b> cat sat on the mat, said Mrs. O'Neill."
TARGET = "Die Katze sass auf der Matte."
SITES = ["attn_probs", "q", "k", "v", "position_bias", "cross_attn_probs", "cross_q", "cross_k", "cross_v"]
FLOOR = 0.004  # the head view leaves out lines fainter than this
XSS = "<img src=x onerror=alert(1)>"


def eager(lm: lmscope.LM, trace: lmscope.Trace) -> dict[str, np.ndarray]:
    """Hugging Face's ``output_attentions`` under eager attention, on the trace's own token ids."""
    model = lm.model
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(
                input_ids=trace.encoder.token_ids[None],
                decoder_input_ids=trace.token_ids[None],
                output_attentions=True,
            )
    finally:
        model.set_attn_implementation(original)

    def stacked(attentions: tuple[torch.Tensor, ...]) -> np.ndarray:
        return torch.stack([a[0] for a in attentions]).float().numpy()  # [layer, head, pos_q, pos_k]

    return {
        "encoder": stacked(out.encoder_attentions),
        "decoder": stacked(out.decoder_attentions),
        "cross": stacked(out.cross_attentions),
    }


def traced(family: str) -> lmscope.Output:
    return tiny(family).trace(SOURCE, target=TARGET, sites=SITES)


def lines(weights: np.ndarray) -> int:
    """How many lines the head view draws for ``weights [head, pos_q, pos_k]`` (shipped to 1e-4)."""
    return int((np.rint(weights * SCALE) / SCALE >= FLOOR).sum())


@pytest.mark.parametrize("family", ["t5", "bart", "marian"])
def test_the_three_kinds_equal_output_attentions(family: str) -> None:
    lm = tiny(family)
    out = lm.trace(SOURCE, target=TARGET)  # default sites
    trace = out.trace
    result = out.attention()
    assert isinstance(result, EncoderDecoderAttention)
    assert result.names == ("encoder", "decoder", "cross")  # BertViz's order
    reference = eager(lm, trace)
    n_src, n_tgt = trace.encoder.n_pos, trace.n_pos
    shapes = {"encoder": (n_src, n_src), "decoder": (n_tgt, n_tgt), "cross": (n_tgt, n_src)}
    for part in result:
        assert part.weights.shape[2:] == shapes[part.part]
        np.testing.assert_allclose(part.weights, reference[part.part], atol=1e-5, rtol=0)
        # what the page draws, decoded, is the same weights to the shipped precision
        data = view_data(part)
        decoded = np.array([[m["w"] for m in layer] for layer in data["maps"]], dtype=float) / SCALE
        np.testing.assert_allclose(decoded.reshape(part.weights.shape), reference[part.part], atol=0.5 / SCALE + 1e-7)
    # cross-attention: rows are the target (decoder) tokens, columns the source (encoder) tokens
    assert result.cross.tokens == trace.tokens and result.cross.keys == trace.encoder.tokens
    assert result.encoder.tokens == result.encoder.keys == result.source_tokens == trace.encoder.tokens
    assert result.decoder.keys == result.target_tokens == trace.tokens
    assert np.allclose(np.triu(result.decoder.weights[0, 0], 1), 0)  # the decoder is causal
    # one kind alone is an ordinary Attention, as BertViz shows one kind without a selector
    cross = out.attention(part="cross", layer=1)
    np.testing.assert_allclose(cross.weights[0], reference["cross"][1], atol=1e-5)
    assert cross.part == "cross" and cross.key_tokens == trace.encoder.tokens


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_neuron_view_scores_reproduce_the_probabilities(family: str) -> None:
    lm = tiny(family)
    trace = traced(family).trace
    reference = eager(lm, trace)
    result = attention(trace, view="neuron")
    for part in result:
        layers, n_q = part.layers, len(part.tokens)
        for index, layer in enumerate(layers):
            for head in range(part.n_heads):
                for query in range(n_q):
                    scores = neuron_scores_of(part, layer, head, query)
                    assert len(scores.probs) == len(part.keys)
                    np.testing.assert_allclose(scores.probs, reference[part.part][index, head, query], atol=2e-6)
                    # the displayed terms compose: score = Σ products · scaling (+ position bias)
                    dots = scores.products.sum(-1) * scores.scaling
                    bias = 0.0 if scores.bias is None else scores.bias
                    np.testing.assert_allclose(scores.scores, dots + bias, rtol=1e-5, atol=1e-6)
        if family == "t5" and part.part != "cross":
            # T5: no 1/sqrt(d) scaling, and a learned relative position bias that matters
            assert part.neuron.scaling == (1.0,) * len(layers) and part.neuron.bias is not None
            assert np.abs(part.neuron.bias).max() > 1e-3
        else:
            assert part.neuron.bias is None  # BART adds none; T5's cross-attention adds none
    if family == "t5":  # the same row from the trace directly, and a trace without the bias refused
        row = neuron_scores(trace.encoder, 1, 2, 3)
        np.testing.assert_allclose(row.probs, reference["encoder"][1, 2, 3], atol=2e-6)
        row = neuron_scores(trace, 0, 1, 4, cross=True)
        np.testing.assert_allclose(row.probs, reference["cross"][0, 1, 4], atol=2e-6)
        bare = lm.trace(SOURCE, target=TARGET, sites=["attn_probs", "q", "k"]).trace
        with pytest.raises(LmscopeError, match="position_bias"):
            attention(bare, view="neuron", part="decoder")
    text = str(result)
    assert "Encoder self-attention" in text and "Cross-attention (rows: target tokens, columns: source tokens)" in text
    assert ("+ position bias" in text) == (family == "t5")


def test_output_attention_recaptures_what_the_neuron_view_needs() -> None:
    lm = tiny("t5")
    out = lm.trace(SOURCE, target=TARGET)  # default sites: no q, k, position_bias
    needed, optional = seq2seq_sites("neuron", "weights")
    assert {"q", "k", "cross_q", "cross_k", "cross_attn_probs"} <= set(needed) and optional == ("position_bias",)
    result = out.attention(view="neuron", query=2, layer=1)  # T5 computes its bias in layer 0 and shares it
    reference = eager(lm, out.trace)
    for part in result:
        assert part.layers == (1,)
        scores = neuron_scores_of(part, 1, 3, part.query)
        np.testing.assert_allclose(scores.probs, reference[part.part][1, 3, part.query], atol=2e-6)
    assert result.decoder.query == result.cross.query == 2  # a decoder position
    assert result.encoder.query == out.trace.encoder.n_pos - 1  # the encoder starts on its last token


def test_other_maps_and_bad_requests() -> None:
    lm = tiny("bart")
    out = traced("bart")
    trace = out.trace
    # rollout multiplies square maps: the encoder's and the decoder's, not cross-attention
    rolled = attention(trace, kind="rollout")
    assert rolled.names == ("encoder", "decoder")
    np.testing.assert_allclose(rolled.decoder.weights.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(LmscopeError, match="square"):
        attention(trace, kind="rollout", part="cross")
    with pytest.raises(LmscopeError, match="unknown part"):
        attention(trace, part="both")
    with pytest.raises(LmscopeError, match=r"layer 2 is not in both stacks \(captured: encoder \[0, 1, 2\], decoder"):
        attention(trace, layer=2)  # the tiny models have 3 encoder and 2 decoder layers
    assert attention(trace, layer=2, part="encoder").layers == (2,)
    with pytest.raises(LmscopeError, match="encoder-decoder"):
        tiny("gpt2").trace("hello there").attention(part="cross")
    # value norms of cross-attention: ‖α · W_O^h v_k‖ with the cross-attention's own output projection
    norms = attention(trace, kind="value_norm", part="cross", arch=lm.arch)
    probs, v = trace.get("cross_attn_probs").double(), trace.get("cross_v").double()
    arch = lm.arch
    for layer in trace.layers:
        w_o = arch.linear_weight(arch.cross_o_proj(layer)).detach().double()  # [d_model, head·d_head]
        for head in range(arch.n_heads):
            f = v[layer, :, head] @ w_o[:, head * arch.d_head : (head + 1) * arch.d_head].T  # [pos_k, d_model]
            expected = probs[layer, head] * f.norm(dim=-1)[None, :]
            np.testing.assert_allclose(norms.weights[layer, head], expected.numpy(), rtol=1e-4, atol=1e-6)
    # sparsified cross-attention ships the strongest source tokens of each target token
    sparse = view_data(attention(trace, part="cross", top_k=3))
    strongest = np.sort(trace.get("cross_attn_probs")[0].numpy(), axis=-1)[..., ::-1][..., :3]  # [head, pos, 3]
    shipped = np.array([m["w"] for m in sparse["maps"][0]], dtype=float).reshape(strongest.shape) / SCALE
    np.testing.assert_allclose(np.sort(shipped, axis=-1)[..., ::-1], strongest, atol=0.5 / SCALE + 1e-7)
    assert max(max(m["idx"]) for m in sparse["maps"][0]) < trace.encoder.n_pos and sparse["k"] == 3
    # the encoder's maps use the encoder's own output projections
    encoder = attention(trace, kind="value_norm", part="encoder", layer=2, arch=lm.arch)
    w_o = arch.linear_weight(arch.encoder.o_proj(2)).detach().double()[:, : arch.d_head]  # head 0
    f = trace.encoder.get("v").double()[2, :, 0] @ w_o.T  # [pos_k, d_model]
    expected = trace.encoder.get("attn_probs").double()[2, 0] * f.norm(dim=-1)[None, :]
    np.testing.assert_allclose(encoder.weights[0, 0], expected.numpy(), rtol=1e-4, atol=1e-6)
    figure = out.attention().plot(part="cross", layer=1, head=0)
    assert "cross" in figure.axes[0].get_title(loc="left")
    assert figure.axes[0].get_xticklabels()[0].get_text() == views.visible(trace.encoder.tokens[0])


def with_markup(result: EncoderDecoderAttention) -> EncoderDecoderAttention:
    """The result with a source token that is markup, in every part that shows source tokens."""
    source = list(result.source_tokens)
    source[1] = XSS
    parts = []
    for part in result:
        if part.part == "encoder":
            part = dataclasses.replace(part, tokens=tuple(source))
        elif part.part == "cross":
            part = dataclasses.replace(part, key_tokens=tuple(source))
        parts.append(part)
    return dataclasses.replace(result, source_tokens=tuple(source), parts=tuple(parts))


def pick(page, part: str) -> None:
    page.select_option(".lms-att-part", label={"encoder": "Encoder", "decoder": "Decoder", "cross": "Cross"}[part])
    assert page.get_attribute(".lms-body", "data-part") == part


def escaped(page) -> None:
    assert page.locator(".lmscope img, .lmscope b").count() == 0
    assert page.evaluate("document.querySelectorAll('.lmscope script').length") == 2  # data + code only


@pytest.mark.browser
def test_head_view_offers_encoder_decoder_and_cross(browser) -> None:
    out = tiny("t5").trace(SOURCE, target=TARGET)
    result = out.attention()
    assert "<b>" in "".join(result.source_tokens).replace(" ", "")  # the source holds markup
    opened = open_html(browser, views.page(with_markup(result).to_html()))
    page = opened.page
    options = page.locator(".lms-att-part option").all_text_contents()
    assert options == ["Encoder", "Decoder", "Cross"]
    assert page.get_attribute(".lms-body", "data-part") == "encoder"  # BertViz opens on the first
    for part in result:
        pick(page, part.part)
        pane = f".lms-att-pane[data-part='{part.part}']"
        assert page.locator(f"{pane} .lms-att-left .lms-att-tok").count() == len(part.tokens)
        assert page.locator(f"{pane} .lms-att-right .lms-att-tok").count() == len(part.keys)
        assert int(page.get_attribute(f"{pane} .lms-att-lines", "data-lines")) == lines(part.weights[0])
        assert page.locator(".lms-att-pane:not([hidden])").count() == 1
    cross = ".lms-att-pane[data-part='cross']"
    assert page.locator(f"{cross} .lms-att-left .lms-att-tok").first.text_content() == views.visible(out.tokens[0])
    assert page.locator(f"{cross} .lms-att-right .lms-att-tok").nth(1).text_content() == views.visible(XSS)
    # another layer of cross-attention, then hovering a target token isolates its lines into the source
    page.select_option(f"{cross} .lms-att-layer", "1")
    assert int(page.get_attribute(f"{cross} .lms-att-lines", "data-lines")) == lines(result.cross.weights[1])
    page.hover(f"{cross} .lms-att-left .lms-att-tok[data-pos='2']")
    assert int(page.get_attribute(f"{cross} .lms-att-lines", "data-lines")) == lines(result.cross.weights[1][:, 2:3])
    escaped(page)
    opened.assert_clean()


@pytest.mark.browser
def test_model_view_of_each_kind(browser) -> None:
    result = tiny("bart").trace(SOURCE, target=TARGET).attention(view="model")
    opened = open_html(browser, views.page(with_markup(result).to_html()))
    page = opened.page
    for part in result:
        pick(page, part.part)
        pane = f".lms-att-pane[data-part='{part.part}']"
        assert page.locator(f"{pane} .lms-att-thumb").count() == len(part.layers) * part.n_heads
        page.click(f"{pane} .lms-att-thumb[data-layer='1'][data-head='2']")
        detail = f"{pane} .lms-att-detail"
        assert page.locator(f"{detail} .lms-title").text_content() == "Layer 1, head 2"
        assert page.locator(f"{detail} .lms-att-left .lms-att-tok").count() == len(part.tokens)
        assert page.locator(f"{detail} .lms-att-right .lms-att-tok").count() == len(part.keys)
        assert int(page.get_attribute(f"{detail} .lms-att-lines", "data-lines")) == lines(part.weights[1][[2]])
    escaped(page)
    opened.assert_clean()


@pytest.mark.browser
def test_neuron_view_of_each_kind_shows_t5_position_bias(browser) -> None:
    result = attention(traced("t5").trace, view="neuron", head=1, query=3)
    opened = open_html(browser, views.page(with_markup(result).to_html()))
    page = opened.page

    def check(part, layer: int, head: int, query: int) -> None:
        pane = f".lms-att-pane[data-part='{part.part}']"
        expected = neuron_scores_of(part, layer, head, query)
        rows = page.locator(f"{pane} .lms-att-nrow")
        assert rows.count() == len(part.keys)
        values = {k: np.array([float(x) for x in rows.evaluate_all(f"rs => rs.map(r => r.dataset.{k})")])
                  for k in ("prob", "score", "bias")}  # fmt: skip
        np.testing.assert_allclose(values["prob"], expected.probs, atol=1e-5)
        np.testing.assert_allclose(values["score"], expected.scores, atol=1e-4)
        np.testing.assert_allclose(values["bias"], 0.0 if expected.bias is None else expected.bias, atol=1e-5)
        headers = page.locator(f"{pane} .lms-att-neuron th").all_text_contents()
        assert ("+ bias" in headers) == (expected.bias is not None)

    for part in result:
        pick(page, part.part)
        check(part, part.layers[0], 1, part.query)
    pane = ".lms-att-pane[data-part='decoder']"
    pick(page, "decoder")
    assert "+ position bias" in page.locator(f"{pane} .lms-att-ninfo").text_content()
    page.select_option(f"{pane} .lms-att-layer", "1")
    page.select_option(f"{pane} .lms-att-head", "3")
    page.select_option(f"{pane} .lms-att-query", "2")
    check(result.decoder, 1, 3, 2)
    assert page.locator(f"{pane} .lms-att-nrow.lms-att-masked").count() == len(result.decoder.keys) - 3  # causal
    escaped(page)
    opened.assert_clean()


@pytest.fixture(scope="module")
def t5_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved T5 trace; the app below has no T5 model configured, so it opens it without weights."""
    path = tmp_path_factory.mktemp("seq2seq") / "t5.safetensors"
    tiny("t5").trace(SOURCE, target=TARGET).trace.save(path)
    return path


def app() -> Any:
    return create_app(load_config(default_model="tiny-llama", max_input_tokens=64))


def test_app_attention_route_serves_each_kind(t5_file: Path) -> None:
    from fastapi.testclient import TestClient

    client = TestClient(app())
    reply = client.post(
        "/api/traces", content=t5_file.read_bytes(), headers={"content-type": "application/octet-stream"}
    )
    assert reply.status_code == 200, reply.text
    run = reply.json()
    trace = lmscope.load_trace(t5_file).trace
    assert run["source_tokens"] == list(trace.encoder.tokens) and run["tokens"] == list(trace.tokens)
    assert run["capabilities"]["attention"] is True
    both = client.get(f"/api/runs/{run['id']}/attention", params={"data": "true"}).json()
    assert both["kind"] == "EncoderDecoderAttention"
    assert [p["part"] for p in both["data"]["parts"]] == ["encoder", "decoder", "cross"]
    cross = client.get(f"/api/runs/{run['id']}/attention", params={"part": "cross", "data": "true", "layer": 1}).json()
    assert cross["data"]["key_tokens"] == run["source_tokens"] and cross["data"]["tokens"] == run["tokens"]
    np.testing.assert_allclose(cross["data"]["weights"][0], trace.get("cross_attn_probs")[1].numpy(), atol=1e-6)
    bad = client.get(f"/api/runs/{run['id']}/attention", params={"part": "sideways"})
    assert bad.status_code == 400 and "unknown part" in bad.json()["detail"]


@pytest.mark.browser
def test_app_attention_tab_shows_source_target_and_cross(browser, t5_file: Path) -> None:
    trace = lmscope.load_trace(t5_file).trace
    with serving(app()) as url:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        opened = watch(page)
        page.goto(url)
        page.wait_for_selector("#model option", state="attached")
        page.set_input_files("#open-trace", str(t5_file))
        page.wait_for_function("() => window.lmscopeApp.state.run && window.lmscopeApp.state.run.source_tokens")
        page.evaluate("window.lmscopeApp.selectTab('attention')")
        panel = "#panel-attention"
        page.wait_for_selector(f"{panel} .lms-body[data-drawn]")
        source = page.locator(f"{panel} .seq2seq-tokens[data-side='source'] .lms-token").all_text_contents()
        assert source == [views.visible(t) for t in trace.encoder.tokens]  # '<', 'b', '>' stay text
        target = page.locator(f"{panel} .seq2seq-tokens[data-side='target'] .lms-token")
        assert target.count() == trace.n_pos
        assert page.locator(f"{panel} .lms-att-part option").all_text_contents() == ["Encoder", "Decoder", "Cross"]
        page.select_option(f"{panel} select[data-control='part']", "cross")
        page.wait_for_function(
            "() => { const b = document.querySelector('#panel-attention .lms-body[data-drawn]');"
            " return b && !b.querySelector('.lms-att-part'); }"
        )
        assert page.locator(f"{panel} .lms-att-left .lms-att-tok").count() == trace.n_pos
        assert page.locator(f"{panel} .lms-att-right .lms-att-tok").count() == trace.encoder.n_pos
        assert page.locator(f"{panel} .lmscope b").count() == 0
        opened.assert_clean(allowed_prefixes=(url,))
        page.close()
