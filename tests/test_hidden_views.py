"""Views of the logit lens and rankings: text twins, self-contained HTML drawn in Chromium, figures."""

from __future__ import annotations

import dataclasses
import html
import io
import sys

import numpy as np
import pytest

from browser import open_html
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import LayerPredictions, Rankings, RankingsWatch
from lmscope.views import page

TEXT = "The keys to the cabinet"
EVIL = "<img src=x onerror=alert(1)>"


def lens_result() -> LayerPredictions:
    return LayerPredictions(
        position=None,
        state_position=1,
        site="resid_post",
        norm=True,
        layers=(0, 1),
        tokens=((" is", "\n"), (" are", EVIL)),
        token_ids=np.array([[3, 4], [5, 6]]),
        probs=np.array([[0.5, 0.25], [0.9, 0.00000003]], dtype=np.float32),
        input_tokens=("The", " keys"),
    )


def watch_result() -> RankingsWatch:
    return RankingsWatch(
        position=1,
        state_position=0,
        words=(" is", " ares"),
        layers=(0, 1),
        columns=(" is", " are"),
        column_ids=np.array([314, 359]),
        ranks=np.array([[3, 120], [1, 2]]),
        input_tokens=("The", " keys"),
        n_input=2,
        vocab_size=50,
        site="resid_post",
        norm=False,
        notes=("' ares' is 2 tokens (' are', 's'): ranking its first token ' are'",),
    )


def test_lens_text_twin() -> None:
    assert str(lens_result()) == (
        "Logit lens: prediction after the last token, read from the state at 1 ('·keys'), resid_post\n"
        "layer  top 1        top 2\n"
        "-----  -----------  -----------------------------------\n"
        "0      ·is 50.00%   ↵ 25.00%\n"
        "1      ·are 90.00%  <img·src=x·onerror=alert(1)> <0.01%"
    )


def test_rankings_text_twins() -> None:
    assert str(watch_result()) == (
        "Rankings watch: prediction of '·keys' at 1, read from the state at 0 ('The'); rank of each watched token "
        "(1 = top of 50), resid_post, no final norm\n"
        "input: 'The keys'\n"
        "' ares' is 2 tokens (' are', 's'): ranking its first token ' are'\n"
        "layer  ·is  ·are\n"
        "-----  ---  ----\n"
        "0      3    120\n"
        "1      1    2"
    )
    result = Rankings(
        layers=(0, 1),
        columns=(" 1", ","),
        column_ids=np.array([7, 8]),
        positions=(2, 3),
        targets=(3, 4),
        ranks=np.array([[40, 9], [1, 1]]),
        input_tokens=("A", ",", " 1", " 1", ","),
        n_input=3,
        vocab_size=100,
        site="resid_mid",
        norm=True,
    )
    assert str(result) == (
        "Rankings: rank of each generated token after every layer (1 = top of 100), resid_mid\n"
        "input: 'A, 1'\n"
        "layer  ·1  ,\n"
        "-----  --  -\n"
        "0      40  9\n"
        "1      1   1"
    )


def test_html_is_self_contained_and_carries_the_text_twin() -> None:
    for result in (lens_result(), watch_result()):
        fragment = result.to_html()
        assert html.escape(str(result)) in fragment  # the text twin (a <pre> the JS hides once drawn)
        assert EVIL not in fragment  # token strings never appear as markup
        assert "://" not in fragment.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch
        assert "<link" not in fragment and "<script src" not in fragment
    assert lens_result()._repr_html_().startswith('<div class="lmscope"')


def test_rankings_html_size_for_64_tokens_by_30_layers() -> None:
    rng = np.random.default_rng(0)
    result = Rankings(
        layers=tuple(range(30)),
        columns=tuple(f" word{i}" for i in range(64)),
        column_ids=np.arange(64),
        positions=tuple(range(63, 127)),
        targets=tuple(range(64, 128)),
        ranks=rng.integers(1, 49152, size=(30, 64)),
        input_tokens=tuple(f" word{i}" for i in range(128)),
        n_input=64,
        vocab_size=49152,
        site="resid_post",
        norm=True,
    )
    assert len(result.to_html().encode()) < 100_000


def test_plot_draws_the_heatmap(tmp_path) -> None:
    result = watch_result()
    figure = result.plot()
    axes, _colorbar = figure.axes
    np.testing.assert_array_equal(axes.images[0].get_array(), result.ranks)
    assert [t.get_text() for t in axes.texts] == ["3", "120", "1", "2"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["0", "1"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["·is", "·are"]
    assert axes.images[0].norm.vmin == 1 and axes.images[0].norm.vmax == 50
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt)
        assert len(buffer.getvalue()) > 1000
    assert not result.plot(annotate=False).axes[0].texts


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(LmscopeError, match=r"need matplotlib.*pip install 'lmscope\[analysis\]'"):
        watch_result().plot()


def real_results() -> tuple[LayerPredictions, Rankings, RankingsWatch]:
    lm = tiny("llama")
    out = lm.generate(TEXT, generate=3)
    # Ecco's meaning: position 5 is the first generated token, read from the state of " cabinet" at 4
    return out.layer_predictions(position=5, topk=4), out.rankings(), out.rankings_watch([" is", " are"], position=5)


@pytest.mark.browser
def test_every_view_draws_in_chromium(browser) -> None:
    lens, ranks, watch = real_results()
    opened = open_html(browser, page(lens.to_html()))
    rows = opened.page.locator(".lms-lens-row")
    assert rows.count() == 3
    assert opened.page.locator(".lms-lens-box").count() == 12
    first = opened.page.locator(".lms-lens-row").first.locator(".lms-lens-p").first.text_content()
    assert first == f"{100 * lens.probs[0, 0]:.2f}%"
    width = opened.page.locator(".lms-lens-fill").first.evaluate("e => e.style.width")
    assert width == f"{100 * float(f'{lens.probs[0, 0]:.4g}'):.2f}%"
    assert opened.page.locator(".lms-token.lms-mark").text_content() == "·cabinet"
    assert opened.page.locator(".lms-token-row .lms-token.lms-generated").count() == 3
    opened.assert_clean()

    for result in (ranks, watch):
        opened = open_html(browser, page(result.to_html()))
        cells = opened.page.locator(".lms-rk-cell").all_text_contents()
        assert [int(c) for c in cells] == result.ranks.reshape(-1).tolist()
        headers = opened.page.locator("th.lms-rk-col .lms-token").all_text_contents()
        assert headers == [c.replace(" ", "·") for c in result.columns]
        # log colour scale: rank 1 is fully opaque, rank = vocab is transparent
        alpha = opened.page.locator(".lms-rk-cell").evaluate_all(
            "cells => cells.map(c => parseFloat(getComputedStyle(c).backgroundColor.split(',')[3] || '1'))"
        )
        want = 1 - np.log(result.ranks.reshape(-1)) / np.log(result.vocab_size)
        np.testing.assert_allclose(alpha, want, atol=0.006)  # Chromium rounds alpha to 8 bits, prints 2 decimals
        assert opened.page.locator(".lms-token-row .lms-token").count() == len(result.input_tokens)
        opened.assert_clean()
    generated = open_html(browser, page(ranks.to_html())).page.locator(".lms-token.lms-generated").count()
    assert generated == 3


@pytest.mark.browser
def test_hostile_tokens_show_as_text_and_run_nothing(browser) -> None:
    lens, ranks, watch = real_results()
    hostile = [
        dataclasses.replace(lens, input_tokens=(EVIL, *lens.input_tokens[1:]), tokens=((EVIL,) * 4, *lens.tokens[1:])),
        dataclasses.replace(ranks, columns=(EVIL, *ranks.columns[1:]), input_tokens=(EVIL, *ranks.input_tokens[1:])),
        dataclasses.replace(watch, columns=(EVIL, " are"), words=(EVIL, " are")),
    ]
    for result in hostile:
        opened = open_html(browser, page(result.to_html()))
        root = opened.page.locator(".lmscope")
        assert root.locator("img").count() == 0
        assert EVIL.replace(" ", "·") in root.locator(".lms-body").text_content()  # shown as text
        assert EVIL in root.locator(".lms-body .lms-token").evaluate_all("ts => ts.map(t => t.title).join()")
        opened.assert_clean()


@pytest.mark.browser
def test_several_views_on_one_page_do_not_collide(browser) -> None:
    lens, ranks, watch = real_results()
    outside = '<table id="plain"><tr><td id="cell">plain</td></tr></table>'
    body = lens.to_html() + ranks.to_html() + outside + watch.to_html() + ranks.to_html()
    opened = open_html(browser, page(body))
    roots = opened.page.locator("div.lmscope")
    assert roots.count() == 4
    ids = roots.evaluate_all("rs => rs.map(r => r.id)")
    assert len(set(ids)) == 4
    assert roots.evaluate_all("rs => rs.map(r => r.getAttribute('data-mounted'))") == ["1"] * 4
    counts = roots.evaluate_all("rs => rs.map(r => r.querySelectorAll('.lms-body').length)")
    assert counts == [1, 1, 1, 1]
    cells = roots.evaluate_all("rs => rs.map(r => r.querySelectorAll('.lms-rk-cell').length)")
    assert cells == [0, ranks.ranks.size, watch.ranks.size, ranks.ranks.size]
    # lmscope's styles stay inside its fragments
    padding = opened.page.locator("#cell").evaluate("e => getComputedStyle(e).paddingLeft")
    assert padding == "1px"
    opened.assert_clean()


@pytest.mark.browser
def test_views_follow_a_dark_theme(browser) -> None:
    lens = real_results()[0]
    opened = open_html(browser, page(lens.to_html()))
    light = opened.page.locator(".lmscope").evaluate("e => getComputedStyle(e).backgroundColor")
    opened.page.emulate_media(color_scheme="dark")
    dark = opened.page.locator(".lmscope").evaluate("e => getComputedStyle(e).backgroundColor")
    assert light == "rgb(255, 255, 255)" and dark == "rgb(13, 17, 23)"
    opened.assert_clean()


def test_save_html_writes_a_standalone_page(tmp_path) -> None:
    path = watch_result().save_html(tmp_path / "watch.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and 'data-view="rankings"' in text
