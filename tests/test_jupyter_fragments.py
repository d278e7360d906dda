"""What lets a view survive a notebook front end, checked on fragments in headless Chromium (no
Jupyter server): the text twin stays when scripts and styles are stripped, several views share one
runtime without colliding, a stale runtime from another build is replaced, a view that fails keeps
its twin, and colours follow the host's theme."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

import lmscope
from browser import open_html
from conftest import tiny
from lmscope.views import page
from lmscope.views._html import build_stamp, runtime


def _lens_html() -> str:
    return tiny("gpt2").trace("The keys to the cabinet").layer_predictions(position=-1, topk=3).to_html()


def _sanitized(markup: str) -> str:
    """What JupyterLab's sanitizer keeps of untrusted HTML: no <script> or <style> (with their text)."""
    return re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", markup, flags=re.S)


def test_twin_is_plain_markup_outside_noscript() -> None:
    result = tiny("gpt2").trace("The keys to the cabinet").layer_predictions(position=-1, topk=3)
    markup = _sanitized(result.to_html())
    assert "<noscript" not in markup
    twin = re.search(r'<pre class="lmscope-text" style="[^"]+">(.*?)</pre>', markup, re.S)
    assert twin is not None and html.unescape(twin.group(1)) == str(result)


def test_runtime_is_stamped_with_the_build() -> None:
    stamp = build_stamp()
    assert re.fullmatch(r"[0-9a-f]{16}", stamp)
    assert f'var BUILD = "{stamp}";' in runtime()
    assert "__LMSCOPE_BUILD__" not in _lens_html()


def _state(opened: Any) -> list[dict[str, Any]]:
    return opened.page.evaluate(
        """() => Array.from(document.querySelectorAll('.lmscope')).map(root => ({
            mounted: root.getAttribute('data-mounted') === '1',
            bodies: root.querySelectorAll(':scope > .lms-body').length,
            twin: root.querySelector('.lmscope-text').offsetHeight > 0,
            error: !!root.querySelector(':scope > .lms-error'),
        }))"""
    )


@pytest.mark.browser
def test_untrusted_output_shows_the_twin(browser: Any) -> None:
    opened = open_html(browser, page(_sanitized(_lens_html()) + _sanitized(_lens_html())))
    assert _state(opened) == [{"mounted": False, "bodies": 0, "twin": True, "error": False}] * 2
    assert "Logit lens" in opened.page.inner_text("body")
    opened.assert_clean()


@pytest.mark.browser
def test_views_share_one_runtime_and_replace_a_stale_one(browser: Any) -> None:
    stale = (
        "<script>window.lmscope = {build: 'stale', views: {lens: function () { throw new Error('stale view'); }},"
        " mount: function () { throw new Error('stale runtime'); }};</script>"
    )
    kept = "<script>window.keptRuntime = window.lmscope;</script>"
    opened = open_html(browser, page(stale + kept + _lens_html() + _lens_html()))
    assert _state(opened) == [{"mounted": True, "bodies": 1, "twin": False, "error": False}] * 2
    assert opened.page.evaluate("() => window.lmscope.build") == build_stamp()
    assert opened.page.evaluate("() => window.lmscope === window.keptRuntime")  # the same object, redefined
    # mounting again (a front end re-running the output's scripts) draws nothing twice
    opened.page.evaluate("() => document.querySelectorAll('.lmscope').forEach(r => window.lmscope.mount(r.id, 'lens'))")
    assert [s["bodies"] for s in _state(opened)] == [1, 1]
    opened.assert_clean()


@pytest.mark.browser
def test_a_failing_view_keeps_its_twin(browser: Any) -> None:
    broken = lmscope.views.fragment("lens", {"title": "broken"}, scripts=("lens.js",), text="the text twin")
    opened = open_html(browser, page(broken))
    assert _state(opened) == [{"mounted": False, "bodies": 0, "twin": True, "error": True}]
    assert "failed to draw" in opened.page.inner_text(".lms-error")
    assert len(opened.errors) == 1  # the error also reaches the console


@pytest.mark.browser
@pytest.mark.parametrize(
    ("scheme", "body", "dark"),
    [
        ("light", "", False),
        ("dark", "", True),  # a standalone page follows the system
        ("dark", ' data-jp-theme-light="true"', False),  # JupyterLab's light theme wins over the system
        ("light", ' data-jp-theme-light="false" style="--jp-layout-color0: #111111"', True),
    ],
)
def test_colours_follow_the_host_theme(browser: Any, scheme: str, body: str, dark: bool) -> None:
    markup = page(_lens_html()).replace("<body>", f"<body{body}>")
    tab = browser.new_page(color_scheme=scheme)
    tab.set_content(markup, wait_until="load")
    rgb = tab.evaluate("() => getComputedStyle(document.querySelector('.lmscope')).backgroundColor")
    channels = [int(c) for c in re.findall(r"\d+", rgb)[:3]]
    assert (sum(channels) < 3 * 128) == dark, rgb
    tab.close()
