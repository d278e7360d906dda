"""Heatmap of layer-pair similarity (Ecco's Figure 6) for ``LayerSimilarity``.

Notes under the title say which positions were compared, and warn when one position holds more
than half of a site's centered squared norm (an attention sink): the measure then mostly compares
that one token across layers.
"""

from __future__ import annotations

from typing import Any

from lmscope.analysis._positions import dominance_note
from lmscope.analysis.layer_similarity import LayerSimilarity
from lmscope.views._figure import heatmap
from lmscope.views._html import fragment
from lmscope.views._text import table, visible

__all__ = ["notes", "plot", "to_html", "to_text"]


def _title(result: LayerSimilarity) -> str:
    options = ", ".join(f"{k}={v}" for k, v in sorted(result.options.items()))
    method = result.method.upper() + (f" ({options})" if options else "")
    return f"{method}: {result.site_a} (rows) vs {result.site_b} (columns) over {result.n_tokens} tokens"


def notes(result: LayerSimilarity) -> list[str]:
    """The position selection (when not all) and a warning per site dominated by one position."""
    out = [] if result.selection == "all positions" else [f"compared: {result.selection}"]
    for found in result.dominance:
        note = dominance_note(found, visible(found.token))
        if note:
            out.append("note: " + note)
    return out


def to_text(result: LayerSimilarity) -> str:
    header = ["layer", *map(str, result.layers_b)]
    rows = [[str(layer), *(f"{v:.3f}" for v in row)] for layer, row in zip(result.layers_a, result.matrix, strict=True)]
    return "\n".join([_title(result), *notes(result), table(header, rows)])


def to_html(result: LayerSimilarity) -> str:
    data = {
        "title": _title(result),
        "notes": notes(result),
        "site_a": result.site_a,
        "site_b": result.site_b,
        "layers_a": list(result.layers_a),
        "layers_b": list(result.layers_b),
        "matrix": [[round(float(v), 5) for v in row] for row in result.matrix],
    }
    return fragment("similarity", data, scripts=("similarity.js",), styles=("similarity.css",), text=to_text(result))


def plot(result: LayerSimilarity, annotate: bool | None = None) -> Any:
    """The heatmap as a matplotlib ``Figure`` (``site_a`` layers as rows), colour scale 0..1."""
    return heatmap(
        result.matrix,
        rows=[str(layer) for layer in result.layers_a],
        columns=[str(layer) for layer in result.layers_b],
        title="\n".join([_title(result), *notes(result)]),
        ylabel=f"{result.site_a} layer",
        xlabel=f"{result.site_b} layer",
        vmin=0.0,
        vmax=1.0,
        colorbar=result.method.upper(),
        annotate=annotate,
    )
