"""Attention views in headless Chromium: they draw what the analysis computed, cleanly and safely."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from browser import open_html, watch
from conftest import tiny
from lmscope import views
from lmscope.analysis.attention import neuron_scores_of
from lmscope.views.attention import SCALE

pytestmark = pytest.mark.browser

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."
FLOOR = 0.004  # the head view leaves out lines fainter than this
XSS = "<img src=x onerror=alert(1)>"


def lines(weights: np.ndarray, queries=None, keys=None) -> int:
    """How many lines the head view should draw for ``weights [head, pos_q, pos_k]`` (shipped to 1e-4)."""
    w = np.rint(weights * SCALE) / SCALE
    if queries is not None:
        w[:, ~queries, :] = 0
    if keys is not None:
        w[:, :, ~keys] = 0
    return int((w >= FLOOR).sum())


def drawn(page, selector: str = ".lms-att-lines") -> int:
    return int(page.get_attribute(selector, "data-lines"))


def test_head_view_draws_toggles_and_isolates(browser) -> None:
    result = tiny("llama").trace(TEXT).attention()
    w = result.weights
    n = len(result.tokens)
    opened = open_html(browser, views.page(result.to_html()))
    page = opened.page
    assert page.locator(".lms-att-left .lms-att-tok").count() == n
    assert page.locator(".lms-att-right .lms-att-tok").count() == n
    assert page.locator(".lms-att-left .lms-att-tok").nth(1).text_content() == "·keys"
    assert drawn(page) == lines(w[0])
    assert page.get_attribute(".lms-att-lines", "data-layer") == "0"
    assert page.locator(".lms-att-cutoff").text_content() == "All weights shown."
    # turning head 1 off drops exactly its lines
    page.click(".lms-att-chip[data-head='1']")
    assert drawn(page) == lines(w[0][[0, 2, 3]])
    # another layer
    page.select_option(".lms-att-layer", "2")
    assert page.get_attribute(".lms-att-lines", "data-layer") == "2"
    assert drawn(page) == lines(w[2][[0, 2, 3]])
    # hovering a query token isolates its lines; hovering a key token, the lines into it
    page.hover(".lms-att-left .lms-att-tok[data-pos='7']")
    assert drawn(page) == lines(w[2][[0, 2, 3]], queries=np.arange(n) == 7)
    page.hover(".lms-att-right .lms-att-tok[data-pos='2']")
    assert drawn(page) == lines(w[2][[0, 2, 3]], keys=np.arange(n) == 2)
    # double-clicking a head shows it alone
    page.mouse.move(0, 0)
    page.dblclick(".lms-att-chip[data-head='3']")
    assert drawn(page) == lines(w[2][[3]])
    opened.assert_clean()


def test_model_view_grid_opens_a_head_large(browser) -> None:
    result = tiny("qwen2").trace(TEXT).attention(view="model")
    opened = open_html(browser, views.page(result.to_html()))
    page = opened.page
    assert page.locator(".lms-att-thumb").count() == 3 * 4
    assert page.locator(".lms-att-thumb canvas").count() == 12
    page.click(".lms-att-thumb[data-layer='1'][data-head='2']")
    assert page.locator(".lms-att-detail .lms-title").text_content() == "Layer 1, head 2"
    assert drawn(page, ".lms-att-detail .lms-att-lines") == lines(result.weights[1][[2]])
    assert page.get_attribute(".lms-att-detail .lms-att-lines", "data-layer") == "1"
    opened.assert_clean()


def test_neuron_view_recomputes_the_python_softmax(browser) -> None:
    result = tiny("llama").trace(TEXT).attention(view="neuron", head=1, query=9)
    n = len(result.tokens)
    opened = open_html(browser, views.page(result.to_html()))
    page = opened.page

    def check(layer: int, head: int, query: int) -> None:
        expected = neuron_scores_of(result, layer, head, query)
        rows = page.locator(".lms-att-nrow")
        assert rows.count() == n
        probs = np.array([float(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.prob)")])
        scores = np.array([float(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.score)")])
        np.testing.assert_allclose(probs, expected.probs, atol=1e-5)
        np.testing.assert_allclose(scores, expected.scores, atol=1e-4)
        assert page.locator(".lms-att-nrow.lms-att-masked").count() == int((~expected.visible).sum())
        assert page.locator(".lms-att-qrow .lms-token").text_content() == views.visible(result.tokens[query])

    check(0, 1, 9)
    info = page.locator(".lms-att-ninfo").text_content()
    assert "head 1 reads key/value head 0, shared by heads 0\u20131" in info
    page.select_option(".lms-att-layer", "2")
    page.select_option(".lms-att-head", "3")
    page.select_option(".lms-att-query", "4")
    check(2, 3, 4)
    assert "head 3 reads key/value head 1" in page.locator(".lms-att-ninfo").text_content()
    assert page.locator(".lms-att-nrow canvas").count() == 2 * n
    opened.assert_clean()


def test_sentence_pair_segments_are_marked_and_filter(browser) -> None:
    out = tiny("bert").trace("The cat sat on the mat.", text_pair="It was happy.")
    result = out.attention(layer=1)
    b, n = out.trace.segment_b, len(out.tokens)
    opened = open_html(browser, views.page(result.to_html()))
    page = opened.page
    assert page.locator(".lms-att-left .lms-att-boundary").get_attribute("data-pos") == str(b)
    assert page.locator(".lms-att-left .lms-att-seg-b").count() == n - b
    a_side = np.arange(n) < b
    page.select_option(".lms-att-filter", "AB")
    assert drawn(page) == lines(result.weights[0], queries=a_side, keys=~a_side)
    page.select_option(".lms-att-filter", "BB")
    assert drawn(page) == lines(result.weights[0], queries=~a_side, keys=~a_side)
    opened.assert_clean()


@pytest.mark.parametrize("view", ["head", "model", "neuron"])
def test_tokens_are_escaped(browser, view: str) -> None:
    result = tiny("gpt2").trace(TEXT).attention(view=view, layer=0)
    tokens = list(result.tokens)
    tokens[3] = XSS
    tokens[4] = "</script><script>alert(2)</script>"
    result = dataclasses.replace(result, tokens=tuple(tokens))
    opened = open_html(browser, views.page(result.to_html()))
    page = opened.page
    if view == "model":
        page.click(".lms-att-thumb[data-layer='0'][data-head='0']")
    body = page.locator(".lms-body").text_content()
    assert views.visible(XSS) in body  # shown as text: <img·src=x·onerror=alert(1)>
    assert page.locator(".lmscope img").count() == 0
    assert page.evaluate("document.querySelectorAll('.lmscope script').length") == 2  # data + code only
    opened.assert_clean()


def test_head_view_of_a_thousand_tokens_renders_quickly(browser) -> None:
    lm = tiny("llama")
    ids = lm.encode("The keys to the cabinet are on the table, said Mrs. O'Neill, and nobody moved them. " * 46)
    result = lm.trace(ids[:1000].tolist(), sites=["attn_probs"]).attention()
    assert len(result.tokens) == 1000 and result.top_k == 20  # 3 layers × 4 heads × 1000² pairs: sparsified
    html = views.page(result.to_html())
    page = browser.new_page()
    opened = watch(page)
    start = time.perf_counter()
    page.set_content(html, wait_until="load")
    page.wait_for_selector(".lms-body[data-drawn]")
    seconds = time.perf_counter() - start
    print(f"\nhead view of 1,000 tokens (4 heads, top 20 keys per query, {len(html) / 1e6:.1f} MB): {seconds:.2f} s")
    assert page.locator(".lms-att-left .lms-att-tok").count() == 1000
    assert int(page.get_attribute(".lms-att-lines", "data-lines")) > 4 * 20
    assert "the strongest 20 keys per query" in page.locator(".lms-att-cutoff").text_content()
    # lines follow the scroll position: rows far down are drawn once they come near the screen
    assert int(page.get_attribute(".lms-att-lines", "data-band").split(",")[1]) < 1000 * 18
    page.locator(".lms-att-left .lms-att-tok[data-pos='950']").scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('.lms-att-lines').dataset.band.split(',')[1] >= 950 * 18")
    start = time.perf_counter()
    page.hover(".lms-att-left .lms-att-tok[data-pos='950']")
    hover = time.perf_counter() - start
    print(f"hover isolating one token's lines: {hover:.2f} s")
    strongest = np.sort(result.weights[0, :, 950], axis=-1)[:, ::-1][:, :20]  # [head, 20]
    assert int(page.get_attribute(".lms-att-lines", "data-lines")) == lines(strongest[:, None, :])
    assert seconds < 30 and hover < 10  # generous bounds for a shared 2-core machine
    opened.assert_clean()
    page.close()
