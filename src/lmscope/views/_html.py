"""Self-contained HTML fragments: data as JSON, rendered in the page by JS shipped in the package.

A fragment is one ``<div class="lmscope">`` with a unique id, its CSS (scoped under
``.lmscope``), the view's data in a ``<script type="application/json">`` block, the text twin, and
the inlined JS that draws it. Token strings reach the page only as JSON data and are put into the
DOM as text nodes (``textContent``), never as markup, so a vocabulary entry like ``<script>`` stays
text. Nothing is loaded from a network, so the same fragment works in Jupyter, VS Code, Colab, a
saved file and the web app.

The text twin is a plain ``<pre>`` (styled inline) that the JS hides once the view has drawn. Where
scripts never run (an untrusted notebook reopened in JupyterLab or Notebook 7, whose sanitizer drops
``<script>`` and ``<style>``; GitHub's notebook preview; a mail client) the twin is what shows, so a
saved view is never a blank box. (A ``<noscript>`` block would stay hidden there: the browser itself
runs JavaScript.)

The shared runtime (``common.js``) carries a build stamp, a hash of the shipped JS and CSS: a page
holding fragments of one lmscope build defines it once, and a fragment from another build (a
long-lived JupyterLab page after an upgrade) replaces it rather than running against stale code.
"""

from __future__ import annotations

import hashlib
import html
import json
import uuid
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["asset", "build_stamp", "fragment", "json_for_script", "runtime"]


@cache
def asset(name: str) -> str:
    """The text of a file in ``lmscope/views/static`` (JS or CSS shipped in the package)."""
    return resources.files("lmscope.views").joinpath("static", name).read_text(encoding="utf-8")


def json_for_script(data: Any) -> str:
    """JSON safe to place inside a ``<script>`` element (no ``</script>``, no HTML comment openers)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


@cache
def build_stamp() -> str:
    """A short hash of every JS and CSS file the views ship: equal stamps mean identical runtimes."""
    digest = hashlib.sha256()
    static = resources.files("lmscope.views").joinpath("static")
    for item in sorted(static.iterdir(), key=lambda entry: entry.name):
        if item.name.endswith((".js", ".css")):
            digest.update(item.name.encode() + b"\0" + item.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def runtime() -> str:
    """``common.js`` stamped with this build (see :func:`build_stamp`)."""
    return asset("common.js").replace("__LMSCOPE_BUILD__", build_stamp())


# Inline styles, because an untrusted notebook's sanitizer drops <style> but keeps style="".
_NOTE_STYLE = "margin:0 0 2px;font-size:11px;color:#777"
_TEXT_STYLE = (
    "margin:0;padding:4px 0;white-space:pre;overflow-x:auto;max-width:100%;"
    "font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:transparent"
)
_NOTE = "lmscope {view} view, as text (run the cell, or trust the notebook, to draw it):"


def fragment(view: str, data: Any, *, scripts: tuple[str, ...], styles: tuple[str, ...] = (), text: str = "") -> str:
    """One view as a self-contained HTML fragment.

    Args:
        view: the render function's name in ``window.lmscope.views`` (defined by ``scripts``).
        data: JSON-serializable data handed to that function.
        scripts: JS files from ``static/`` to inline after ``common.js``.
        styles: CSS files from ``static/`` to inline after ``common.css``.
        text: the text twin, shown until the view draws and wherever scripts do not run.
    """
    uid = f"lmscope-{uuid.uuid4().hex[:12]}"
    css = "\n".join(asset(name) for name in ("common.css", *styles))
    js = "\n".join((runtime(), *(asset(name) for name in scripts)))
    call = f"window.lmscope.mount({json.dumps(uid)}, {json.dumps(view)}, document.currentScript);"
    note = html.escape(_NOTE.format(view=view))
    return (
        f'<div class="lmscope" id="{uid}" data-view="{html.escape(view)}">'
        f"<style>{css}</style>"
        f'<script type="application/json" class="lmscope-data">{json_for_script(data)}</script>'
        f'<div class="lmscope-static"><div class="lmscope-note" style="{_NOTE_STYLE}">{note}</div>'
        f'<pre class="lmscope-text" style="{_TEXT_STYLE}">{html.escape(text)}</pre></div>'
        f"<script>{js}\n{call}</script>"
        "</div>"
    )
