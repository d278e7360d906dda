"""Views of the logit lens (``LayerPredictions``)."""

from __future__ import annotations

import html

from lmscope.analysis.lens import LayerPredictions
from lmscope.views._text import percent, table, visible

__all__ = ["to_html", "to_text"]


def to_text(result: LayerPredictions) -> str:
    token = visible(result.input_tokens[result.position])
    norm = "" if result.norm else ", no final norm"
    head = f"Logit lens at position {result.position} ({token!r}), {result.site}{norm}"
    rows = [
        [str(layer), *(f"{visible(t)} {percent(p)}" for t, p in zip(toks, probs, strict=True))]
        for layer, toks, probs in zip(result.layers, result.tokens, result.probs, strict=True)
    ]
    k = result.probs.shape[1]
    return head + "\n" + table(["layer", *(f"top {i + 1}" for i in range(k))], rows)


def to_html(result: LayerPredictions) -> str:
    rows = "".join(
        "<tr><th>{}</th>{}</tr>".format(
            layer,
            "".join(
                f"<td>{html.escape(visible(t))} <small>{percent(p)}</small></td>"
                for t, p in zip(toks, probs, strict=True)
            ),
        )
        for layer, toks, probs in zip(result.layers, result.tokens, result.probs, strict=True)
    )
    return f'<table class="lmscope lmscope-lens">{rows}</table>'
