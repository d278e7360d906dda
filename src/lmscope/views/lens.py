"""Views of the logit lens (``LayerPredictions``): one row per layer, the top tokens as boxes.

As in Ecco's ``layer_predictions`` figure: each row is a layer, each box a predicted token with a
bar showing its probability. Probabilities below 0.01% show as ``<0.01%``, never 0.
"""

from __future__ import annotations

from typing import Any

from lmscope.analysis.lens import LayerPredictions
from lmscope.views._html import fragment
from lmscope.views._prediction import describe
from lmscope.views._text import percent, table, visible

__all__ = ["to_html", "to_text", "view_data"]


def _title(result: LayerPredictions) -> str:
    norm = "" if result.norm else ", no final norm"
    what = describe(result.position, result.state_position, result.input_tokens)
    return f"Logit lens: {what}, {result.site}{norm}"


def to_text(result: LayerPredictions) -> str:
    """The title, then one row per layer: the top tokens with their probabilities."""
    rows = [
        [str(layer), *(f"{visible(t)} {percent(p)}" for t, p in zip(toks, probs, strict=True))]
        for layer, toks, probs in zip(result.layers, result.tokens, result.probs, strict=True)
    ]
    k = result.probs.shape[1]
    return _title(result) + "\n" + table(["layer", *(f"top {i + 1}" for i in range(k))], rows)


def view_data(result: LayerPredictions) -> dict[str, Any]:
    """The JSON the page's ``lens`` view draws (probabilities to 4 significant digits)."""
    return {
        "title": _title(result),
        "input": list(result.input_tokens),
        "n_input": len(result.input_tokens) if result.n_input is None else result.n_input,
        "position": result.position,
        "state_position": result.state_position,
        "layers": list(result.layers),
        "tokens": [list(row) for row in result.tokens],
        "ids": result.token_ids.tolist(),
        "probs": [[float(f"{p:.4g}") for p in row] for row in result.probs.tolist()],
    }


def to_html(result: LayerPredictions) -> str:
    return fragment("lens", view_data(result), scripts=("lens.js",), styles=("lens.css",), text=to_text(result))
