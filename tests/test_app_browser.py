"""The web app in headless Chromium: a real uvicorn server on 127.0.0.1, driven like a user.

Type a prompt, run it, see the flow graph; click a node (its logit lens), an attention edge (head
importances, attention and contribution maps); change the threshold (the graph changes to exactly the
library's graph); open saliency and rankings; export a view and the trace, open the trace again; errors
show in the page; token text stays text; no console errors; no request leaves 127.0.0.1. One run uses
the embedded model. Screenshots go to ``artifacts/``.

Against the LM Transparency Tool: every tab explains the one prediction the token chips and the
graph's start-token menu select (and says which, in the library's words); an attention edge opens
its maps on the head that dominates it, with token labels on both axes and a colour legend; a head
or a neuron in the details shows what it promotes and suppresses (the library's tokens); a node
the new threshold prunes leaves the details column; the graph's token labels are in view and never
cut off, and edges are drawn by weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lmscope
from app_server import ARTIFACTS, serving
from browser import open_html, watch
from conftest import tiny
from lmscope.app import create_app, load_config
from lmscope.app.state import ModelKey
from lmscope.views import visible
from lmscope.views._prediction import describe
from lmscope.views._text import percent

pytestmark = pytest.mark.browser
TEXT = "The keys to the cabinet"
WAIT = 90_000  # ms; the machine is shared


@pytest.fixture(scope="module")
def app_url(embedded: lmscope.LM) -> Any:
    app = create_app(load_config(default_model="tiny-llama", max_input_tokens=64))
    # The session's embedded model serves the app's embedded entry (no second copy in memory).
    app.state.lmscope.models.put(ModelKey("smollm2-135m", "cpu", "float32"), embedded)
    with serving(app) as url:
        yield url


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"app-{name}.png"), full_page=True)


def edges_drawn(page: Any) -> int:
    return page.locator("#panel-flow .lms-flow-edge").count()


def run(page: Any, text: str, model: str = "tiny-llama") -> None:
    """Type ``text``, press Run, and wait until the new run's graph has drawn."""
    old = page.evaluate("window.lmscopeApp.state.run && window.lmscopeApp.state.run.id")
    page.select_option("#model", model)
    page.fill("#text", text)
    page.click("#run")
    page.wait_for_function(
        "old => { const run = window.lmscopeApp.state.run; return run && run.id !== old && "
        "document.querySelector('#panel-flow svg.lms-flow-svg') && !document.body.classList.contains('is-busy'); }",
        arg=old,
        timeout=WAIT,
    )


def test_explore_a_prediction(browser: Any, app_url: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 950}, accept_downloads=True)
    opened = watch(page)
    page.goto(app_url)
    page.wait_for_selector("#model option", state="attached")
    lm = tiny("llama")
    out = lm.trace(TEXT)
    last = len(out.tokens) - 1

    # Run: the graph is the library's graph at the default threshold.
    run(page, TEXT)
    assert page.locator("#tokens .lms-token[data-pos]").all_text_contents() == [visible(t) for t in out.tokens]
    assert edges_drawn(page) == len(out.flow(0.04, details=False).edges)
    shot(page, "graph")

    # A node: the final residual state of the last position shows its logit lens (the model's prediction).
    page.locator(f"#panel-flow circle[data-node='x3.{last}']").click()
    lens_box = page.locator(".details [data-kind=LayerPredictions]")
    lens_box.wait_for(timeout=WAIT)
    top = out.layer_predictions(position=out.position_of_state(last), layer=2, topk=10).tokens[0][0]
    assert visible(top) in lens_box.inner_text()

    # An attention edge: head importances (one bar per head) and attention + contribution maps.
    page.locator("#panel-flow line[data-edge^='a']").first.click(force=True)
    page.locator(".details [data-kind=ContributionMap] svg").first.wait_for(timeout=WAIT)
    shares = page.locator(".details [data-kind=HeadShares] .lms-flow-head")
    assert shares.count() == lm.arch.n_heads
    assert page.locator(".details [data-kind=ContributionMap] svg").count() == 2
    assert page.locator(".details [data-kind=Promoted] .lms-token").count() > 0
    shot(page, "edge-details")

    # Threshold: a stricter one draws exactly the library's smaller graph.
    before = edges_drawn(page)
    page.fill("#threshold", "0.2")
    page.dispatch_event("#threshold", "change")
    want = len(out.flow(0.2, details=False).edges)
    page.wait_for_function(f"document.querySelectorAll('#panel-flow .lms-flow-edge').length === {want}", timeout=WAIT)
    assert want < before

    # Saliency and rankings tabs draw their views.
    page.click("[data-tab=saliency]")
    page.wait_for_selector("#panel-saliency .lmscope[data-mounted]", timeout=WAIT)
    shot(page, "saliency")
    page.click("[data-tab=rankings]")
    page.wait_for_selector("[data-view-box=rankings] .lmscope[data-mounted]", timeout=WAIT)
    page.fill("#watch", "is, are")
    page.click(".watch-form button")
    page.wait_for_selector("[data-view-box=rankings_watch] .lmscope[data-mounted]", timeout=WAIT)

    # Export a view: a standalone page that draws on its own, offline.
    page.click("[data-tab=flow]")
    page.wait_for_selector("#panel-flow svg.lms-flow-svg", timeout=WAIT)
    with page.expect_download(timeout=WAIT) as download:
        page.click("[data-view-box=flow] [data-export]")
    saved = tmp_path / "flow.html"
    download.value.save_as(saved)
    exported = saved.read_text(encoding="utf-8")
    assert exported.startswith("<!DOCTYPE html>") and 'data-view="flow"' in exported
    standalone = open_html(browser, exported)
    assert standalone.page.locator(".lms-flow-edge").count() == want
    standalone.assert_clean()
    standalone.page.close()

    # Export the run as a Trace file and open it again: the same tokens come back.
    with page.expect_download(timeout=WAIT) as download:
        page.click("#export-trace")
    trace_file = tmp_path / "run.safetensors"
    download.value.save_as(trace_file)
    assert lmscope.load_trace(trace_file).tokens == out.tokens
    old_id = page.evaluate("window.lmscopeApp.state.run.id")
    page.fill("#text", "another prompt")
    page.fill("#generate", "3")
    page.set_input_files("#open-trace", str(trace_file))
    page.wait_for_function(f"window.lmscopeApp.state.run.id !== {old_id!r}", timeout=WAIT)
    assert page.evaluate("window.lmscopeApp.state.run.tokens") == list(out.tokens)
    # The prompt fields now describe the opened run.
    assert page.input_value("#text") == TEXT
    assert page.input_value("#generate") == "0"
    assert page.input_value("#model") == "tiny-llama"

    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


def test_errors_and_hostile_tokens(browser: Any, app_url: str) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    opened = watch(page)
    page.goto(app_url)
    page.wait_for_selector("#model option", state="attached")
    page.fill("#text", "   ")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT)
    assert page.text_content("#error-text") == "the text is empty: type or pick a prompt to run"
    page.fill("#text", "word " * 80)
    page.click("#run")
    page.wait_for_function("document.getElementById('error-text').textContent.includes('limit of 64')", timeout=WAIT)
    # The browser logs each refused request; nothing else may appear in the console.
    assert all("status of 400" in e for e in opened.errors) and len(opened.errors) == 2
    opened.errors.clear()

    hostile = "<img src=x onerror=alert(1)> <script>alert(2)</script>"
    run(page, hostile)
    assert page.locator("#error").is_hidden()
    assert page.locator("#tokens img, #panels img").count() == 0  # markup in tokens stayed text
    assert "<img" in "".join(page.evaluate("window.lmscopeApp.state.run.tokens"))
    page.locator("#panel-flow circle[data-node^='x']").last.click()
    page.wait_for_selector(".details [data-kind=LayerPredictions]", timeout=WAIT)
    shot(page, "hostile-tokens")
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


@pytest.mark.embedded
def test_embedded_model_run(browser: Any, app_url: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 950})
    opened = watch(page)
    page.goto(app_url)
    page.wait_for_selector("#model option", state="attached")
    run(page, "The capital of France is", model="smollm2-135m")
    prediction = page.locator("#tokens .predicted")
    assert prediction.inner_text() == visible(" Paris")
    assert edges_drawn(page) > 0
    page.locator("#panel-flow circle[data-node='x30.4']").click()
    lens_box = page.locator(".details [data-kind=LayerPredictions]")
    lens_box.wait_for(timeout=WAIT)
    assert visible(" Paris") in lens_box.inner_text()
    shot(page, "embedded")
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


def idle(page: Any) -> None:
    page.wait_for_function("!document.body.classList.contains('is-busy')", timeout=WAIT)


def open_page(browser: Any, app_url: str) -> tuple[Any, Any]:
    page = browser.new_page(viewport={"width": 1400, "height": 950})
    opened = watch(page)
    page.goto(app_url)
    page.wait_for_selector("#model option", state="attached")
    return page, opened


def test_one_prediction_in_every_tab(browser: Any, app_url: str) -> None:
    """The chips, the graph's start-token menu and every tab explain the same prediction, and say which."""
    page, opened = open_page(browser, app_url)
    lm = tiny("llama")
    out = lm.trace(TEXT)
    n = len(out.tokens)
    top = lm.unembed.token_strings([int(out.logits[-1].argmax())])[0]
    run(page, TEXT)
    watch_words = ["is", "are"]  # as typed: the library ranks them as words, as the app does

    def check(p: int) -> None:
        sentence = describe(p + 1 if p + 1 < n else None, p, out.tokens)
        assert page.locator("#tokens .lms-token.selected").get_attribute("data-pos") == str(p)
        assert sentence in page.locator("#explained").inner_text()

        page.click("[data-tab=flow]")
        page.wait_for_selector("#panel-flow svg.lms-flow-svg", timeout=WAIT)
        menu = page.locator("#panel-flow select.lms-flow-start")
        assert menu.input_value() == str(p)
        assert menu.locator("option[value=all]").count() == 0  # positions only, as the chips
        assert sentence in page.locator("#panel-flow [data-explains]").inner_text()
        want = len(out.flow(0.04, p + 1, details=False).edges)
        page.wait_for_function(
            f"document.querySelectorAll('#panel-flow .lms-flow-edge').length === {want}", timeout=WAIT
        )

        page.click("[data-tab=lens]")
        page.wait_for_selector("[data-view-box=lens] .lmscope[data-mounted]", timeout=WAIT)
        title = str(out.layer_predictions(p + 1)).splitlines()[0]
        assert sentence in title
        assert page.locator("[data-view-box=lens] .lms-title").inner_text() == title
        assert sentence in page.locator("#panel-lens [data-explains]").inner_text()

        page.click("[data-tab=saliency]")
        root = page.locator("[data-view-box=saliency] .lmscope[data-mounted]")
        root.wait_for(timeout=WAIT)
        assert root.get_attribute("data-selected") == str(p + 1)  # the token after the state at p
        info = page.locator("[data-view-box=saliency] .lms-sal-info").inner_text()
        token = out.tokens[p + 1] if p + 1 < n else top  # after the last token: the model's prediction
        assert json.dumps(token, ensure_ascii=False) in info
        if p + 1 < n:
            assert percent(float(out.primary_attributions(positions=[p + 1]).values[0])) in info
        assert sentence in page.locator("#panel-saliency [data-explains]").inner_text()

        page.click("[data-tab=rankings]")
        if page.input_value("#watch") == "":
            page.fill("#watch", "is, are")
            page.click(".watch-form button")
        twin = page.locator("[data-view-box=rankings_watch] .lmscope[data-mounted] .lmscope-static")
        twin.wait_for(state="attached", timeout=WAIT)
        assert str(out.rankings_watch(watch_words, p + 1)).splitlines()[0] in twin.text_content()
        assert sentence in page.locator("#panel-rankings [data-explains]").inner_text()
        idle(page)

    check(n - 1)  # a new run explains the prediction after the last token
    page.click("#tokens .lms-token[data-pos='2']")  # a chip
    check(2)
    page.click("[data-tab=flow]")
    page.wait_for_selector("#panel-flow svg.lms-flow-svg", timeout=WAIT)
    page.select_option("#panel-flow select.lms-flow-start", "1")  # the graph's own menu
    page.wait_for_selector("#tokens .lms-token.selected[data-pos='1']", timeout=WAIT)
    check(1)
    # Another saliency method explains the same prediction.
    page.click("[data-tab=saliency]")
    page.select_option("#panel-saliency select[data-control=method]", "occlusion")
    root = page.locator("[data-view-box=saliency] .lmscope[data-mounted]")
    page.wait_for_function(
        "() => { const v = document.querySelector('[data-view-box=saliency] .lmscope[data-mounted]');"
        " return v && v.textContent.includes('occlusion'); }",
        timeout=WAIT,
    )
    assert root.get_attribute("data-selected") == "2"
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


def test_heads_and_neurons_in_the_details(browser: Any, app_url: str) -> None:
    """An attention edge opens its maps on its dominant head; heads and neurons show what they promote."""
    page, opened = open_page(browser, app_url)
    lm = tiny("llama")
    out = lm.trace(TEXT)
    run(page, TEXT)
    details = page.locator("#panel-flow .details")

    edge = page.evaluate(
        """() => { let best = null, w = -1;
        document.querySelectorAll("#panel-flow line[data-edge^='a']").forEach(l => {
          const v = parseFloat(l.getAttribute('data-weight'));
          if (v > w) { w = v; best = l.getAttribute('data-edge'); } });
        return best; }"""
    )
    layer, source, target = (int(x) for x in edge[1:].split(".")[:3])
    page.locator(f"#panel-flow line[data-edge='{edge}']").click(force=True)
    details.locator("[data-kind=ContributionMap] svg.lms-map-svg").first.wait_for(timeout=WAIT)
    shares = out.head_shares(layer, target, source).shares
    dominant = int(np.argmax(shares))
    assert details.get_attribute("data-dominant-head") == str(dominant)
    head_menu = details.locator("[data-kind=ContributionMap] select.lms-map-head")
    assert head_menu.input_value() == str(dominant)
    assert "selected" in details.locator(f"[data-kind=HeadShares] [data-head='{dominant}']").get_attribute("class")

    # Both maps: every token on both axes, a colour legend, the edge's cell outlined, nothing cut off.
    maps = details.locator("[data-kind=ContributionMap] svg.lms-map-svg")
    assert maps.count() == 2
    labels = [f"{i} {visible(t)}" for i, t in enumerate(out.tokens)]
    for i in range(2):
        axis = maps.nth(i).evaluate(
            """svg => ['lms-map-row', 'lms-map-col'].map(c =>
                 Array.from(svg.querySelectorAll('text.' + c)).map(t => t.childNodes[0].nodeValue))"""
        )
        assert axis == [labels, labels]
        assert maps.nth(i).locator(".lms-map-legend rect").count() == 1
        assert maps.nth(i).locator("rect.lms-map-mark").count() == 1
    cut = page.evaluate(
        """() => { const cut = [];
        document.querySelectorAll('#panel-flow .details svg.lms-map-svg').forEach(svg => {
          const box = svg.getBoundingClientRect();
          svg.querySelectorAll('text').forEach(t => { const r = t.getBoundingClientRect();
            if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
              cut.push(t.textContent); }); });
        return cut; }"""
    )
    assert cut == []
    shot(page, "edge-dominant-head")

    # Another head: what it writes at the edge's target, as the library computes it.
    other = (dominant + 1) % lm.arch.n_heads
    details.locator(f"[data-kind=HeadShares] [data-head='{other}']").click()
    promoted = details.locator("[data-kind=HeadPromoted] .lmscope[data-mounted]")
    promoted.wait_for(timeout=WAIT)
    want = out.promoted_tokens(layer, target, "attention", head=other, topk=10)
    assert promoted.locator(".lms-promoted .lms-token").all_text_contents() == [visible(t) for t in want.promoted]
    assert promoted.locator(".lms-suppressed .lms-token").all_text_contents() == [visible(t) for t in want.suppressed]
    assert head_menu.input_value() == str(other)  # the maps follow the clicked head
    shot(page, "head-promoted")

    # A block's node after attention: its head importances, clickable as well.
    node = page.locator("#panel-flow circle[data-node^='m']").first
    node_id = node.get_attribute("data-node")
    layer_m, pos_m = (int(x) for x in node_id[1:].split("."))
    node.click(force=True)
    block = details.locator("[data-view-box=details-block-heads] .lmscope[data-mounted]")
    block.wait_for(timeout=WAIT)
    block.locator("[data-head='0']").click()
    promoted.wait_for(timeout=WAIT)
    want = out.promoted_tokens(layer_m, pos_m, "attention", head=0, topk=10)
    assert promoted.locator(".lms-promoted .lms-token").all_text_contents() == [visible(t) for t in want.promoted]

    # An FFN block: its top neurons; a neuron shows what its update promotes and suppresses.
    square = page.locator("#panel-flow rect[data-node^='f']").first
    layer_f, pos_f = (int(x) for x in square.get_attribute("data-node")[1:].split("."))
    square.click(force=True)
    row = details.locator("[data-kind=TopNeurons] [data-neuron]").first
    row.wait_for(timeout=WAIT)
    neuron = int(row.get_attribute("data-neuron"))
    assert neuron == int(out.top_neurons(layer_f, pos_f, 10).neurons[0])
    row.click()
    neuron_box = details.locator("[data-kind=NeuronPromoted] .lmscope[data-mounted]")
    neuron_box.wait_for(timeout=WAIT)
    want = out.promoted_tokens(layer_f, pos_f, "ffn", neuron=neuron, topk=10)
    assert neuron_box.locator(".lms-promoted .lms-token").all_text_contents() == [visible(t) for t in want.promoted]
    shot(page, "neuron-promoted")
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


def test_pruned_details_and_stale_errors(browser: Any, app_url: str) -> None:
    """A node the new threshold prunes leaves the details column; an error banner goes with the next action."""
    page, opened = open_page(browser, app_url)
    out = tiny("llama").trace(TEXT)
    run(page, TEXT)
    loose = {node.id for node in out.flow(0.04, details=False).nodes}
    strict = {node.id for node in out.flow(0.2, details=False).nodes}
    gone = sorted(i for i in loose - strict if i[0] in "xm")
    assert gone, "the stricter threshold should prune a residual node"
    page.locator(f"#panel-flow circle[data-node='{gone[0]}']").click(force=True)
    page.wait_for_selector(f"#panel-flow .details[data-details='{gone[0]}'] .lmscope[data-mounted]", timeout=WAIT)
    page.fill("#threshold", "0.2")
    page.dispatch_event("#threshold", "change")
    note = page.locator("#panel-flow .details .details-note")
    note.wait_for(timeout=WAIT)
    assert gone[0] in note.inner_text()
    assert page.locator("#panel-flow .details[data-details]").count() == 0

    # A kept node stays open when the threshold changes again.
    kept = sorted(i for i in strict if i[0] == "x")[0]
    page.locator(f"#panel-flow circle[data-node='{kept}']").click(force=True)
    page.wait_for_selector(f"#panel-flow .details[data-details='{kept}'] .lmscope[data-mounted]", timeout=WAIT)
    page.fill("#threshold", "0.1")
    page.dispatch_event("#threshold", "change")
    want = len(out.flow(0.1, details=False).edges)
    page.wait_for_function(f"document.querySelectorAll('#panel-flow .lms-flow-edge').length === {want}", timeout=WAIT)
    idle(page)
    assert page.locator(f"#panel-flow .details[data-details='{kept}']").count() == 1

    # Errors: the banner clears on the next action (a tab), and on the next run.
    page.fill("#text", "   ")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT)
    page.click("[data-tab=lens]")
    assert page.locator("#error").is_hidden()
    page.click("[data-tab=flow]")
    page.fill("#text", "   ")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT)
    run(page, TEXT + " again")
    assert page.locator("#error").is_hidden()
    assert len(opened.errors) == 2 and all("status of 400" in e for e in opened.errors)
    opened.errors.clear()
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


def graph_layout(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => {
        const wrap = document.querySelector('#panel-flow .lms-flow-wrap');
        const rect = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        const svg = wrap.querySelector('svg.lms-flow-svg'), axis = wrap.querySelector('svg.lms-flow-axis-svg');
        return {
          wrap: rect(wrap), axis: rect(axis), clientWidth: wrap.clientWidth, svgWidth: svg.width.baseVal.value,
          scrollHeight: wrap.scrollHeight, clientHeight: wrap.clientHeight, viewport: window.innerHeight,
          labels: Array.from(axis.querySelectorAll('text.lms-flow-token')).map(rect), graph: rect(svg),
          shapes: Array.from(svg.querySelectorAll('circle.lms-flow-node, rect.lms-flow-ffn, text')).map(rect),
          edges: Array.from(svg.querySelectorAll('.lms-flow-edge')).map(l => [
            parseFloat(l.getAttribute('data-weight')), parseFloat(l.getAttribute('stroke-width')),
            parseFloat(l.getAttribute('stroke').split(',')[3])]),
        };
      }"""
    )


def inside(inner: list[float], outer: list[float]) -> bool:
    return (
        inner[0] >= outer[0] - 1 and inner[1] >= outer[1] - 1 and inner[2] <= outer[2] + 1 and inner[3] <= outer[3] + 1
    )


def check_graph(layout: dict[str, Any], n_tokens: int) -> None:
    assert len(layout["labels"]) == n_tokens
    assert all(inside(label, layout["axis"]) for label in layout["labels"])  # never cut off
    assert all(inside(shape, layout["graph"]) for shape in layout["shapes"])  # nodes, squares, layer labels too
    assert all(label[3] <= min(layout["wrap"][3], layout["viewport"]) for label in layout["labels"])  # in view
    edges = layout["edges"]
    assert [e[0] for e in edges] == sorted(e[0] for e in edges)  # the decisive edges drawn last, on top
    by_weight = sorted(edges)
    assert [e[1] for e in by_weight] == sorted(e[1] for e in by_weight)  # width grows with weight
    assert [e[2] for e in by_weight] == sorted(e[2] for e in by_weight)  # and so does opacity


def test_graph_labels_on_a_long_input(browser: Any, app_url: str) -> None:
    """Many tokens: slanted labels, all inside the graph's box, none cut off; the graph takes the box's width."""
    page, opened = open_page(browser, app_url)
    text = " ".join(f"w{i}" for i in range(24))
    run(page, text)
    n = page.evaluate("window.lmscopeApp.state.run.tokens.length")
    layout = graph_layout(page)
    check_graph(layout, n)
    assert layout["svgWidth"] >= 0.9 * layout["clientWidth"]
    shot(page, "graph-long-input")
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()


@pytest.mark.embedded
def test_embedded_graph_reads_like_lm_tt(browser: Any, app_url: str) -> None:
    """30 layers fit the box with the token labels in view; the graph uses the width it has."""
    page, opened = open_page(browser, app_url)
    run(page, "The keys to the cabinet are on the table, said", model="smollm2-135m")
    layout = graph_layout(page)
    check_graph(layout, 11)
    assert layout["scrollHeight"] <= layout["clientHeight"] + 1  # no scrolling to reach the token labels
    assert layout["svgWidth"] >= 0.9 * layout["clientWidth"]
    shot(page, "embedded-graph")
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()

    # A low window: the graph scrolls in its box, and the token labels stay in view at the box's bottom.
    page, opened = open_page(browser, app_url)
    page.set_viewport_size({"width": 1200, "height": 560})
    run(page, "The keys to the cabinet are on the table, said", model="smollm2-135m")
    wrap = page.locator("#panel-flow .lms-flow-wrap")
    assert wrap.evaluate("w => w.scrollHeight > w.clientHeight + 1")
    for scroll in (0, 10_000):
        wrap.evaluate(f"w => {{ w.scrollTop = {scroll}; }}")
        layout = graph_layout(page)
        assert all(inside(label, layout["wrap"]) for label in layout["labels"])
    shot(page, "embedded-graph-low-window")
    opened.assert_clean(allowed_prefixes=(app_url + "/",))
    page.close()
