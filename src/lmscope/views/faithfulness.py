"""The faithfulness curves of :class:`Faithfulness`: target logit after ablating top-k vs random k edges."""

from __future__ import annotations

from typing import Any

from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["to_html", "to_text"]


def _title(result: Any) -> str:
    return (
        f"faithfulness of the flow graph ({result.n_edges} attention/FFN edges): logit of "
        f"{visible(result.target)} after ablating the top-k edges vs k random edges ({result.draws} draws); "
        f"mean drop {result.top_auc:.3f} (top) vs {result.random_auc:.3f} (random)"
    )


def to_text(result: Any) -> str:
    rows = [
        [str(k), f"{t:.3f}", f"{r:.3f}", percent(float(tp)), percent(float(rp))]
        for k, t, r, tp, rp in zip(
            result.ks, result.top_logit, result.random_logit, result.top_prob, result.random_prob, strict=True
        )
    ]
    header = ["k", "top-k logit", "random logit", "top-k prob", "random prob"]
    return "\n".join([_title(result), f"intact logit {result.base_logit:.3f}", table(header, rows)])


def to_html(result: Any) -> str:
    """The table as the view (its curves are the rows); the text twin is the same table."""
    scale = max(abs(result.base_logit), 1e-9)
    panel = {
        "name": "target logit ÷ intact",
        "rows": ["top-k", "random k"],
        "columns": [f"k={k}" for k in result.ks],
        "values": [
            [round(float(v) / scale, 5) for v in result.top_logit],
            [round(float(v) / scale, 5) for v in result.random_logit],
        ],
        "scale": 1.0,
    }
    data = {"title": _title(result), "notes": [f"intact logit {result.base_logit:.3f}"], "panels": [panel]}
    return fragment("interventions", data, scripts=("interventions.js",), styles=("interventions.css",),
                    text=to_text(result))  # fmt: skip
