"""Views of causal tracing (:class:`CausalTrace`) and activation patching (:class:`Patching`).

Causal tracing: one heatmap per site (residual stream, attention output, MLP output), layers as
rows, positions as columns, each cell the target's probability with that state restored. Patching:
the exact and the attribution heatmaps side by side, on one colour scale, with their rank
correlation. The text twin lists the strongest cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmscope.views._figure import heatmap_grid
from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["plot", "to_html", "to_text"]

_SITE_NAMES = {"resid": "residual stream", "attn_out": "attention output", "mlp_out": "MLP output"}


def _is_trace(result: Any) -> bool:
    return hasattr(result, "subject")


def _title(result: Any) -> str:
    if _is_trace(result):
        subject = "".join(result.tokens[p] for p in result.subject)
        window = f", window {result.window}" if result.window > 1 else ""
        samples = f"{result.samples} sample" + ("s" if result.samples != 1 else "")
        return (
            f"causal tracing: P({visible(result.target)}) with each state restored, subject {visible(subject)!s} "
            f"corrupted (noise σ={result.noise:.3g}, {samples}{window})"
        )
    wrong = f" − logit({visible(result.wrong)})" if result.wrong is not None else ""
    return (
        f"patching {result.kind} clean → corrupted: change of logit({visible(result.answer)}){wrong}; "
        f"Spearman ρ(exact, attribution) = {result.spearman:.3f}"
    )


def _notes(result: Any) -> list[str]:
    if _is_trace(result):
        layer, pos = result.peak()
        where = "the embedding" if layer < 0 else f"layer {layer}"
        return [
            f"clean {percent(result.clean_prob)}, corrupted {percent(result.corrupted_prob)}; "
            f"peak (residual): {where}, position {pos} {visible(result.tokens[pos])}"
        ]
    return [
        f"metric clean {result.clean_metric:.3f}, corrupted {result.corrupted_metric:.3f}; "
        f"exact {result.exact_seconds:.2f} s, attribution {result.attribution_seconds:.2f} s"
    ]


def _panels(result: Any) -> list[dict[str, Any]]:
    if _is_trace(result):
        rows = ["embed" if layer < 0 else str(layer) for layer in result.layers]
        columns = [visible(t) + ("*" if i in result.subject else "") for i, t in enumerate(result.tokens)]
        return [
            {"name": _SITE_NAMES[site], "rows": rows, "columns": columns, "values": result.scores[i]}
            for i, site in enumerate(result.sites)
        ]
    exact, attribution = result.exact, result.attribution
    if result.kind == "neurons":
        exact, attribution = exact[:, None], attribution[:, None]
    columns = [visible(c) for c in result.columns]
    return [
        {"name": "exact patching", "rows": list(result.rows), "columns": columns, "values": exact},
        {"name": "attribution patching", "rows": list(result.rows), "columns": columns, "values": attribution},
    ]


def _scale(result: Any) -> float:
    if _is_trace(result):
        return float(max(result.clean_prob, np.nanmax(result.scores), 1e-12))
    both = np.concatenate([np.abs(result.exact).reshape(-1), np.abs(result.attribution).reshape(-1)])
    return float(max(np.nanmax(both), 1e-12))


def _rounded(values: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in values]


def to_text(result: Any) -> str:
    lines = [_title(result), *_notes(result)]
    if _is_trace(result):
        for panel in _panels(result):
            lines.append(f"{panel['name']}:")
            header = ["layer", *panel["columns"]]
            rows = [[r, *("" if not np.isfinite(v) else f"{v:.3f}" for v in vals)]
                    for r, vals in zip(panel["rows"], panel["values"], strict=True)]  # fmt: skip
            lines.append(table(header, rows))
        return "\n".join(lines)
    name = {"heads": "layer.head", "positions": "layer@pos", "neurons": "layer.neuron"}[result.kind]
    rows = []
    for layer, unit, value in result.top(10):
        i = result.cells.index((layer, unit))
        label = f"L{layer}.H{unit}" if result.kind == "heads" else f"L{layer}.N{unit}"
        if result.kind == "positions":
            label = f"L{layer} @ {unit} {visible(result.corrupted_tokens[unit])}"
        rows.append([label, f"{value:.4f}", f"{np.asarray(result.attribution).reshape(-1)[i]:.4f}"])
    lines.append(table([name, "exact", "attribution"], rows))
    return "\n".join(lines)


def to_html(result: Any) -> str:
    scale = _scale(result)
    panels = [{**p, "values": _rounded(np.asarray(p["values"])), "scale": scale} for p in _panels(result)]
    data = {"title": _title(result), "notes": _notes(result), "panels": panels}
    return fragment("interventions", data, scripts=("interventions.js",), styles=("interventions.css",),
                    text=to_text(result))  # fmt: skip


def plot(result: Any) -> Any:
    """The heatmaps as a matplotlib ``Figure``."""
    panels = _panels(result)
    signed = not _is_trace(result)
    scale = _scale(result)
    return heatmap_grid(
        [(np.asarray(p["values"], float), p["name"]) for p in panels],
        rows=panels[0]["rows"],
        columns=panels[0]["columns"],
        title=_title(result),
        ncols=len(panels),
        cmap="RdBu" if signed else "Blues",
        vmin=-scale if signed else 0.0,
        vmax=scale,
    )
