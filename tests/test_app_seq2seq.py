"""The web app's JSON API on encoder-decoder models (tiny-t5, tiny-bart): a run with a target is the
library's teacher-forced trace, a run without one the library's greedy generation; the run names its
source and target; every analysis answers the library's result or a clear one-line message."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import tiny
from lmscope.app import create_app, load_config

SOURCE = "The cat sat on the mat"
TARGET = "Die Katze"


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(load_config(default_model="tiny-t5", max_input_tokens=32, max_generate=4)))


def post_run(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/runs", json={"text": SOURCE, **body})
    assert response.status_code == 200, response.text
    return response.json()


def get(client: TestClient, run: dict[str, Any], route: str, **params: Any) -> Any:
    return client.get(f"/api/runs/{run['id']}/{route}", params=params)


def test_config_offers_a_target_for_encoder_decoders(client: TestClient) -> None:
    config = client.get("/api/config").json()
    assert {"tiny-t5", "tiny-bart"} <= set(config["seq2seq_models"])
    assert "tiny-llama" not in config["seq2seq_models"]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_run_with_target_is_the_teacher_forced_trace(client: TestClient, family: str) -> None:
    lm = tiny(family)
    out = lm.trace(SOURCE, target=TARGET)
    run = post_run(client, model=f"tiny-{family}", target=TARGET)
    assert run["seq2seq"] is True
    assert run["text"] == SOURCE and run["target"] == lm.tokenizer.decode(
        out.trace.token_ids[1:].tolist(), skip_special_tokens=True
    )
    assert run["source_tokens"] == list(out.trace.encoder.tokens)
    assert run["tokens"] == list(out.tokens) and run["n_input"] == out.trace.n_input == len(out.tokens)
    best = out.trace.logits.float().softmax(-1).max(-1)
    assert [p["prob"] for p in run["predictions"]] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert run["capabilities"]["intervene"] is False  # not supported on encoder-decoders yet
    assert run["capabilities"]["flow"] is (family == "t5")  # BART is post-norm


def test_run_without_target_generates(client: TestClient) -> None:
    lm = tiny("t5")
    out = lm.generate(SOURCE, 3)
    for body in ({"generate": 3}, {"generate": 3, "target": ""}, {"generate": 3, "target": "  "}):
        run = post_run(client, model="tiny-t5", **body)
        assert run["tokens"] == list(out.tokens) and run["n_input"] == 1 and run["target"] == ""
    assert post_run(client, model="tiny-t5")["n_input"] == 1  # nothing given: one token generated
    # a target continued by generated tokens
    run = post_run(client, model="tiny-t5", target=TARGET, generate=2)
    assert run["tokens"] == list(lm.generate(SOURCE, 2, target=TARGET).tokens)


def test_every_analysis_answers_on_t5(client: TestClient) -> None:
    lm = tiny("t5")
    out = lm.trace(SOURCE, target=TARGET)
    run = post_run(client, model="tiny-t5", target=TARGET)
    last = len(out.tokens)

    lens = get(client, run, "lens", position=last, html=False).json()
    assert lens["text"] == str(out.layer_predictions(last))
    rankings = get(client, run, "rankings", html=False).json()
    assert rankings["text"] == str(out.rankings())
    assert get(client, run, "rankings_watch", watch=f"#{out.trace.token_ids[1]}", html=False).status_code == 200

    saliency = get(client, run, "saliency", position=last - 1).json()
    want = out.saliency(positions=[last - 1])
    assert saliency["kind"] == type(want).__name__ == "Seq2SeqSaliency"
    assert saliency["text"] == str(want) and "lmscope" in saliency["html"]

    flow = get(client, run, "flow", position=last, threshold=0.0).json()
    graph = out.flow(0.0, last)
    assert flow["data"]["source_tokens"] == list(out.trace.encoder.tokens)
    assert flow["data"]["edges"] == graph.to_dict()["edges"]
    assert any(edge["kind"] == "cross" for edge in flow["data"]["edges"])  # from encoder output positions

    cross = get(client, run, "attention", part="cross", data=True).json()
    weights = np.asarray(cross["data"]["weights"])
    assert weights.shape == (2, 4, len(out.tokens), len(out.trace.encoder.tokens))
    np.testing.assert_allclose(weights, np.asarray(out.attention(part="cross").weights, dtype=np.float64), atol=1e-6)
    assert get(client, run, "attention").json()["kind"] == "EncoderDecoderAttention"
    assert get(client, run, "attention", view="neuron", part="decoder").status_code == 200

    assert get(client, run, "top_neurons", layer=0, position=1).json()["text"] == str(out.top_neurons(0, 1))
    assert get(client, run, "nodes/x1.1").status_code == 200
    assert get(client, run, "edges/a0.0.1.mid").status_code == 200
    for element in ("nodes/e.1", "nodes/c0.1", "edges/c0.2.1.cross"):
        answer = get(client, run, element)
        assert answer.status_code == 400 and "Cross view" in answer.json()["detail"]


def test_bart_refuses_the_graph_in_one_line(client: TestClient) -> None:
    run = post_run(client, model="tiny-bart", target=TARGET)
    for route, params in (("flow", {}), ("top_neurons", {"layer": 0})):
        answer = get(client, run, route, **params)
        assert answer.status_code == 400 and "post-norm" in answer.json()["detail"]
    assert get(client, run, "attention", part="cross").status_code == 200
    assert get(client, run, "lens").status_code == 200


def test_bad_targets(client: TestClient) -> None:
    answer = client.post("/api/runs", json={"text": SOURCE, "model": "tiny-llama", "target": TARGET})
    assert answer.status_code == 400 and "not an encoder-decoder" in answer.json()["detail"]
    answer = client.post("/api/runs", json={"text": SOURCE, "model": "tiny-t5", "target": "x" * 5000})
    assert answer.status_code == 400 and "target is 5000 characters" in answer.json()["detail"]
    body = b'{"text": "The cat", "model": "tiny-t5", "target": "Die \\ud800"}'
    answer = client.post("/api/runs", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "target holds a lone surrogate" in answer.json()["detail"]
    answer = client.post("/api/runs", json={"text": SOURCE, "model": "tiny-t5", "target": "Katze " * 40})
    assert answer.status_code == 400 and "\n" not in answer.json()["detail"]


@pytest.mark.browser
def test_page_runs_t5_with_a_target(browser: Any) -> None:
    """Headless Chromium: pick tiny-t5, type a source and a target, run; the source and target tokens
    show, the graph draws the library's cross-attention edges, the attention tab's Cross kind draws."""
    from app_server import ARTIFACTS, serving
    from browser import watch
    from lmscope.views import visible

    wait = 90_000
    lm = tiny("t5")
    out = lm.trace(SOURCE, target=TARGET)
    app = create_app(load_config(default_model="tiny-llama", max_input_tokens=32, max_generate=4))
    with serving(app) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        opened = watch(page)
        page.goto(url)
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#target-field").is_hidden()  # a decoder-only model takes no target
        page.select_option("#model", "tiny-t5")
        assert page.locator("#target-field").is_visible()
        page.fill("#text", SOURCE)
        page.fill("#target", TARGET)
        page.click("#run")
        page.wait_for_function(
            "() => document.querySelector('#panel-flow svg.lms-flow-svg') && "
            "!document.body.classList.contains('is-busy')",
            timeout=wait,
        )
        source = page.locator("#tokens [data-side=source] .lms-token").all_text_contents()
        assert source == [visible(t) for t in out.trace.encoder.tokens]
        assert page.locator("#tokens .lms-token[data-pos]").all_text_contents() == [visible(t) for t in out.tokens]
        cross = page.locator("#panel-flow [data-edge^='c']")
        assert cross.count() == sum(e.kind == "cross" for e in out.flow(0.04, len(out.tokens)).edges) > 0

        cross.first.click(force=True)  # no details yet: a note naming the Cross view
        page.wait_for_selector("#panel-flow .details[data-details^='c']", timeout=wait)
        assert "Cross view" in page.locator("#panel-flow .details").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-seq2seq-graph.png"), full_page=True)

        for tab, box in (("saliency", "saliency"), ("lens", "lens"), ("rankings", "rankings")):
            page.click(f"[data-tab={tab}]")
            page.wait_for_selector(f"[data-view-box={box}] .lmscope[data-mounted]", timeout=wait)
        page.click("[data-tab=attention]")
        page.wait_for_selector("[data-view-box=attention] .lmscope[data-mounted]", timeout=wait)
        page.select_option("#panel-attention select[data-control=part]", "cross")
        page.wait_for_function(
            "() => document.querySelector('[data-view-box=attention] .view-body').getAttribute('data-kind') === "
            "'Attention' && !document.body.classList.contains('is-busy')",
            timeout=wait,
        )
        assert page.locator("[data-view-box=attention] .lmscope[data-mounted]").count() == 1
        page.screenshot(path=str(ARTIFACTS / "app-seq2seq-cross.png"), full_page=True)

        # BART with an empty target: the decoder generates; post-norm, so no graph tab, the others draw.
        old = page.evaluate("window.lmscopeApp.state.run.id")
        page.select_option("#model", "tiny-bart")
        page.fill("#target", "")
        page.fill("#generate", "2")
        page.click("#run")
        page.wait_for_function(
            "old => window.lmscopeApp.state.run.id !== old && document.querySelector('.panel:not([hidden]) "
            ".lmscope[data-mounted]') && !document.body.classList.contains('is-busy')",
            arg=old,
            timeout=wait,
        )
        generated = tiny("bart").generate(SOURCE, 2)
        assert page.locator("#tokens .lms-token[data-pos]").all_text_contents() == [
            visible(t) for t in generated.tokens
        ]
        assert page.locator("[data-tab=flow]").count() == 0 and page.locator("[data-tab=attention]").count() == 1
        opened.assert_clean(allowed_prefixes=(url,))
        page.close()


def test_trace_file_round_trip(client: TestClient) -> None:
    """An encoder-decoder run exported as a Trace file opens again with its source and target; without
    its model only the attention (all three kinds) works."""
    run = post_run(client, model="tiny-t5", target=TARGET)
    data = get(client, run, "trace").content
    headers = {"content-type": "application/octet-stream"}
    for attach in (True, False):
        opened = client.post("/api/traces", params={"attach": attach}, content=data, headers=headers).json()
        for key in ("tokens", "source_tokens", "n_input", "text", "target", "seq2seq"):
            assert opened[key] == run[key], key
        assert opened["capabilities"]["lens"] is attach and opened["capabilities"]["attention"]
        cross = get(client, opened, "attention", part="cross", data=True).json()
        assert cross["data"] == get(client, run, "attention", part="cross", data=True).json()["data"]


def test_costs_count_the_source() -> None:
    from lmscope.app.analyses import flow_cost, saliency_cost

    trace = tiny("t5").trace(SOURCE, target=TARGET).trace
    tokens = trace.n_pos + trace.encoder.n_pos
    assert saliency_cost(trace, "gradient", [1], 1)[0] == tokens * trace.model.n_layers
    assert flow_cost(trace, 1)[0] == 4 * tokens * trace.model.n_layers
