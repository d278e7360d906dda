"""Load: 20 concurrent clients send 200 mixed requests to the app on loopback; every answer is right
(equal to the library's own result), no request waits beyond a bound, and the run cache stays within
its limits while it evicts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app_server import serving
from conftest import tiny
from lmscope.app import create_app, load_config

CLIENTS, PER_CLIENT = 20, 10
BASE = "The keys to the cabinet"


def texts(client: int) -> tuple[str, str]:
    group = client % 5  # five groups of clients send the same texts (each still gets its own runs)
    return f"Client {group} asks about the keys", f"Another question {group} on the cabinet door"


@pytest.fixture(scope="module")
def expected() -> dict[Any, Any]:
    """The library's own answers for every request the clients will make."""
    lm = tiny("llama")
    base = lm.trace(BASE)
    want: dict[Any, Any] = {
        "lens": str(base.layer_predictions(position=2, layer=1, topk=5)),
        "attention": str(base.attention(layer=2, view="head")),
    }
    for client in range(5):
        for text in texts(client):
            out = lm.trace(text)
            want[text] = (list(out.tokens), str(out.layer_predictions(position=-1, topk=3)))
    return want


def client_session(
    url: str, client: int, base_id: str, want: dict[Any, Any], log: list[tuple[str, float]], sizes: dict[str, int]
) -> list[str]:
    """One client's 10 requests; returns the problems found (empty when every answer was right)."""
    problems: list[str] = []
    own: dict[str, str] = {}

    def call(name: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        start = time.perf_counter()
        response = http.request(method, url + path, **kwargs)
        log.append((name, time.perf_counter() - start))
        if response.headers.get("content-type", "").split(";")[0] != "application/json":
            problems.append(f"{name}: not JSON ({response.status_code})")
        return response

    def check_run_request(name: str, response: httpx.Response, good: Any) -> None:
        # A request on a run answers right, or (only once the cache has evicted it) 404 saying so.
        if response.status_code == 404 and "expired from the cache" in response.json()["detail"]:
            log.append(("evicted-404", 0.0))
        elif response.status_code != 200 or not good(response.json()):
            problems.append(f"{name}: {response.status_code} {response.text[:200]}")

    with httpx.Client(timeout=120) as http:
        first, second = texts(client)
        for text in (first, second):
            reply = call("run", "POST", "/api/runs", json={"text": text})
            if reply.status_code != 200 or reply.json()["tokens"] != want[text][0]:
                problems.append(f"run {text!r}: {reply.status_code} {reply.text[:200]}")
                continue
            own[text] = reply.json()["id"]
            sizes[own[text]] = reply.json()["nbytes"]
            lens = call("lens-own", "GET", f"/api/runs/{own[text]}/lens", params={"topk": 3, "html": False})
            check_run_request("lens-own", lens, lambda r, t=text: r["text"] == want[t][1])
        lens = call("lens", "GET", f"/api/runs/{base_id}/lens", params={"position": 2, "layer": 1, "topk": 5})
        check_run_request("lens-base", lens, lambda r: r["text"] == want["lens"] and 'data-view="lens"' in r["html"])
        attention = call("attention", "GET", f"/api/runs/{base_id}/attention", params={"layer": 2})
        check_run_request("attention", attention, lambda r: r["text"] == want["attention"] and "lmscope" in r["html"])
        status = call("status", "GET", "/api/status")
        if status.status_code != 200 or status.json()["runs"]["bytes"] > status.json()["runs"]["max_bytes"]:
            problems.append(f"status: {status.text[:200]}")
        empty = call("bad-empty", "POST", "/api/runs", json={"text": " "})
        if empty.status_code != 400 or "empty" not in empty.json()["detail"]:
            problems.append(f"empty text: {empty.status_code} {empty.text[:200]}")
        out_of_range = call("bad-layer", "GET", f"/api/runs/{base_id}/lens", params={"layer": 9})
        if out_of_range.status_code not in (400, 404):
            problems.append(f"bad layer: {out_of_range.status_code} {out_of_range.text[:200]}")
        unknown = call("bad-run", "GET", "/api/runs/0000/lens")
        if unknown.status_code != 404:
            problems.append(f"unknown run: {unknown.status_code}")
    return problems


def test_twenty_clients_two_hundred_requests(expected: dict[Any, Any]) -> None:
    config = load_config(
        default_model="tiny-llama",
        run_cache_size=16,
        run_cache_mb=64,
        max_input_tokens=64,
        model_cache_size=1,
        queue_size=CLIENTS + 4,  # every client may wait for the one model (a smaller queue answers 503)
    )
    app = create_app(config)
    with serving(app) as url:
        base = httpx.post(url + "/api/runs", json={"text": BASE}, timeout=120).json()
        log: list[tuple[str, float]] = []
        sizes = {base["id"]: base["nbytes"]}
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client_session, url, c, base["id"], expected, log, sizes) for c in range(CLIENTS)]
            problems = [p for f in futures for p in f.result(timeout=300)]
        elapsed = time.perf_counter() - start
        stats = httpx.get(url + "/api/status").json()
        live = [run_id for run_id in sizes if httpx.get(f"{url}/api/runs/{run_id}").status_code == 200]
    assert problems == []
    requests = [entry for entry in log if entry[0] != "evicted-404"]
    assert len(requests) == CLIENTS * PER_CLIENT
    assert elapsed < 240, f"200 requests took {elapsed:.0f} s"
    assert max(t for _, t in requests) < 120
    runs = stats["runs"]
    created = 1 + 2 * CLIENTS
    assert runs["runs"] <= 16 and runs["bytes"] <= runs["max_bytes"]
    assert runs["evicted"] == created - runs["runs"] > 0  # the cache really bounded memory by evicting
    assert len(live) == runs["runs"] and runs["bytes"] == sum(sizes[run_id] for run_id in live)
