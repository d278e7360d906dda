"""The web app in headless Chromium: a real uvicorn server on 127.0.0.1, driven like a user.

Type a prompt, run it, see the flow graph; click a node (its logit lens), an attention edge (head
importances, attention and contribution maps); change the threshold (the graph changes to exactly the
library's graph); open saliency and rankings; export a view and the trace, open the trace again; errors
show in the page; token text stays text; no console errors; no request leaves 127.0.0.1. One run uses
the embedded model. Screenshots go to ``artifacts/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import lmscope
from app_server import ARTIFACTS, serving
from browser import open_html, watch
from conftest import tiny
from lmscope.app import create_app, load_config
from lmscope.app.state import ModelKey
from lmscope.views import visible

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
    return page.locator("#panel-flow line.lms-flow-edge").count()


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
    top = out.layer_predictions(position=last, layer=2, topk=10).tokens[0][0]
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
    page.wait_for_function(
        f"document.querySelectorAll('#panel-flow line.lms-flow-edge').length === {want}", timeout=WAIT
    )
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
    assert standalone.page.locator("line.lms-flow-edge").count() == want
    standalone.assert_clean()
    standalone.page.close()

    # Export the run as a Trace file and open it again: the same tokens come back.
    with page.expect_download(timeout=WAIT) as download:
        page.click("#export-trace")
    trace_file = tmp_path / "run.safetensors"
    download.value.save_as(trace_file)
    assert lmscope.load_trace(trace_file).tokens == out.tokens
    old_id = page.evaluate("window.lmscopeApp.state.run.id")
    page.set_input_files("#open-trace", str(trace_file))
    page.wait_for_function(f"window.lmscopeApp.state.run.id !== {old_id!r}", timeout=WAIT)
    assert page.evaluate("window.lmscopeApp.state.run.tokens") == list(out.tokens)

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
