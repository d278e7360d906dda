"""Self-contained HTML fragments: data as JSON, rendered in the page by JS shipped in the package.

A fragment is one ``<div class="lmscope">`` with a unique id, its CSS (scoped under
``.lmscope``), the view's data in a ``<script type="application/json">`` block, and the inlined
JS that draws it. Token strings reach the page only as JSON data and are put into the DOM as text
nodes (``textContent``), never as markup, so a vocabulary entry like ``<script>`` stays text. The
text twin sits in a ``<noscript>`` block for renderers without JS. Nothing is loaded from a network,
so the same fragment works in Jupyter, VS Code, Colab, a saved file and the web app.
"""

from __future__ import annotations

import html
import json
import uuid
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["asset", "fragment", "json_for_script"]


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


def fragment(view: str, data: Any, *, scripts: tuple[str, ...], styles: tuple[str, ...] = (), text: str = "") -> str:
    """One view as a self-contained HTML fragment.

    Args:
        view: the render function's name in ``window.lmscope.views`` (defined by ``scripts``).
        data: JSON-serializable data handed to that function.
        scripts: JS files from ``static/`` to inline after ``common.js``.
        styles: CSS files from ``static/`` to inline after ``common.css``.
        text: the text twin, shown where JS does not run.
    """
    uid = f"lmscope-{uuid.uuid4().hex[:12]}"
    css = "\n".join(asset(name) for name in ("common.css", *styles))
    js = "\n".join(asset(name) for name in ("common.js", *scripts))
    call = f"window.lmscope.mount({json.dumps(uid)}, {json.dumps(view)});"
    return (
        f'<div class="lmscope" id="{uid}" data-view="{html.escape(view)}">'
        f"<style>{css}</style>"
        f'<script type="application/json" class="lmscope-data">{json_for_script(data)}</script>'
        f'<noscript><pre class="lmscope-text">{html.escape(text)}</pre></noscript>'
        f"<script>{js}\n{call}</script>"
        "</div>"
    )
