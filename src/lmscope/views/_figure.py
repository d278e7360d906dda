"""Static matplotlib figures (PNG/SVG for papers), made without pyplot.

matplotlib is an optional extra (``lmscope[analysis]``), imported only when a figure is asked for.
Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, so no global backend or
pyplot state is touched and it works headless; ``figure.savefig("x.svg")`` picks the format from
the file name.

Every heatmap-like result has ``.plot()`` returning such a figure: rankings, layer similarity,
contribution maps, attention, saliency, the logit lens, NMF factors and neuron activations
(probing draws its own line chart). :func:`heatmap` and :func:`heatmap_grid` are the shared
drawing; token labels go through :func:`token_labels`, so whitespace stays visible (``·``, ``↵``).
matplotlib draws labels as text, never markup, so they need no escaping.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.views._text import percent, visible

__all__ = [
    "heatmap",
    "heatmap_grid",
    "new_figure",
    "plot_attention",
    "plot_lens",
    "plot_saliency",
    "token_labels",
]

ANNOTATE_CELLS = 400  # heatmaps print each cell's value up to this many cells (unless told)
TICK_LIMIT = 80  # label every tick up to this many rows/columns, else every n-th


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` on an Agg canvas (``kwargs`` go to ``Figure``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise LmscopeError(
            "static figures need matplotlib, which is not installed: pip install 'lmscope[analysis]'"
        ) from error
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Tokens as axis labels, whitespace made visible (``·`` for a space, ``↵`` for a newline)."""
    return [visible(t) for t in tokens]


def _ticks(axes: Any, rows: Sequence[str], columns: Sequence[str]) -> None:
    step_x = max(1, math.ceil(len(columns) / TICK_LIMIT))
    step_y = max(1, math.ceil(len(rows) / TICK_LIMIT))
    xs = range(0, len(columns), step_x)
    rotate = 90 if len(columns) > 6 or max(map(len, columns), default=0) > 6 else 0
    axes.set_xticks(list(xs), [columns[i] for i in xs], rotation=rotate, fontsize=8)
    ys = range(0, len(rows), step_y)
    axes.set_yticks(list(ys), [rows[i] for i in ys], fontsize=8)


def _scale(values: np.ndarray, vmin: float | None, vmax: float | None, center: float | None) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if vmin is None and finite.size else (vmin if vmin is not None else 0.0)
    high = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    if center is not None:
        reach = max(abs(low - center), abs(high - center)) or 1.0
        return center - reach, center + reach
    return (low, high) if high > low else (low, low + 1.0)


def _size(n_rows: int, n_cols: int) -> tuple[float, float]:
    return min(22.0, max(5.0, 2.2 + 0.32 * n_cols)), min(22.0, max(3.0, 1.8 + 0.3 * n_rows))


def heatmap(
    values: Any,
    *,
    rows: Sequence[str],
    columns: Sequence[str],
    title: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    cmap: str = "Blues",
    vmin: float | None = None,
    vmax: float | None = None,
    center: float | None = None,
    colorbar: str | None = None,
    annotate: bool | None = None,
    fmt: Any = "{:.2f}",
    cells: Sequence[Sequence[str]] | None = None,
    figsize: tuple[float, float] | None = None,
) -> Any:
    """A ``Figure`` with one heatmap of ``values [row, column]`` labelled by ``rows`` and ``columns``.

    ``center`` makes a diverging scale symmetric around it; ``annotate`` prints each cell's value
    with ``fmt`` (a format string or a function), or the strings ``cells`` when given (default:
    when there are at most ``ANNOTATE_CELLS`` cells).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape != (len(rows), len(columns)):
        raise LmscopeError(f"heatmap: values of shape {values.shape} do not match {len(rows)} × {len(columns)} labels")
    width, height = figsize or _size(*values.shape)
    figure = new_figure(figsize=(width, height), layout="constrained")
    axes = figure.add_subplot()
    low, high = _scale(values, vmin, vmax, center)
    image = axes.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    _ticks(axes, rows, columns)
    if xlabel:
        axes.set_xlabel(xlabel)
    if ylabel:
        axes.set_ylabel(ylabel)
    if title:
        axes.set_title("\n".join(textwrap.fill(line, int(width * 11)) for line in title.split("\n")), fontsize=9,
                       loc="left")  # fmt: skip
    if annotate is None:
        annotate = values.size <= ANNOTATE_CELLS
    if annotate:
        _annotate(axes, values, image, fmt, cells)
    if colorbar is not None:
        figure.colorbar(image, ax=axes, label=colorbar)
    return figure


def _annotate(axes: Any, values: np.ndarray, image: Any, fmt: Any, cells: Sequence[Sequence[str]] | None) -> None:
    cmap, norm = image.get_cmap(), image.norm
    write = fmt if callable(fmt) else fmt.format
    for i, j in np.ndindex(*values.shape):
        v = values[i, j]
        text = cells[i][j] if cells is not None else ("" if not np.isfinite(v) else write(v))
        if not text:
            continue
        r, g, b, _ = cmap(norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
        color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
        axes.text(j, i, text, ha="center", va="center", fontsize=6 if cells is not None else 7, color=color)


def heatmap_grid(
    panels: Sequence[tuple[Any, str]],
    *,
    rows: Sequence[str],
    columns: Sequence[str],
    title: str = "",
    ncols: int = 4,
    cmap: str = "Blues",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: str | None = None,
) -> Any:
    """A ``Figure`` with one heatmap per ``(values, panel title)``, sharing labels and colour scale."""
    if not panels:
        raise LmscopeError("heatmap_grid: nothing to draw")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v, _ in panels])
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    side = min(4.5, max(2.2, 0.16 * len(columns) + 1.2))
    figure = new_figure(figsize=(min(24.0, side * ncols + 1.2), min(40.0, side * nrows + 0.8)), layout="constrained")
    low, high = _scale(stack, vmin, vmax, None)
    grid = figure.subplots(nrows, ncols, squeeze=False)
    image = None
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_axis_off()
            continue
        image = axes.imshow(stack[index], cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
        axes.set_title(panels[index][1], fontsize=8)
        if len(columns) <= 40:
            _ticks(axes, rows, columns)
        else:
            axes.set_xticks([])
            axes.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=9)
    if colorbar is not None and image is not None:
        figure.colorbar(image, ax=grid, label=colorbar, shrink=0.6)
    return figure


# --- figures of results whose view modules draw HTML only ---------------------------------------


def plot_attention(result: Any, layer: int | None = None, head: int | None = None) -> Any:
    """Attention maps (query rows, key columns) of one layer: every head, or one ``head``.

    ``layer`` is a model layer of ``result.layers`` (default: the first one shown).
    """
    layer = result.layers[0] if layer is None else layer
    if layer not in result.layers:
        raise LmscopeError(f"layer {layer} is not in this result (layers {list(result.layers)})")
    maps = result.weights[result.layers.index(layer)]  # [head, pos_q, pos_k]
    labels = token_labels(result.tokens)
    keys = token_labels(result.keys)  # cross-attention: the encoder's source tokens
    what = {"weights": "Attention", "rollout": "Attention rollout", "value_norm": "Attention × value norm"}
    name = what.get(result.kind, "Attention") + {
        "encoder": " (encoder)",
        "decoder": " (decoder)",
        "cross": " (cross)",
    }.get(result.part, "")
    scale = None if result.kind == "value_norm" else 1.0
    if head is not None or maps.shape[0] == 1:
        h = 0 if head is None else head
        if not -maps.shape[0] <= h < maps.shape[0]:
            raise LmscopeError(f"head {h} is out of range: this result has heads 0..{maps.shape[0] - 1}")
        heads = "" if maps.shape[0] == 1 else f", head {h % maps.shape[0]}"
        return heatmap(
            maps[h], rows=labels, columns=keys, title=f"{name}, layer {layer}{heads} ({result.model})",
            xlabel="key (attended to)", ylabel="query", vmin=0.0, vmax=scale, colorbar="weight", annotate=False,
        )  # fmt: skip
    panels = [(maps[h], f"head {h}") for h in range(maps.shape[0])]
    return heatmap_grid(
        panels, rows=labels, columns=keys, title=f"{name}, layer {layer} ({result.model}): query rows, key columns",
        vmin=0.0, vmax=scale, colorbar="weight",
    )  # fmt: skip


def plot_saliency(result: Any) -> Any:
    """Saliency as a heatmap: one row per explained output token, one column per input token."""
    tokens = [*result.tokens, *([] if getattr(result, "next_token", None) is None else [result.next_token])]
    n_cols = max((len(a) for a in result.attributions), default=0)
    values = np.full((len(result.positions), n_cols), np.nan)
    for i, row in enumerate(result.attributions):
        values[i, : len(row)] = row
    rows = [f"{visible(tokens[t])} @{t}" for t in result.positions]
    signed = bool(result.signed)
    return heatmap(
        values, rows=rows, columns=token_labels(result.tokens[:n_cols]),
        title=f"Saliency: {result.method} (rows: explained token, columns: input tokens)",
        xlabel="input token", ylabel="explained token", cmap="RdBu_r" if signed else "Reds",
        center=0.0 if signed else None, vmin=None if signed else 0.0,
        colorbar="attribution" + ("" if signed else " (share)"), fmt=(lambda v: f"{v:+.2f}") if signed else "{:.2f}",
    )  # fmt: skip


def plot_lens(result: Any) -> Any:
    """The logit lens as a heatmap: layers as rows, the top-k ranks as columns, each cell the token
    with its probability as colour (log scale)."""
    from matplotlib.colors import LogNorm

    probs = np.asarray(result.probs, dtype=np.float64)  # [layer, k]
    cells = [[f"{visible(t)}\n{percent(p)}" for t, p in zip(row, prow, strict=True)] for row, prow in
             zip(result.tokens, probs.tolist(), strict=True)]  # fmt: skip
    title = f"Logit lens, {result.site}" + ("" if result.norm else ", no final norm")
    figure = heatmap(
        probs, rows=[str(layer) for layer in result.layers], columns=[f"top {i + 1}" for i in range(probs.shape[1])],
        title=title, ylabel="layer", cmap="Blues", vmin=0.0, vmax=1.0, colorbar="probability", annotate=True,
        cells=cells, figsize=(min(22.0, 1.5 + 1.0 * probs.shape[1]), min(30.0, 1.6 + 0.42 * probs.shape[0])),
    )  # fmt: skip
    image = figure.axes[0].images[0]
    image.set_norm(LogNorm(vmin=1e-4, vmax=1.0))
    return figure
