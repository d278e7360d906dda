"""Views of a probing study (``ProbingResult``): the layer × site table, an HTML chart, a matplotlib figure.

Hidden states (``embeddings`` as the first row, then ``resid_post`` per layer) and FFN activations
(``mlp_act``) are column groups; each shows accuracy, control accuracy and selectivity, mean ± std over
seeds, in percent.
"""

from __future__ import annotations

import os
from typing import Any

from lmscope.probing._study import ProbeRow, ProbingResult
from lmscope.views._html import fragment
from lmscope.views._text import table

__all__ = ["plot", "to_html", "to_text"]

# column group -> the sites drawn in it
GROUPS = {"hidden": ("embeddings", "resid_post"), "FFN": ("mlp_act",)}


def _cell(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _groups(result: ProbingResult) -> dict[str, dict[str, ProbeRow]]:
    """group -> layer label ("emb", "0", ...) -> row."""
    out: dict[str, dict[str, ProbeRow]] = {}
    for group, sites in GROUPS.items():
        rows = {("emb" if r.site == "embeddings" else str(r.layer)): r for r in result.rows if r.site in sites}
        if rows:
            out[group] = rows
    return out


def _layer_labels(result: ProbingResult) -> list[str]:
    labels = ["emb"] if any(r.site == "embeddings" for r in result.rows) else []
    return labels + [str(layer) for layer in sorted({r.layer for r in result.rows if r.site != "embeddings"})]


def to_text(result: ProbingResult) -> str:
    seeds = len(result.seeds)
    head = (
        f"Probing {result.task} on {result.model}: {result.n_words:,} words in {result.n_sentences:,} sentences "
        f"(train {result.n_train:,.0f} / dev {result.n_dev:,.0f} / test {result.n_test:,.0f}, split by sentence), "
        f"{result.pool} subword, {seeds} seed{'s' if seeds != 1 else ''}\n"
        f"Accuracy, control-task accuracy and selectivity in % (mean ± std over seeds); "
        f"majority-label baseline {100 * result.majority:.1f}%"
    )
    groups = _groups(result)
    header = ["layer"]
    for group in groups:
        header += [f"{group} acc", f"{group} control", f"{group} selectivity"]
    rows = []
    for label in _layer_labels(result):
        line = [label]
        for rows_by_layer in groups.values():
            row = rows_by_layer.get(label)
            if row is None:
                line += ["", "", ""]
            else:
                line += [
                    _cell(row.accuracy, row.accuracy_std),
                    _cell(row.control_accuracy, row.control_accuracy_std),
                    _cell(row.selectivity, row.selectivity_std),
                ]
        rows.append(line)
    return head + "\n" + table(header, rows)


def _series(result: ProbingResult) -> list[dict[str, Any]]:
    series = []
    for group, rows_by_layer in _groups(result).items():
        points = [
            {
                "layer": label,
                "accuracy": row.accuracy,
                "accuracy_std": row.accuracy_std,
                "control": row.control_accuracy,
                "control_std": row.control_accuracy_std,
                "selectivity": row.selectivity,
                "selectivity_std": row.selectivity_std,
            }
            for label, row in rows_by_layer.items()
        ]
        series.append({"name": group, "points": points})
    return series


def to_html(result: ProbingResult) -> str:
    data = {
        "title": f"{result.task} probes on {result.model}",
        "layers": _layer_labels(result),
        "series": _series(result),
        "majority": result.majority,
        "seeds": len(result.seeds),
    }
    return fragment("probing", data, scripts=("probing.js",), styles=("probing.css",), text=to_text(result))


def plot(result: ProbingResult, path: str | os.PathLike[str] | None = None) -> Any:
    """Two panels by layer: accuracy (solid) and control accuracy (dashed); selectivity. Error bars: std."""
    from lmscope.views._figure import new_figure  # no pyplot; a clear message without matplotlib

    labels = _layer_labels(result)
    x_of = {label: i for i, label in enumerate(labels)}
    figure = new_figure(figsize=(9, 3.6), layout="constrained")
    accuracy, selectivity = figure.subplots(1, 2, sharex=True)
    colors = {"hidden": "#1f77b4", "FFN": "#d62728"}
    for group in _series(result):
        xs = [x_of[p["layer"]] for p in group["points"]]
        color = colors.get(group["name"], "#555555")
        get = {key: [p[key] for p in group["points"]] for key in group["points"][0]}
        name = group["name"]
        style = {"color": color, "capsize": 2}
        accuracy.errorbar(xs, get["accuracy"], get["accuracy_std"], marker="o", ms=3, label=f"{name} task", **style)
        accuracy.errorbar(xs, get["control"], get["control_std"], ls="--", marker=".", label=f"{name} control", **style)
        selectivity.errorbar(xs, get["selectivity"], get["selectivity_std"], marker="o", ms=3, label=name, **style)
    accuracy.axhline(result.majority, color="#888888", lw=0.8, ls=":", label="majority label")
    accuracy.set(title=f"{result.task} probe accuracy ({result.model})", xlabel="layer", ylabel="test accuracy")
    selectivity.set(title="selectivity = accuracy − control", xlabel="layer", ylabel="selectivity")
    for axes in (accuracy, selectivity):
        axes.set_xticks(range(len(labels)), labels)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    if path is not None:
        figure.savefig(os.fspath(path), dpi=120)
    return figure
