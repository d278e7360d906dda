"""Views inside real Jupyter front ends: JupyterLab 4 and Notebook 7 in headless Chromium.

A Jupyter server runs on 127.0.0.1 (a free port, a token, a temporary root, home and Jupyter
directories). In JupyterLab the tutorial notebook runs through the menu (Run › Run All Cells); every
view must draw, with no console errors and no request beyond the server. The notebook is then saved,
closed and reopened: trusted (the server signed what it saved) every view draws again; untrusted
(changed on disk, so its signature no longer matches) the sanitizer strips scripts and styles and
every view shows its text twin, never a blank box. JupyterLab's dark theme reaches the views. The same
minimal cycle runs in Notebook 7. Screenshots go to ``artifacts/jupyter/``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from browser import Opened

pytest.importorskip("jupyterlab")
pytest.importorskip("notebook")
nbformat = pytest.importorskip("nbformat")

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.ipynb"
ARTIFACTS = REPO / "artifacts" / "jupyter"
RUN_TIMEOUT_MS = 600_000
UI_TIMEOUT_MS = 60_000

# What each view draws (besides text): the element its render function must have created.
DRAWN = {
    "lens": ".lms-lens-box",
    "rankings": ".lms-rk-cell",
    "saliency": ".lms-token",
    "flow": "svg",
    "attention": "canvas, svg",
    "nmf": "svg",
    "probing": "svg",
}

# A small notebook for Notebook 7: two views of a tiny random model (fast).
SMALL = [
    "import lmscope\nout = lmscope.from_pretrained('tiny-gpt2').trace('The keys to the cabinet')\n"
    "out.layer_predictions(position=-1, topk=3)",
    "out.attention(layer=0)",
]


@dataclass
class Server:
    url: str
    token: str
    root: Path

    def page_url(self, path: str) -> str:
        return f"{self.url}/{path}?token={self.token}"


# The front ends' own code (JupyterLab's and Notebook 7's bundles). lmscope's scripts run inline in the
# page, so an error raised inside one of these bundles is the front end's (Notebook 7.6 raises a few of
# its own, e.g. "Command 'filebrowser:open-path' not registered"): such errors are printed, not failed on.
FRONT_END_BUNDLES = ("/static/notebook/", "/static/lab/", "/lab/extensions/")


def _watch(page: Any) -> Opened:
    """Like ``browser.watch``, with errors raised in the front end's own bundles set apart."""
    opened = Opened(page)

    def keep(message: str, where: str) -> None:
        if any(bundle in where for bundle in FRONT_END_BUNDLES):
            print(f"front-end error (not lmscope's): {message.splitlines()[0]} at {where}")
        else:
            opened.errors.append(message)

    def on_console(message: Any) -> None:
        if message.type == "error":
            keep(message.text, (message.location or {}).get("url", ""))

    def on_error(error: Any) -> None:
        stack = getattr(error, "stack", "") or ""
        top = next((line.strip() for line in stack.splitlines() if line.strip().startswith("at ")), "")
        keep(f"{error}\n{stack}", top)

    page.on("console", on_console)
    page.on("pageerror", on_error)
    page.on("request", lambda r: opened.requests.append(r.url))
    page.on("dialog", lambda d: (opened.dialogs.append(d.message), d.dismiss()))
    return opened


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("jupyter")
    root, home, config = base / "root", base / "home", base / "config"
    for folder in (root, home, config):
        folder.mkdir()
    shutil.copy(TUTORIAL, root / "tutorial.ipynb")
    small = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in SMALL])
    small.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(small, root / "small.ipynb")
    token, port = secrets.token_hex(16), _free_port()
    settings = {
        "ServerApp": {
            "ip": "127.0.0.1",
            "port": port,
            "port_retries": 0,
            "open_browser": False,
            "root_dir": str(root),
            "allow_root": True,
            "terminals_enabled": False,
        },
        "IdentityProvider": {"token": token},
        "LabApp": {
            "expose_app_in_browser": True,
            "news_url": None,
            "extension_manager": "readonly",
            "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
        },
        "JupyterNotebookApp": {"expose_app_in_browser": True},
    }
    (config / "jupyter_server_config.json").write_text(json.dumps(settings))
    # No "get notified about Jupyter news?" toast over the outputs.
    notification = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "IPYTHONDIR": str(base / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if "LMSCOPE_CACHE" not in os.environ:  # the embedded model's converted copy: keep the user's cache
        from lmscope.models._loading import cache_dir

        env["LMSCOPE_CACHE"] = str(cache_dir())
    log = (base / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Jupyter server did not start:\n" + (base / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield Server(url, token, root)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _run_all_from_menu(page: Any) -> None:
    """Run › Run All Cells, as a user would click it."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()


def _wait_kernel_idle(page: Any) -> None:
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget; const k = w && w.sessionContext &&"
        " w.sessionContext.session && w.sessionContext.session.kernel; return k && k.status === 'idle'; }",
        timeout=UI_TIMEOUT_MS * 2,
    )


def _wait_for_views(page: Any, count: int, timeout_ms: int, selector: str = ".lmscope[data-mounted]") -> None:
    """Wait until ``count`` fragments match ``selector`` (or an error output appears); on a timeout, say
    how far the notebook got (views drawn, cells run, the kernel's state) and keep a screenshot."""
    script = (
        "([n, sel]) => document.querySelectorAll('.jp-OutputArea-output ' + sel).length >= n"
        " || !!document.querySelector('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.error\"]')"
    )
    try:
        page.wait_for_function(script, arg=[count, selector], timeout=timeout_ms)
    except Exception as error:
        state = page.evaluate(
            """(sel) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return {views: document.querySelectorAll('.jp-OutputArea-output ' + sel).length,
                        prompts: Array.from(document.querySelectorAll('.jp-InputArea-prompt')).map(p => p.textContent),
                        kernel: k ? k.status : 'none'}; }""",
            selector,
        )
        _shot(page, "failure")
        raise AssertionError(f"{count} views not shown within {timeout_ms / 1000:.0f} s: {state}") from error


def _views(page: Any) -> list[dict[str, Any]]:
    """Every lmscope fragment on the page: its view, whether it drew, its size and its twin's state."""
    return page.evaluate(
        """(drawn) => Array.from(document.querySelectorAll('.jp-OutputArea-output .lmscope')).map(root => {
            const body = root.querySelector(':scope > .lms-body');
            const twin = root.querySelector('.lmscope-text');
            const view = root.getAttribute('data-view');
            const selector = drawn[view] || '*';
            return {
                id: root.id, view: view, mounted: root.getAttribute('data-mounted') === '1',
                height: body ? body.getBoundingClientRect().height : 0,
                drawn: !!(body && body.querySelector(selector)),
                twinShown: !!(twin && twin.offsetHeight > 0 && twin.textContent.trim().length > 0),
            };
        })""",
        DRAWN,
    )


def _blank_outputs(page: Any) -> list[int]:
    """Indices of output areas that show nothing (no text, no picture)."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.jp-OutputArea-output')).map((o, i) =>
            (o.textContent.trim().length > 0 || o.querySelector('img, svg, canvas')) && o.offsetHeight > 0 ? -1 : i)
            .filter(i => i >= 0)"""
    )


def _saved_views(path: Path) -> int:
    notebook = nbformat.read(path, as_version=4)
    return sum(
        output.get("data", {}).get("text/html", "").count('<div class="lmscope"')
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def _untrust_on_disk(path: Path) -> None:
    """Change the saved notebook so that its signature no longer matches (as if it came from elsewhere)."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata["lmscope_test"] = "edited outside Jupyter"
    nbformat.write(notebook, path)


def _shot(page: Any, name: str, locator: Any = None) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (locator or page).screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _open_in_lab(page: Any, path: str) -> None:
    page.evaluate("(path) => window.jupyterapp.commands.execute('docmanager:open', {path})", path)
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell", timeout=UI_TIMEOUT_MS)


def _close_all(page: Any) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('application:close-all')")
    page.wait_for_selector(".jp-NotebookPanel", state="detached", timeout=UI_TIMEOUT_MS)


@pytest.mark.embedded
def test_tutorial_in_jupyterlab(browser: Any, jupyter: Server) -> None:
    notebook = nbformat.read(TUTORIAL, as_version=4)
    expected = sum(1 for cell in notebook.cells if cell.cell_type == "code") - 1  # all but the loading cell
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    opened = _watch(page)
    page.goto(jupyter.page_url("lab/tree/tutorial.ipynb"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=UI_TIMEOUT_MS)
    _wait_kernel_idle(page)

    started = time.perf_counter()
    _run_all_from_menu(page)
    _wait_for_views(page, expected, RUN_TIMEOUT_MS)
    drawn_after = time.perf_counter() - started
    print(f"JupyterLab: run all -> last of {expected} views drawn in {drawn_after:.1f} s")
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0
    _wait_kernel_idle(page)

    views = _views(page)
    assert len(views) == expected
    assert len({v["id"] for v in views}) == len(views), "two views share an id"
    assert [v for v in views if not (v["mounted"] and v["drawn"] and v["height"] > 20)] == []
    assert [v for v in views if v["twinShown"]] == [], "a drawn view still shows its text twin"
    assert _blank_outputs(page) == []
    for i, output in enumerate(page.locator(".jp-OutputArea-output:has(.lmscope)").all()):
        _shot(page, f"lab-{i:02d}-{views[i]['view']}", output)

    # Save (Ctrl+S), close, reopen: the server signed the notebook, so the views draw again.
    page.locator(".jp-NotebookPanel .jp-Notebook").click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    saved = jupyter.root / "tutorial.ipynb"
    deadline = time.monotonic() + 30
    while _saved_views(saved) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _saved_views(saved) == expected
    _close_all(page)
    _open_in_lab(page, "tutorial.ipynb")
    _wait_for_views(page, expected, UI_TIMEOUT_MS)
    assert [v for v in _views(page) if not (v["drawn"] and v["height"] > 20)] == []

    # JupyterLab's dark theme reaches the views: their background is the theme's layout colour.
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_selector("body[data-jp-theme-light='false']", state="attached", timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(500)
    colours = page.evaluate(
        """() => { const probe = document.createElement('div'); probe.style.background = 'var(--jp-layout-color0)';
            document.body.appendChild(probe); const theme = getComputedStyle(probe).backgroundColor; probe.remove();
            const view = document.querySelector('.jp-OutputArea-output .lmscope');
            return [theme, getComputedStyle(view).backgroundColor, getComputedStyle(view).color]; }"""
    )
    assert colours[1] == colours[0] and colours[0] != "rgb(255, 255, 255)", colours
    _shot(page, "lab-dark-lens", page.locator(".jp-OutputArea-output:has(.lmscope)").first)
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
    page.wait_for_selector("body[data-jp-theme-light='true']", state="attached", timeout=UI_TIMEOUT_MS)

    # Close, change the file outside Jupyter, reopen: untrusted, scripts stripped, every twin shows.
    _close_all(page)
    _untrust_on_disk(saved)
    _open_in_lab(page, "tutorial.ipynb")
    _wait_for_views(page, expected, UI_TIMEOUT_MS, selector=".lmscope")
    page.wait_for_timeout(500)
    untrusted = _views(page)
    assert len(untrusted) == expected
    assert [v for v in untrusted if v["mounted"] or not v["twinShown"]] == []
    assert _blank_outputs(page) == []
    _shot(page, "lab-untrusted-lens", page.locator(".jp-OutputArea-output:has(.lmscope)").first)

    opened.assert_clean(allowed_prefixes=(jupyter.url + "/",))
    page.close()


def test_views_in_notebook_7(browser: Any, jupyter: Server) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    opened = _watch(page)
    page.goto(jupyter.page_url("notebooks/small.ipynb"))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=UI_TIMEOUT_MS)
    _wait_kernel_idle(page)
    _run_all_from_menu(page)
    _wait_for_views(page, 2, UI_TIMEOUT_MS * 2)
    views = _views(page)
    assert [v["view"] for v in views] == ["lens", "attention"]
    assert [v for v in views if not (v["drawn"] and v["height"] > 20) or v["twinShown"]] == []
    _shot(page, "notebook7-views")
    _wait_kernel_idle(page)

    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    saved = jupyter.root / "small.ipynb"
    deadline = time.monotonic() + 30
    while _saved_views(saved) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _saved_views(saved) == 2
    page.goto("about:blank")
    _untrust_on_disk(saved)
    page.goto(jupyter.page_url("notebooks/small.ipynb"))
    _wait_for_views(page, 2, UI_TIMEOUT_MS, selector=".lmscope")
    page.wait_for_timeout(500)
    untrusted = _views(page)
    assert [v for v in untrusted if v["mounted"] or not v["twinShown"]] == []
    assert _blank_outputs(page) == []
    _shot(page, "notebook7-untrusted")
    opened.assert_clean(allowed_prefixes=(jupyter.url + "/", "about:"))
    page.close()
