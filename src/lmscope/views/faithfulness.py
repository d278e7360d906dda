"""The faithfulness curves of :class:`Faithfulness`: the target after removing top-k vs random k units.

Two line charts over ``k`` (the target's logit, and its probability): removing the method's top-``k``
(deletion), ``k`` at random, and for tokens keeping only the top-``k`` (insertion), with the intact
run as a dashed line. The text twin is the same curves as a table, with the areas and, for tokens,
each token's attribution and rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["plot", "to_html", "to_text"]


def _what(result: Any) -> str:
    if result.unit == "edge":
        return f"the flow graph ({result.n_units} attention/FFN edges)"
    return f"{result.method} saliency ({result.n_units} tokens; deleted = {result.baseline})"


def _title(result: Any) -> str:
    return (
        f"faithfulness of {_what(result)}: logit of {visible(result.target)} after removing the top-k "
        f"{result.unit}s vs k random {result.unit}s ({result.draws} draws)"
    )


def _notes(result: Any) -> list[str]:
    notes = [
        f"intact logit {result.base_logit:.3f} ({percent(result.base_prob)}); mean logit drop "
        f"{result.top_auc:.3f} (top-k) vs {result.random_auc:.3f} (random k)"
        + (": the top-ranked matter more" if result.beats_random else ": no better than random")
    ]
    if result.comprehensiveness is not None:
        notes.append(
            f"comprehensiveness {result.comprehensiveness:.4g} (random {result.random_comprehensiveness:.4g}; "
            f"higher is more faithful), sufficiency {result.sufficiency:.4g} (lower is more faithful)"
        )
    return notes


def _series(result: Any, kind: str) -> list[dict[str, Any]]:
    top, rand = getattr(result, f"top_{kind}"), getattr(result, f"random_{kind}")
    series = [
        {"name": f"top-k {result.unit}s removed (deletion)", "values": top, "style": "top"},
        {"name": f"k random {result.unit}s removed", "values": rand, "style": "random"},
    ]
    insert = getattr(result, f"insert_{kind}")
    if insert is not None:
        series.append({"name": "only the top-k kept (insertion)", "values": insert, "style": "insert"})
    return [{**s, "values": [round(float(v), 6) for v in s["values"]]} for s in series]


def to_text(result: Any) -> str:
    header = ["k", "top-k logit", "random logit", "top-k prob", "random prob"]
    columns = [result.top_logit, result.random_logit, result.top_prob, result.random_prob]
    probs = [False, False, True, True]
    if result.insert_logit is not None:
        header += ["top-k only logit", "top-k only prob"]
        columns += [result.insert_logit, result.insert_prob]
        probs += [False, True]
    rows = [
        [str(k), *(percent(float(c[i])) if p else f"{float(c[i]):.3f}" for c, p in zip(columns, probs, strict=True))]
        for i, k in enumerate(result.ks)
    ]
    lines = [_title(result), *_notes(result), table(header, rows)]
    if result.scores is not None:
        order = np.argsort(-result.scores, kind="stable")
        rank = {int(p): r + 1 for r, p in enumerate(order)}
        tokens = [[str(p), visible(t), f"{float(result.scores[p]):.4f}", str(rank[p])]
                  for p, t in enumerate(result.tokens)]  # fmt: skip
        lines += ["attributions:", table(["pos", "token", "score", "rank"], tokens)]
    return "\n".join(lines)


def to_html(result: Any) -> str:
    charts = [
        {"name": f"logit of {visible(result.target)}", "base": result.base_logit, "series": _series(result, "logit")},
        {
            "name": f"probability of {visible(result.target)}",
            "base": result.base_prob,
            "series": _series(result, "prob"),
        },
    ]
    data = {
        "title": _title(result),
        "notes": _notes(result),
        "ks": list(result.ks),
        "unit": result.unit,
        "charts": charts,
        "tokens": list(result.tokens) if result.scores is not None else None,
        "scores": None if result.scores is None else [round(float(v), 6) for v in result.scores],
    }
    return fragment("faithfulness", data, scripts=("faithfulness.js",), styles=("faithfulness.css",),
                    text=to_text(result))  # fmt: skip


def plot(result: Any) -> Any:
    """The curves as a matplotlib ``Figure``: the target's logit and probability over ``k``."""
    from lmscope.views._figure import new_figure

    figure = new_figure(figsize=(10, 4), layout="constrained")
    colors = {"top": "#d62728", "random": "#7f7f7f", "insert": "#1f77b4"}
    for i, kind in enumerate(("logit", "prob")):
        axes = figure.add_subplot(1, 2, i + 1)
        for series in _series(result, kind):
            axes.plot(result.ks, series["values"], marker="o", color=colors[series["style"]], label=series["name"])
        axes.axhline(result.base_logit if kind == "logit" else result.base_prob, color="#888", linestyle="--")
        axes.set_xlabel("k")
        axes.set_ylabel(f"{'logit' if kind == 'logit' else 'probability'} of {visible(result.target)}")
    axes.legend(fontsize=8)
    figure.suptitle(_title(result), fontsize=9)
    return figure
