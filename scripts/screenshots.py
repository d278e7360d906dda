"""Regenerate the README's pictures: one screenshot of each kind of view, from the embedded model.

    .venv/bin/python scripts/screenshots.py            # writes docs/images/*.png
    .venv/bin/python scripts/screenshots.py --only lens,rankings --out /tmp/shots

Every view is rendered by lmscope exactly as a user gets it (``result.to_html()``, a standalone page) and
photographed in headless Chromium (Debian's ``chromium`` driven by playwright); the app is started with
``lmscope serve`` on 127.0.0.1 and a free port, a prompt is run and the flow graph's details are opened.
Nothing is fetched from a network: a page that asks for anything outside itself stops the script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
WIDTH = 1100


def _views(lm: Any) -> dict[str, Callable[[], str]]:
    """Name -> a function returning the view's standalone HTML."""
    import lmscope

    def lens() -> str:
        return lm.generate(" 1, 1, 1,", generate=1).layer_predictions(position=9, topk=5).to_html()

    def rankings() -> str:
        prompt = "The countries of the European Union are:\n1. Austria\n2. Belgium\n3."
        return lm.generate(prompt, generate=4).rankings().to_html()

    def watch() -> str:
        return lm.trace("The keys to the cabinet").rankings_watch([" is", " are"], position="next").to_html()

    def saliency() -> str:
        return lm.generate("The capital of France is", generate=3).primary_attributions().to_html()

    def flow() -> str:
        return lm.trace("The keys to the cabinet are on the").flow(threshold=0.04).to_html()

    def head_view() -> str:
        return lm.trace("The keys to the cabinet are on the table").attention(layer=3).to_html()

    def model_view() -> str:
        return lm.trace("The keys to the cabinet").attention(view="model").to_html()

    def neuron_view() -> str:
        return lm.trace("The keys to the cabinet").attention(view="neuron", layer=3, head=4, query=-1).to_html()

    def nmf() -> str:
        text = "The keys to the cabinet are on the table. 1, 2, 3, 4, 5 are numbers. Paris is in France."
        return lm.trace(text).run_nmf(n_components=6, from_layer=0, to_layer=6).to_html()

    def probing() -> str:
        minilm = lmscope.from_pretrained("minilm-l6")
        study = lmscope.probing.probe(minilm, tokens=1500, seeds=2, epochs=20, progress=False)
        return study.to_html()

    return {
        "flow": flow,
        "lens": lens,
        "rankings": rankings,
        "watch": watch,
        "saliency": saliency,
        "head-view": head_view,
        "model-view": model_view,
        "neuron-view": neuron_view,
        "nmf": nmf,
        "probing": probing,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _guard(page: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    """Collect console errors and any request that leaves the page (or the app's own server)."""
    problems: list[str] = []
    local = ("data:", "about:", "blob:", *allowed)
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: None if r.url.startswith(local) else problems.append(f"request: {r.url}"))
    return problems


def _shoot_view(browser: Any, name: str, html: str, out: Path) -> Path:
    page = browser.new_page(viewport={"width": WIDTH, "height": 700}, device_scale_factor=1)
    problems = _guard(page)
    page.set_content(html, wait_until="load")
    page.wait_for_selector(".lmscope[data-mounted]", timeout=30_000)
    page.wait_for_timeout(300)  # let transitions settle
    box = page.locator(".lmscope").first
    path = out / f"{name}.png"
    box.screenshot(path=str(path))
    page.close()
    if problems:
        raise SystemExit(f"{name}: {problems}")
    return path


def _shoot_app(browser: Any, out: Path) -> list[Path]:
    """The app on the embedded model: the flow graph with a node's and an edge's details open."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lmscope", "serve", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/status", timeout=2).read()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        message = log.read().decode(errors="replace")
                        raise SystemExit(f"lmscope serve did not start:\n{message}") from None
                    time.sleep(0.5)
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            problems = _guard(page, (url,))
            page.goto(url)
            page.wait_for_selector("#model option", state="attached", timeout=60_000)
            page.fill("#text", "The keys to the cabinet are on the")
            page.click("#run")
            page.wait_for_selector("#panel-flow svg.lms-flow-svg", timeout=300_000)
            page.wait_for_timeout(500)
            paths = [out / "app.png"]
            page.screenshot(path=str(paths[0]), full_page=True)
            edge = page.locator("#panel-flow line[data-edge^='a']").last  # drawn by weight: the last is the strongest
            if edge.count():
                edge.click(force=True)
                page.locator(".details [data-kind=ContributionMap] svg").first.wait_for(timeout=120_000)
                page.wait_for_timeout(500)
                paths.append(out / "app-details.png")
                page.screenshot(path=str(paths[1]), full_page=True)
            page.close()
            if problems:
                raise SystemExit(f"app: {problems}")
            return paths
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNG files")
    parser.add_argument("--only", default=None, help="comma-separated names (views and/or 'app'); default: all")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    import lmscope

    lm = lmscope.from_pretrained()
    views = _views(lm)
    wanted = set(args.only.split(",")) if args.only else {*views, "app"}
    unknown = wanted - {*views, "app"}
    if unknown:
        parser.error(f"unknown names {sorted(unknown)}; choose among {sorted({*views, 'app'})}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for name, render in views.items():
                if name in wanted:
                    print(_shoot_view(browser, name, render(), out), flush=True)
            if "app" in wanted:
                for path in _shoot_app(browser, out):
                    print(path, flush=True)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
