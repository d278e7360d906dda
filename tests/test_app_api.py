"""The web app's JSON API (FastAPI's test client): every route, answers equal to direct library
calls, bounded caches keyed by (model, device, dtype), and bad input as 4xx JSON with a clear message."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import lmscope
from conftest import tiny
from lmscope.app import create_app, load_config
from lmscope.app.analyses import FLOW_SITES, capabilities
from lmscope.app.state import RunCache

TEXT = "The keys to the cabinet"


def write_config(directory: Path, **settings: Any) -> Path:
    config = {
        "default_model": "tiny-llama",
        "models": {
            "tiny-llama": {"source": "tiny-llama", "description": "random llama"},
            "tiny-gpt2": "tiny-gpt2",
            "tiny-bert": "tiny-bert",
            "local": {"source": "./local-gpt2", "description": "a local directory, relative to the config"},
        },
        "sample_prompts": "prompts.json",
        "max_input_tokens": 24,
        "max_generate": 4,
        "devices": ["cpu"],
        "dtypes": ["float32", "bfloat16"],
        "allow_paths": True,
        "allowed_dirs": ["./allowed"],
        "model_cache_size": 2,
        "run_cache_size": 4,
        "run_cache_mb": 64,
        "max_upload_mb": 8,
        **settings,
    }
    (directory / "prompts.json").write_text(json.dumps([TEXT, "Hello"]))
    path = directory / "app.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config directory with a local model (tiny-gpt2 saved to disk) and an allowed directory."""
    root = tmp_path_factory.mktemp("app")
    lm = tiny("gpt2")
    lm.model.save_pretrained(root / "local-gpt2")
    lm.tokenizer.save_pretrained(root / "local-gpt2")
    (root / "allowed").mkdir()
    lm.model.save_pretrained(root / "allowed" / "model")
    lm.tokenizer.save_pretrained(root / "allowed" / "model")
    return root


@pytest.fixture(scope="module")
def client(site: Path) -> TestClient:
    return TestClient(create_app(write_config(site)))


def post_run(client: TestClient, text: str = TEXT, **body: Any) -> dict[str, Any]:
    response = client.post("/api/runs", json={"text": text, **body})
    assert response.status_code == 200, response.text
    return response.json()


def upload(client: TestClient, data: bytes, **params: Any) -> Any:
    """POST a trace file as the page does (raw body, ``application/octet-stream``)."""
    return client.post("/api/traces", params=params, content=data, headers={"content-type": "application/octet-stream"})


def error(response: Any, status: int) -> str:
    """The one-line message of a JSON error reply (never an HTML page or a traceback)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and "Traceback" not in detail
    return detail


def test_config_page_and_schema(client: TestClient) -> None:
    config = client.get("/api/config").json()
    assert config["default_model"] == "tiny-llama"
    assert list(config["models"]) == ["tiny-llama", "tiny-gpt2", "tiny-bert", "local"]
    assert config["sample_prompts"] == [TEXT, "Hello"]
    assert config["dtypes"] == ["float32", "bfloat16"] and config["max_input_tokens"] == 24
    assert "/" not in json.dumps(config["models"])  # no filesystem paths leak to the page
    page = client.get("/")
    assert page.status_code == 200 and "/static/app/app.js" in page.text
    for asset in ("/static/app/app.js", "/static/app/app.css", "/static/views/common.js"):
        assert client.get(asset).status_code == 200
    schema = client.get("/openapi.json").json()
    routes = {r.path for r in client.app.routes if getattr(r, "path", "").startswith("/api/")}
    assert routes <= set(schema["paths"]), routes - set(schema["paths"])


def test_run_equals_library_trace(client: TestClient) -> None:
    run = post_run(client)
    out = tiny("llama").trace(TEXT)
    assert run["tokens"] == list(out.tokens) and run["token_ids"] == out.token_ids.tolist()
    assert run["n_input"] == len(out.tokens) and run["layers"] == [0, 1, 2] and run["model"] == "tiny-llama"
    best = out.logits.softmax(-1).max(-1)
    assert [p["token"] for p in run["predictions"]] == list(tiny("llama").unembed.token_strings(best.indices))
    assert [p["prob"] for p in run["predictions"]] == pytest.approx(best.values.tolist(), rel=1e-5)
    assert run["capabilities"]["lens"] is True
    assert client.get(f"/api/runs/{run['id']}").json()["tokens"] == run["tokens"]


def test_generate_equals_library_generate(client: TestClient) -> None:
    run = post_run(client, generate=3, model="tiny-gpt2")
    out = tiny("gpt2").generate(TEXT, generate=3)
    assert run["tokens"] == list(out.tokens) and run["n_input"] == out.n_input == len(out.tokens) - 3


def test_lens_equals_library_call(client: TestClient) -> None:
    run = post_run(client)
    reply = client.get(f"/api/runs/{run['id']}/lens", params={"position": 2, "topk": 4, "norm": False}).json()
    want = tiny("llama").trace(TEXT).layer_predictions(position=2, topk=4, norm=False)
    assert reply["kind"] == "LayerPredictions" and reply["text"] == str(want)
    assert reply["data"]["tokens"] == [list(t) for t in want.tokens]
    np.testing.assert_allclose(reply["data"]["probs"], want.probs, rtol=1e-5)
    assert 'data-view="lens"' in reply["html"]
    one = client.get(f"/api/runs/{run['id']}/lens", params={"layer": 1, "site": "resid_mid", "html": False}).json()
    assert one["data"]["layers"] == [1] and one["data"]["site"] == "resid_mid" and "html" not in one


def test_bad_run_requests(client: TestClient) -> None:
    assert "empty" in error(client.post("/api/runs", json={"text": ""}), 400)
    assert "empty" in error(client.post("/api/runs", json={"text": "   \n"}), 400)
    too_long = " ".join(["word"] * 40)
    assert "limit of 24" in error(client.post("/api/runs", json={"text": too_long}), 400)
    assert "shorten" in error(client.post("/api/runs", json={"text": "x" * 100_000}), 400)
    message = error(client.post("/api/runs", json={"text": TEXT, "model": "gpt-17"}), 400)
    assert "unknown model 'gpt-17'" in message and "tiny-llama" in message
    assert "device 'cuda:7' is not available" in error(
        client.post("/api/runs", json={"text": TEXT, "device": "cuda:7"}), 400
    )
    assert "dtype 'float64'" in error(client.post("/api/runs", json={"text": TEXT, "dtype": "float64"}), 400)
    assert "between 0 and 4" in error(client.post("/api/runs", json={"text": TEXT, "generate": 5}), 400)
    near_limit = {"text": " ".join(["a"] * 22), "generate": 4, "model": "tiny-gpt2"}  # 22 + 4 tokens > 24
    assert "limit of 24" in error(client.post("/api/runs", json=near_limit), 400)
    assert "cannot generate" in error(
        client.post("/api/runs", json={"text": TEXT, "model": "tiny-bert", "generate": 1}), 400
    )
    bad_json = client.post("/api/runs", content=b'{"text": "hi",', headers={"content-type": "application/json"})
    assert "not valid JSON" in error(bad_json, 422)
    assert "text" in error(client.post("/api/runs", json={"model": "tiny-llama"}), 422)
    assert "text" in error(client.post("/api/runs", json={"text": 42}), 422)
    assert "surprise" in error(client.post("/api/runs", json={"text": TEXT, "surprise": 1}), 422)
    assert "generate" in error(client.post("/api/runs", json={"text": TEXT, "generate": "many"}), 422)
    assert "not found" in error(client.get("/api/no-such-route"), 404)


def test_bad_analysis_requests(client: TestClient) -> None:
    run_id = post_run(client)["id"]
    lens = f"/api/runs/{run_id}/lens"
    assert "position 6 is out of range for 5 tokens" in error(client.get(lens, params={"position": 6}), 400)
    assert "position -6" in error(client.get(lens, params={"position": -6}), 400)
    assert "layer 3 is out of range" in error(client.get(lens, params={"layer": 3}), 400)
    assert "site must be one of" in error(client.get(lens, params={"site": "attn_out"}), 400)
    assert "topk" in error(client.get(lens, params={"topk": 0}), 422)
    assert "layer" in error(client.get(lens, params={"layer": "two"}), 422)
    for path in ("", "/lens", "/trace"):
        assert "unknown run 'nope'" in error(client.get(f"/api/runs/nope{path}"), 404)
    assert "unknown run" in error(client.delete("/api/runs/nope"), 404)


def test_trace_export_and_open_again(client: TestClient, tmp_path: Path) -> None:
    run = post_run(client)
    exported = client.get(f"/api/runs/{run['id']}/trace")
    assert exported.status_code == 200 and "attachment" in exported.headers["content-disposition"]
    (tmp_path / "run.safetensors").write_bytes(exported.content)
    saved = lmscope.load_trace(tmp_path / "run.safetensors").trace
    direct = tiny("llama").trace(TEXT, sites=saved.sites).trace
    assert saved.tokens == direct.tokens
    for site in saved.sites:
        torch.testing.assert_close(saved.get(site), direct.get(site))

    again = upload(client, exported.content).json()  # the configured model is re-attached
    assert again["tokens"] == run["tokens"] and again["has_model"] and again["capabilities"]["lens"]
    assert again["predictions"] == run["predictions"]
    bare = upload(client, exported.content, attach=False).json()
    assert not bare["has_model"] and not bare["capabilities"]["lens"]
    assert "needs the model's weights" in error(client.get(f"/api/runs/{bare['id']}/lens"), 400)
    mismatch = upload(client, exported.content, model="tiny-gpt2")
    assert "not 'tiny-gpt2'" in error(mismatch, 400)
    assert "not a readable lmscope trace" in error(upload(client, b"not a trace"), 400)
    assert "empty" in error(upload(client, b""), 400)


def test_upload_limit(site: Path) -> None:
    small = TestClient(create_app(load_config(write_config(site), max_upload_mb=0.25)))
    run = post_run(small)
    data = small.get(f"/api/runs/{run['id']}/trace").content
    assert len(data) > 0.25 * 2**20
    assert "limit of 0.25 MB" in error(upload(small, data), 413)


def test_paths_only_inside_allowed_dirs(client: TestClient, site: Path) -> None:
    outside = client.post("/api/traces/open", json={"path": "/etc/passwd"})
    assert "outside the directories" in error(outside, 403)
    sneaky = client.post("/api/traces/open", json={"path": str(site / "allowed" / ".." / "app.json")})
    assert "outside the directories" in error(sneaky, 403)
    run = post_run(client)
    (site / "allowed" / "run.safetensors").write_bytes(client.get(f"/api/runs/{run['id']}/trace").content)
    opened = client.post("/api/traces/open", json={"path": str(site / "allowed" / "run.safetensors")}).json()
    assert opened["tokens"] == run["tokens"]
    # A model directory by path: loaded only inside the allowed directories.
    by_path = post_run(client, model=str(site / "allowed" / "model"))
    assert by_path["tokens"] == list(tiny("gpt2").trace(TEXT).tokens)
    assert "outside" in error(client.post("/api/runs", json={"text": TEXT, "model": str(site / "local-gpt2")}), 403)
    closed = TestClient(create_app(load_config(write_config(site), allow_paths=False)))
    assert "allow_paths" in error(closed.post("/api/traces/open", json={"path": str(site / "allowed" / "x")}), 403)
    assert "unknown model" in error(closed.post("/api/runs", json={"text": TEXT, "model": "/etc"}), 400)


def test_configured_local_directory_really_loads(client: TestClient) -> None:
    run = post_run(client, model="local")
    best = tiny("gpt2").trace(TEXT).logits.softmax(-1).max(-1).values
    assert [p["prob"] for p in run["predictions"]] == pytest.approx(best.tolist(), rel=1e-5)


def test_model_cache_keyed_and_bounded(site: Path) -> None:
    app = create_app(write_config(site))
    client = TestClient(app)
    post_run(client, dtype="float32")
    half = post_run(client, dtype="bfloat16")
    keys = client.get("/api/status").json()["models"]
    assert keys == [
        {"model": "tiny-llama", "device": "cpu", "dtype": "float32"},
        {"model": "tiny-llama", "device": "cpu", "dtype": "bfloat16"},
    ]
    state = app.state.lmscope
    with state.models.using(state.key(None, None, "bfloat16")) as lm:
        assert lm.loaded.dtype == torch.bfloat16  # a dtype change really reloads the model
    post_run(client, model="tiny-gpt2")  # a third model evicts the least recently used
    keys = client.get("/api/status").json()["models"]
    assert [k["model"] for k in keys] == ["tiny-llama", "tiny-gpt2"] and keys[0]["dtype"] == "bfloat16"
    # Runs of an evicted model still work: the model is re-attached from the cache on demand.
    assert client.get(f"/api/runs/{half['id']}/lens", params={"layer": 0}).status_code == 200


def test_run_cache_lru_and_memory(site: Path) -> None:
    client = TestClient(create_app(write_config(site, run_cache_size=3)))
    runs = [post_run(client, text=f"{TEXT} number {i}") for i in range(5)]
    stats = client.get("/api/status").json()["runs"]
    assert stats["runs"] == 3 and stats["evicted"] == 2 and stats["max_runs"] == 3
    assert stats["bytes"] == sum(r["nbytes"] for r in runs[2:])
    assert "unknown run" in error(client.get(f"/api/runs/{runs[0]['id']}"), 404)
    assert client.delete(f"/api/runs/{runs[4]['id']}").json() == {"deleted": runs[4]["id"]}
    assert client.get("/api/status").json()["runs"]["bytes"] == sum(r["nbytes"] for r in runs[2:4])


def test_run_cache_bytes_bound() -> None:
    out = tiny("llama").trace(TEXT)
    size = out.trace.nbytes()
    cache = RunCache(size=100, max_bytes=int(2.5 * size))
    ids = [cache.add(out.trace, None).id for _ in range(4)]
    assert cache.stats()["runs"] == 2 and cache.stats()["bytes"] == 2 * size
    assert cache.get(ids[0]) is None and cache.get(ids[3]) is not None
    big = RunCache(size=3, max_bytes=1)  # the newest run always stays, even over the budget
    big.add(out.trace, None)
    assert big.stats()["runs"] == 1


def test_capabilities_follow_model_and_sites() -> None:
    base = {"sites": ["resid_post", "attn_probs"], "has_model": True, "lm_head": True}
    assert capabilities(base)["lens"] is True
    assert capabilities({**base, "lm_head": False})["lens"] is False  # e.g. minilm-l6: no LM head
    assert capabilities({**base, "has_model": False})["lens"] is False
    assert capabilities({**base, "sites": ["attn_probs"]})["lens"] is False
    flow = {**base, "sites": list(FLOW_SITES)}
    assert capabilities(flow)["flow"] is True
    assert capabilities({**flow, "post_norm": True})["flow"] is False  # BERT: blocks are not sums of parts
    assert capabilities({**flow, "has_model": False}) == {**dict.fromkeys(capabilities(flow), False), "attention": True}


def test_unexpected_errors_are_json_500(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(write_config(site))
    client = TestClient(app, raise_server_exceptions=False)
    monkeypatch.setattr(type(app.state.lmscope), "status", lambda self: 1 / 0)
    message = error(client.get("/api/status"), 500)
    assert message.startswith("internal error (ZeroDivisionError)")


def test_bad_config_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(lmscope.LmscopeError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(lmscope.LmscopeError, match="unknown key"):
        load_config(None, colour="blue")
    with pytest.raises(lmscope.LmscopeError, match="default_model 'x'"):
        load_config(None, default_model="x")
    with pytest.raises(lmscope.LmscopeError, match="cannot read the app config"):
        load_config(tmp_path / "missing.json")
    default = load_config()
    assert default.default_model == "smollm2-135m" and "minilm-l6" in default.models
    assert default.sample_prompts and default.allow_paths is False


def test_serve_command_starts_uvicorn_on_loopback(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import uvicorn

    from lmscope.app._core import App
    from lmscope.cli import main

    calls: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    monkeypatch.setattr(App, "preload", lambda self: None)
    with socket.socket() as sock:  # a port nothing listens on (serve checks that it can bind it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["serve", "--port", str(port)]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == port
    assert calls["app"].state.lmscope.config.default_model == "smollm2-135m"
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().err
    assert main(["serve", "--config", "/no/such/config.json"]) == 2


def test_analysis_routes_equal_library_calls(client: TestClient) -> None:
    run_id = post_run(client)["id"]
    out = tiny("llama").trace(TEXT)

    def get(path: str, **params: Any) -> dict[str, Any]:
        response = client.get(f"/api/runs/{run_id}/{path}", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    graph = get("flow", threshold=0.1, details=False)
    want = out.flow(0.1, details=False)
    assert graph["text"] == str(want) and graph["kind"] == "FlowGraph" and 'data-view="flow"' in graph["html"]
    assert [e["weight"] for e in graph["data"]["edges"]] == pytest.approx([e.weight for e in want.edges], rel=1e-5)
    assert get("flow", renormalize=True, html=False)["data"]["mode"] == "renormalize"
    assert get("saliency", position=[3, 4], html=False)["text"] == str(out.primary_attributions(positions=[3, 4]))
    assert get("rankings", html=False)["text"] == str(out.rankings())
    token_id = int(out.token_ids[1])
    watched = get("rankings_watch", watch=[" is", f"#{token_id}"], position=2, html=False)
    assert watched["text"] == str(out.rankings_watch([" is", token_id], position=2))
    maps = get("contribution_map", layer=1, data=True)
    np.testing.assert_allclose(maps["data"]["contributions"], out.contribution_map(1).contributions, rtol=1e-5)
    assert get("head_shares", layer=2, position=4, source=1)["text"] == str(out.head_shares(2, 4, 1))
    assert get("top_neurons", layer=0, position=3, topk=4)["text"] == str(out.top_neurons(0, 3, 4))
    promoted = get("promoted", layer=1, position=4, component="attention", head=2, topk=3)
    assert promoted["text"] == str(out.promoted_tokens(1, 4, "attention", head=2, topk=3))
    attention = get("attention", layer=1, view="neuron", head=3, query=2)
    assert attention["text"] == str(out.attention(1, "neuron", head=3, query=2)) and "data" not in attention

    # Clicks in the graph: node ids and edge ids as the flow view names them.
    # A node is a residual state; its logit lens is the prediction read from that state (position + 1).
    final = get("nodes/x3.4", topk=5)
    assert [v["text"] for v in final["views"]] == [str(out.layer_predictions(5, 2, 5, True, "resid_post"))]
    middle = get("nodes/m1.2", norm=False)
    assert [v["text"] for v in middle["views"]] == [str(out.layer_predictions(3, 1, 10, False, "resid_mid"))]
    assert get("nodes/x0.1")["views"][0]["text"] == str(out.layer_predictions(2, 0, 10, True, "resid_pre"))
    ffn = get("nodes/f2.3", topk=4)
    assert [v["text"] for v in ffn["views"]] == [
        str(out.top_neurons(2, 3, 4)),
        str(out.promoted_tokens(2, 3, "ffn", topk=4)),
    ]
    edge = get("edges/a1.0.4.mid")
    assert [v["kind"] for v in edge["views"]] == ["HeadShares", "ContributionMap", "Promoted"]
    assert edge["views"][0]["text"] == str(out.head_shares(1, 4, 0))
    assert all(v["html"].startswith('<div class="lmscope"') for v in edge["views"])


def test_bad_analysis_parameters(client: TestClient) -> None:
    run_id = post_run(client)["id"]

    def get(path: str, status: int, **params: Any) -> str:
        return error(client.get(f"/api/runs/{run_id}/{path}", params=params), status)

    assert "threshold must lie in [0, 1)" in get("flow", 400, threshold=2)
    assert "position 7 is out of range" in get("flow", 400, position=7)
    assert "unknown attribution method 'nope'" in get("saliency", 400, method="nope")
    assert "head 9 is out of range" in get("promoted", 400, layer=1, component="attention", head=9)
    assert "head 4 is out of range" in get("attention", 400, view="neuron", head=4)
    assert "layer 3 is out of range" in get("contribution_map", 400, layer=3)
    assert "watch" in get("rankings_watch", 422)
    assert "unknown node id 'q1.2'" in get("nodes/q1.2", 400)
    assert "layer 9 is out of range" in get("nodes/x9.1", 400)
    assert "position 8 is out of range" in get("nodes/m1.8", 400)
    assert "residual edge" in get("edges/r1.4.4.mid", 400)
    assert "unknown edge id" in get("edges/a1.4", 400)
    assert "unknown run" in error(client.get("/api/runs/nope/flow"), 404)
