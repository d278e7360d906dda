"""Heatmap of layer-pair similarity (Ecco's Figure 6) for ``LayerSimilarity``."""

from __future__ import annotations

from lmscope.analysis.layer_similarity import LayerSimilarity
from lmscope.views._html import fragment
from lmscope.views._text import table

__all__ = ["to_html", "to_text"]


def _title(result: LayerSimilarity) -> str:
    options = ", ".join(f"{k}={v}" for k, v in sorted(result.options.items()))
    method = result.method.upper() + (f" ({options})" if options else "")
    return f"{method}: {result.site_a} (rows) vs {result.site_b} (columns) over {result.n_tokens} tokens"


def to_text(result: LayerSimilarity) -> str:
    header = ["layer", *map(str, result.layers_b)]
    rows = [[str(layer), *(f"{v:.3f}" for v in row)] for layer, row in zip(result.layers_a, result.matrix, strict=True)]
    return _title(result) + "\n" + table(header, rows)


def to_html(result: LayerSimilarity) -> str:
    data = {
        "title": _title(result),
        "site_a": result.site_a,
        "site_b": result.site_b,
        "layers_a": list(result.layers_a),
        "layers_b": list(result.layers_b),
        "matrix": [[round(float(v), 5) for v in row] for row in result.matrix],
    }
    return fragment("similarity", data, scripts=("similarity.js",), styles=("similarity.css",), text=to_text(result))
