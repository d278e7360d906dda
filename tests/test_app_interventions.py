"""Ablate and patch from the web app: the API equals the library's intervention, bad requests are
clear 4xx messages, and in headless Chromium a click on a node or edge re-runs and shows what changed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app_server import serving
from browser import watch
from conftest import tiny
from lmscope.analysis.effect import flow_element_interventions, intervention_effect
from lmscope.app import create_app, load_config
from lmscope.views import visible

TEXT = "The keys to the cabinet"
OTHER = "The cat to the cabinet"  # as many tokens as TEXT
WAIT = 90_000  # ms; the machine is shared


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(load_config(default_model="tiny-llama", max_input_tokens=24, max_cost=10**6)))


def run_id(client: TestClient, text: str = TEXT) -> str:
    response = client.post("/api/runs", json={"text": text})
    assert response.status_code == 200, response.text
    assert response.json()["capabilities"]["intervene"] is True
    return response.json()["id"]


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    return detail


def test_ablate_and_patch_equal_the_library(client: TestClient) -> None:
    lm, rid = tiny("llama"), run_id(client)
    out = lm.trace(TEXT)
    graph = out.flow(threshold=0.02)
    elements = [graph.nodes[0].id, "f1.4"]
    elements += [next(e.id for e in graph.edges if e.kind == kind) for kind in ("attention", "ffn", "residual")]
    for element in elements:
        for op, source in (("ablate", None), ("patch", OTHER)):
            params = {"element": element, "op": op, "position": 3, "topk": 5, **({"source": source} if source else {})}
            reply = client.get(f"/api/runs/{rid}/intervene", params=params).json()
            interventions, description = flow_element_interventions(lm, out, element, op, source)
            want = intervention_effect(lm, out, interventions, position=3, topk=5, description=description)
            assert reply["kind"] == "InterventionEffect" and reply["text"] == str(want), (element, op)
            assert reply["data"]["logit_after"] == pytest.approx(want.logit_after, abs=1e-5)
            assert 'data-view="effect"' in reply["html"]
        # Patching from the run's own text changes nothing.
        same = client.get(f"/api/runs/{rid}/intervene", params={"element": element, "op": "patch", "source": TEXT})
        data = same.json()["data"]
        assert data["logit_after"] == pytest.approx(data["logit_before"], abs=1e-4), element


def test_what_an_ablation_does_by_hand() -> None:
    """Ablating an FFN node zeroes that MLP output; ablating a residual edge leaves only the sublayer's update."""
    lm = tiny("llama")
    out = lm.trace(TEXT)
    (ffn,), _ = flow_element_interventions(lm, out, "f1.2", "ablate")
    assert (ffn.site, ffn.op, ffn.layers, ffn.positions) == ("mlp_out", "zero", (1,), (2,))
    (edge,), _ = flow_element_interventions(lm, out, "r1.2.2.mid", "ablate")
    after = lm.trace(TEXT, interventions=[edge])
    attn = out.trace.at("attn_out", 1)[2]
    assert float((after.trace.at("resid_mid", 1)[2] - attn).abs().max()) < 1e-5


def test_bad_intervention_requests(client: TestClient) -> None:
    rid = run_id(client)
    url = f"/api/runs/{rid}/intervene"
    for params, message in [
        ({"element": "z1.2"}, "unknown flow element"),
        ({"element": "x9.1"}, "layer 9 of 'x9.1' does not exist"),
        ({"element": "f1.9"}, "position 9 of 'f1.9' does not exist"),
        ({"element": "f1.2", "op": "steer"}, "unknown operation 'steer'"),
        ({"element": "f1.2", "op": "patch"}, "patch needs a source"),
        ({"element": "f1.2", "op": "patch", "source": "   "}, "patch needs a source"),
        ({"element": "f1.2", "op": "patch", "source": "Much longer than the run it patches"}, "equal length"),
        ({"element": "r1.2.2.post", "op": "patch", "source": "Short"}, "equal length"),
        ({"element": "f1.2", "source": OTHER}, "ablate takes no source"),
        ({"element": "f1.2.3.post"}, "stays at one position"),
        ({"element": "r1.2.2.pre"}, "a residual edge ends after"),
        ({"element": "f1.2", "position": 7}, "position 7 does not exist"),
        ({"element": "f1.2", "op": "patch", "source": "x" * 10_000}, "far beyond"),
    ]:
        assert message in error(client.get(url, params=params), 400), params
    assert "topk" in error(client.get(url, params={"element": "f1.2", "topk": 0}), 422)
    assert "element" in error(client.get(url), 422)
    assert "unknown run" in error(client.get("/api/runs/nope/intervene", params={"element": "f1.2"}), 404)
    cheap = TestClient(create_app(load_config(default_model="tiny-llama", max_cost=10)))
    rid = run_id(cheap)
    assert "more than this app's max_cost" in error(cheap.get(f"/api/runs/{rid}/intervene?element=f1.2"), 400)


@pytest.mark.browser
def test_ablate_and_patch_from_the_graph(browser: Any) -> None:
    app = create_app(load_config(default_model="tiny-llama", max_input_tokens=24))
    lm = tiny("llama")
    out = lm.trace(TEXT)
    last = len(out.tokens) - 1
    with serving(app) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        opened = watch(page)
        page.goto(url)
        page.wait_for_selector("#model option", state="attached")
        page.fill("#text", TEXT)
        page.click("#run")
        page.wait_for_selector("#panel-flow svg.lms-flow-svg", timeout=WAIT)

        # An FFN node: its details carry the intervention bar; Ablate shows the library's effect.
        node = page.locator("#panel-flow [data-node^='f']").first
        element = node.get_attribute("data-node")
        node.click(force=True)
        bar = page.locator(f".details .intervene[data-intervene='{element}']")
        bar.wait_for(timeout=WAIT)
        bar.locator("button.intervene-ablate").click()
        effect = bar.locator(".intervene-result[data-kind=InterventionEffect] .lms-ef-summary")
        effect.wait_for(timeout=WAIT)
        want = intervention_effect(lm, out, flow_element_interventions(lm, out, element)[0], position=last)
        assert f"difference {want.logit_diff:+.3f}" in effect.text_content()
        assert bar.locator(".lms-ef-after .lms-token").first.text_content() == visible(want.top_after[0])

        # Patch from another text of as many tokens; then from one of another length: a clear error.
        bar.locator("input.intervene-source").fill(OTHER)
        bar.locator("button.intervene-patch").click()
        page.wait_for_function(
            "el => document.querySelector(`.intervene[data-intervene='${el}'] .lms-ef-summary`) && "
            "document.querySelector(`.intervene[data-intervene='${el}'] .lmscope`).textContent.includes('patch')",
            arg=element,
            timeout=WAIT,
        )
        bar.locator("input.intervene-source").fill("Too short")
        bar.locator("button.intervene-patch").click()
        page.wait_for_selector("#error:not([hidden])", timeout=WAIT)
        assert "equal length" in page.locator("#error-text").text_content()

        # A residual edge opens the bar alone.
        page.locator("#panel-flow [data-edge^='r']").first.click(force=True)
        page.locator(".details .intervene[data-intervene^='r'] button.intervene-ablate").click()
        page.locator(".details .intervene-result[data-kind=InterventionEffect]").wait_for(timeout=WAIT)
        opened.errors = [e for e in opened.errors if "400" not in e]  # the refused patch above
        opened.assert_clean(allowed_prefixes=(url,))
