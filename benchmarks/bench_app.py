"""The web app's overhead over the library it wraps (issue: web app).

    python benchmarks/bench_app.py

Runs the app under uvicorn on 127.0.0.1 with the embedded model (the same loaded model the direct
calls use) and a real HTTP client, and prints:

* click latency: ``GET /api/runs/{id}/nodes/x{L}.{pos}`` (a node's details: the logit lens of one
  residual state, as JSON with the view's HTML and text twin) on a cached 64-token run, median and
  p95, vs the library call it wraps (``out.layer_predictions(pos, layer, 10, True, site)``);
  goal: at most 1.5x + 20 ms;
* a new 64-token run: ``POST /api/runs`` vs ``lm.trace(text, sites=ALL_SITES)`` (the sites the app
  captures); goal: at most 1.2x; and the same with the flow graph drawn after it.

Timings alternate between the app and the direct call (so machine load hits both alike); medians.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import httpx

import lmscope
from _timing import interleaved_times, ud_sentences
from app_server import serving
from lmscope.app import create_app, load_config
from lmscope.app.state import ModelKey
from lmscope.capture import ALL_SITES


def text_of(lm: lmscope.LM, n: int) -> str:
    """A text of exactly ``n`` tokens from UD English EWT sentences."""
    ids = lm.tokenizer(" ".join(ud_sentences()[:50]))["input_ids"]
    for cut in range(n, n - 8, -1):
        text = lm.tokenizer.decode(ids[:cut])
        if len(lm.encode(text)) == n:
            return text
    raise RuntimeError(f"no {n}-token text found")


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    lm = lmscope.from_pretrained()
    text = text_of(lm, 64)
    app = create_app(load_config(max_input_tokens=128))
    app.state.lmscope.models.put(ModelKey("smollm2-135m", "cpu", "float32"), lm)
    with serving(app) as url, httpx.Client(base_url=url, timeout=600) as http:
        run = http.post("/api/runs", json={"text": text}).json()
        assert len(run["tokens"]) == 64, len(run["tokens"])
        out = lm.trace(text, sites=ALL_SITES)
        layer, pos = 17, 40

        def click() -> None:
            response = http.get(f"/api/runs/{run['id']}/nodes/x{layer}.{pos}")
            assert response.status_code == 200

        def library_click() -> None:
            out.layer_predictions(pos, layer, 10, True, "resid_pre")

        clicks = interleaved_times({"app": click, "library": library_click}, repeats=41)
        app_med, lib_med = statistics.median(clicks["app"]), statistics.median(clicks["library"])
        app_p95, lib_p95 = p95(clicks["app"]), p95(clicks["library"])
        print("click (node details: logit lens of one residual state), 64-token run, embedded model")
        print(f"  app      median {1e3 * app_med:7.1f} ms   p95 {1e3 * app_p95:7.1f} ms")
        print(f"  library  median {1e3 * lib_med:7.1f} ms   p95 {1e3 * lib_p95:7.1f} ms")
        print(
            f"  app / (1.5 x library + 20 ms): median {app_med / (1.5 * lib_med + 0.02):.2f}, "
            f"p95 {app_p95 / (1.5 * lib_p95 + 0.02):.2f}  (goal <= 1)"
        )

        def new_run() -> None:
            response = http.post("/api/runs", json={"text": text})
            assert response.status_code == 200

        def library_run() -> None:
            lm.trace(text, sites=ALL_SITES)

        runs = interleaved_times({"app": new_run, "library": library_run}, repeats=7)
        app_run, lib_run = statistics.median(runs["app"]), statistics.median(runs["library"])
        print("new 64-token run")
        ratio = app_run / lib_run
        print(f"  app POST /api/runs {app_run:.3f} s   lm.trace {lib_run:.3f} s   ratio {ratio:.2f}  (goal <= 1.2)")

        def run_and_graph() -> None:
            run_id = http.post("/api/runs", json={"text": text}).json()["id"]
            assert http.get(f"/api/runs/{run_id}/flow", params={"details": False, "data": False}).status_code == 200

        def library_graph() -> None:
            again = lm.trace(text, sites=ALL_SITES)
            again.flow(0.04, details=False).to_html()

        both = interleaved_times({"app": run_and_graph, "library": library_graph}, repeats=5)
        app_both, lib_both = statistics.median(both["app"]), statistics.median(both["library"])
        print(
            f"  with the flow graph: app {app_both:.3f} s   library {lib_both:.3f} s   ratio {app_both / lib_both:.2f}"
        )
        print(f"run cache after the benchmark: {http.get('/api/status').json()['runs']}")


if __name__ == "__main__":
    main()
