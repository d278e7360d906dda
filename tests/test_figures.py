"""``.plot()``: every heatmap-like result gives a matplotlib Figure of its own numbers."""

from __future__ import annotations

import functools
import io
import sys

import numpy as np
import pytest

import lmscope
from conftest import tiny
from lmscope import LmscopeError

TEXT = "The keys to the cabinet\n are on the  table"


@functools.cache
def traced() -> lmscope.Output:
    return tiny("llama").trace(TEXT)


def image_of(figure, index: int = 0) -> np.ndarray:
    return np.asarray(figure.axes[index].images[0].get_array())


def labels(axes) -> list[str]:
    return [t.get_text() for t in axes.get_xticklabels()]


def saves(figure) -> None:
    for fmt, magic in (("png", b"\x89PNG"), ("svg", b"<?xml")):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt)
        assert buffer.getvalue().startswith(magic)


def test_every_heatmap_like_result_has_a_figure() -> None:
    from matplotlib.figure import Figure

    out = traced()
    results = [
        out.layer_similarity("cka", site_a="resid_post", site_b="resid_post"),
        out.contribution_map(1),
        out.attention(),
        out.primary_attributions(),
        out.layer_predictions(),
        out.run_nmf(3),
        out.factorize("pca", 3),
        out.activations(),
        out.rankings(),
    ]
    for result in results:
        figure = result.plot()
        assert isinstance(figure, Figure), type(result).__name__
        saves(figure)


def test_figures_draw_the_results_numbers() -> None:
    out = traced()
    similarity = out.layer_similarity("cka", site_a="resid_post", site_b="resid_post")
    np.testing.assert_allclose(image_of(similarity.plot()), similarity.matrix)
    saliency = out.primary_attributions()
    drawn = image_of(saliency.plot())
    for i, row in enumerate(saliency.attributions):
        np.testing.assert_allclose(drawn[i, : len(row)], row, rtol=1e-6)
    attention = out.attention(layer=1)
    figure = attention.plot(head=2)
    np.testing.assert_allclose(image_of(figure), attention.weights[0, 2])
    assert len(attention.plot().axes) >= attention.weights.shape[1]  # one panel per head (+ colour bar)
    cmap = out.contribution_map(1)
    figure = cmap.plot(head=3)
    np.testing.assert_allclose(image_of(figure, 0), cmap.attention[3])
    np.testing.assert_allclose(image_of(figure, 1), cmap.contributions[3] / cmap.contributions[3].max(), rtol=1e-6)
    lens = out.layer_predictions()
    np.testing.assert_allclose(image_of(lens.plot()), lens.probs, rtol=1e-6)
    nmf = out.run_nmf(3)
    np.testing.assert_allclose(image_of(nmf.plot()), nmf.components)


def test_token_labels_show_whitespace() -> None:
    out = traced()
    assert "↵" in "".join(out.tokens).replace("\n", "↵")  # the text holds a newline token
    for figure in (out.attention(layer=0).plot(head=0), out.run_nmf(2).plot(), out.contribution_map(0).plot(head=0)):
        ticks = labels(figure.axes[0])
        assert "·keys" in ticks and not any(t.startswith(" ") or "\n" in t for t in ticks)
        assert any("↵" in t for t in ticks)


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    result = traced().layer_similarity("cka", site_a="resid_post", site_b="resid_post")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LmscopeError, match=r"pip install 'lmscope\[analysis\]'"):
        result.plot()
    with pytest.raises(LmscopeError, match="matplotlib"):
        traced().attention().plot()


def test_bad_figure_requests() -> None:
    out = traced()
    with pytest.raises(LmscopeError, match="layer 7 is not in this result"):
        out.attention(layer=1).plot(layer=7)
    with pytest.raises(LmscopeError, match="head 40 is out of range"):
        out.attention(layer=1).plot(head=40)
