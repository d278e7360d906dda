"""Views of rankings (``Rankings``, ``RankingsWatch``): a heatmap of ranks, layers as rows.

As in Alammar (2021)'s figures: the input above, one row per layer, one column per ranked token,
the rank printed in each cell and its colour on a log scale (darker = nearer the top; rank 1 is
the darkest). The same heatmap exports as a static matplotlib figure (:func:`plot`).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

from lmscope.analysis.rankings import Rankings, RankingsWatch
from lmscope.views._figure import new_figure
from lmscope.views._html import fragment
from lmscope.views._prediction import describe
from lmscope.views._text import table, visible

__all__ = ["plot", "to_html", "to_text", "view_data"]

ANNOTATE_CELLS = 3000  # the static figure prints ranks in cells up to this many cells


def _title(result: Rankings | RankingsWatch) -> str:
    norm = "" if result.norm else ", no final norm"
    scale = f"(1 = top of {result.vocab_size}), {result.site}{norm}"
    if isinstance(result, RankingsWatch):
        what = describe(result.position, result.state_position, result.input_tokens)
        return f"Rankings watch: {what}; rank of each watched token {scale}"
    if result.positions == result.targets:  # a masked LM predicts each token where it stands
        return f"Rankings: rank of each token at its own position after every layer {scale}"
    what = "generated" if result.n_input < len(result.input_tokens) else "next"
    return f"Rankings: rank of each {what} token after every layer {scale}"


def _notes(result: Rankings | RankingsWatch) -> list[str]:
    text = "".join(result.input_tokens[: result.n_input])
    notes = [f"input: {text!r}"]
    if isinstance(result, RankingsWatch):
        notes.extend(result.notes)
    return notes


def to_text(result: Rankings | RankingsWatch) -> str:
    """The title, the input, then one row per layer with the rank of each column's token."""
    header = ["layer", *(visible(c) for c in result.columns)]
    rows = [[str(layer), *map(str, row)] for layer, row in zip(result.layers, result.ranks.tolist(), strict=True)]
    return "\n".join([_title(result), *_notes(result), table(header, rows)])


def _column_titles(result: Rankings | RankingsWatch) -> list[str]:
    if isinstance(result, RankingsWatch):
        return [
            f"{word!r} → token {column!r} (id {int(i)})"
            for word, column, i in zip(result.words, result.columns, result.column_ids, strict=True)
        ]
    return [
        f"{column!r} at position {t}, predicted at position {p}"
        for column, t, p in zip(result.columns, result.targets, result.positions, strict=True)
    ]


def view_data(result: Rankings | RankingsWatch) -> dict[str, Any]:
    """The JSON the page's ``rankings`` view draws."""
    watch = isinstance(result, RankingsWatch)
    return {
        "title": _title(result),
        "notes": _notes(result)[1:],
        "input": list(result.input_tokens),
        "n_input": result.n_input,
        "mark": [result.state_position] if watch else [],
        "layers": list(result.layers),
        "columns": list(result.columns),
        "column_titles": _column_titles(result),
        "ranks": result.ranks.tolist(),
        "vocab": result.vocab_size,
    }


def to_html(result: Rankings | RankingsWatch) -> str:
    return fragment(
        "rankings", view_data(result), scripts=("rankings.js",), styles=("rankings.css",), text=to_text(result)
    )


def plot(result: Rankings | RankingsWatch, annotate: bool | None = None) -> Any:
    """The heatmap as a matplotlib ``Figure``: layers as rows, log colour scale, rank 1 darkest.

    ``annotate`` prints the rank in each cell (default: when there are at most ``ANNOTATE_CELLS``).
    Save it with ``figure.savefig("rankings.png")`` or ``.svg``.
    """
    figure_ranks = result.ranks  # [layer, column]
    n_layers, n_columns = figure_ranks.shape
    width, height = max(6.0, 1.6 + 0.45 * n_columns), max(3.0, 1.6 + 0.28 * n_layers)
    figure = new_figure(figsize=(width, height), layout="constrained")
    from matplotlib.colors import LogNorm

    axes = figure.add_subplot()
    norm = LogNorm(vmin=1, vmax=max(2, result.vocab_size))
    image = axes.imshow(figure_ranks, cmap="Blues_r", norm=norm, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(n_columns), [visible(c) for c in result.columns], rotation=90 if n_columns > 8 else 0)
    axes.set_yticks(range(n_layers), [str(layer) for layer in result.layers])
    axes.set_ylabel("layer")
    axes.set_title(textwrap.fill(_title(result), int(width * 11)), fontsize=9, loc="left")
    if annotate is None:
        annotate = figure_ranks.size <= ANNOTATE_CELLS
    if annotate:
        dark = math.log(result.vocab_size) * 0.45  # cells darker than this get white text
        for (i, j), rank in _cells(figure_ranks):
            color = "white" if math.log(rank) < dark else "black"
            axes.text(j, i, str(rank), ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=axes, label="rank (log scale, 1 = top)")
    return figure


def _cells(ranks: Any) -> list[tuple[tuple[int, int], int]]:
    return [((i, j), int(v)) for i, row in enumerate(ranks.tolist()) for j, v in enumerate(row)]
