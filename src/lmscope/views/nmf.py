"""The factor explorer (Ecco's Figure 9) for ``Factors``, and top neurons for ``Activations``.

One row per factor (or neuron) with a sparkline of its strength over the tokens of the selected
text; hovering a row highlights every token by that factor's strength, otherwise each token takes
the color of its strongest factor. Below, the top tokens of every factor across all texts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmscope.analysis._positions import dominance_note
from lmscope.analysis.neurons import Activations, Factors
from lmscope.views._figure import heatmap, token_labels
from lmscope.views._html import fragment
from lmscope.views._text import table, visible

__all__ = ["notes", "plot", "to_html", "to_text"]

PLOT_TOKENS = 120  # the static figure shows at most this many tokens (of the first text)

MAX_TEXTS = 50  # texts the explorer carries for browsing; top tokens always cover every text
CONTEXT = 4  # tokens of left context shown with each top token


def _layer_range(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}..{layers[-1]}"
    return "layer " + ", ".join(map(str, layers)) if len(layers) == 1 else "layers " + ", ".join(map(str, layers))


def _title(result: Factors) -> str:
    n_texts = len(result.offsets)
    what = f"{result.method.upper()} of {result.site}, {_layer_range(result.layers)}"
    size = f"{result.n_components} factors, {len(result.tokens)} tokens in {n_texts} text{'s' * (n_texts != 1)}"
    return f"{what} ({size})"


def _subtitle(result: Factors) -> str:
    parts = [f"relative reconstruction error {result.relative_error:.3f}"]
    if result.nonneg == "clip":
        parts.append(f"negatives clipped to 0 ({result.negative_fraction:.1%} of entries)")
    elif result.nonneg == "shift":
        parts.append(f"shifted by each neuron's minimum ({result.negative_fraction:.1%} of entries were negative)")
    parts.append(f"seed {result.seed}")
    if result.selection != "all positions":
        parts.append(result.selection)
    return "; ".join(parts)


def notes(result: Factors | Activations) -> list[str]:
    """A warning when one position holds more than half of the squared norm (an attention sink)."""
    found = result.dominance
    if found is None:
        return []
    note = dominance_note(found, visible(found.token))
    return [] if note is None else ["note: " + note]


def _to_text_activations(result: Activations) -> str:
    layers, neurons, n_pos = result.values.shape
    shape = f"[layer, neuron, pos] = [{layers}, {neurons}, {n_pos}]"
    head = f"{result.site} activations {shape}, {_layer_range(result.layers)}"
    if result.positions:
        head += f", positions {_positions(result.positions)}"
    head = "\n".join([head, *notes(result)])
    rows = []
    for layer, neuron, peak in result.top_neurons(10):
        pos = int(result.values[result.layers.index(layer), neuron].argmax())
        at = result.positions[pos] if result.positions else pos
        rows.append([str(layer), str(neuron), f"{peak:.3f}", f"{at} {visible(result.tokens[pos])!r}"])
    return head + "\n" + table(["layer", "neuron", "peak", "at token"], rows)


def to_text(result: Factors | Activations) -> str:
    if isinstance(result, Activations):
        return _to_text_activations(result)
    rows = []
    for factor, top in enumerate(result.top_tokens(6)):
        tokens = ", ".join(f"{visible(token)!r} {value:.2f}" for _, token, value in top)
        neurons = ", ".join(f"L{layer}.{neuron}" for layer, neuron, _ in result.neurons(factor, 3))
        rows.append([str(factor), tokens, neurons])
    lines = [_title(result), _subtitle(result), *notes(result)]
    return "\n".join(lines) + "\n" + table(["factor", "top tokens", "top neurons"], rows)


def _positions(positions: tuple[int, ...]) -> str:
    if list(positions) == list(range(positions[0], positions[-1] + 1)):
        return f"{positions[0]}..{positions[-1]}"
    return ", ".join(map(str, positions))


def _context(tokens: tuple[str, ...], starts: np.ndarray, pos: int) -> tuple[int, list[str]]:
    text = int(np.searchsorted(starts, pos, side="right") - 1)
    begin = max(int(starts[text]), pos - CONTEXT)
    return text, list(tokens[begin:pos])


def _factors_data(result: Factors) -> dict[str, Any]:
    starts = np.asarray(result.offsets)
    ends = [*result.offsets[1:], len(result.tokens)]
    texts = [
        {"tokens": list(result.tokens[s:e]), "values": np.round(result.components[:, s:e], 5).tolist()}
        for s, e in list(zip(result.offsets, ends, strict=True))[:MAX_TEXTS]
    ]
    top = []
    for row in result.top_tokens(8):
        entries = []
        for pos, token, value in row:
            text, before = _context(result.tokens, starts, pos)
            entries.append({"token": token, "value": round(value, 5), "text": text, "before": before})
        top.append(entries)
    rows = [
        {"label": f"factor {i}", "detail": ", ".join(f"L{ly}.{n}" for ly, n, _ in result.neurons(i, 5))}
        for i in range(result.n_components)
    ]
    return {
        "title": _title(result),
        "subtitle": _subtitle(result),
        "notes": notes(result),
        "rows": rows,
        "texts": texts,
        "n_texts": len(result.offsets),
        "top": top,
    }


def _activations_data(result: Activations) -> dict[str, Any]:
    top = result.top_neurons(8)
    values = [result.values[result.layers.index(layer), neuron] for layer, neuron, _ in top]  # [pos] each
    return {
        "title": f"Top {len(top)} neurons of {result.site}, {_layer_range(result.layers)}",
        "subtitle": "rows are the neurons with the highest peak activation"
        + (f"; positions {_positions(result.positions)}" if result.positions else ""),
        "notes": notes(result),
        "rows": [{"label": f"L{layer}.{neuron}", "detail": f"peak {peak:.3f}"} for layer, neuron, peak in top],
        "texts": [{"tokens": list(result.tokens), "values": np.round(values, 5).tolist()}],
        "n_texts": 1,
        "top": None,
    }


def to_html(result: Factors | Activations) -> str:
    data = _activations_data(result) if isinstance(result, Activations) else _factors_data(result)
    return fragment("nmf", data, scripts=("nmf.js",), styles=("nmf.css",), text=to_text(result))


def plot(result: Factors | Activations, k: int = 8) -> Any:
    """A matplotlib ``Figure``: factors (or the ``k`` top neurons) as rows, tokens as columns.

    Factors show the first text (at most ``PLOT_TOKENS`` tokens); the colour is each factor's
    strength (NMF: 0 upwards; PCA/ICA: signed, centred on 0).
    """
    if isinstance(result, Activations):
        top = result.top_neurons(k)
        values = np.array([result.values[result.layers.index(layer), neuron] for layer, neuron, _ in top])
        rows = [f"L{layer}.{neuron}" for layer, neuron, _ in top]
        tokens = result.tokens
        title = f"Top {len(top)} neurons of {result.site}, {_layer_range(result.layers)}"
        signed = bool((values < 0).any())
    else:
        end = result.offsets[1] if len(result.offsets) > 1 else len(result.tokens)
        values = result.components[:, :end]  # [factor, pos] of the first text
        rows = [f"factor {i}" for i in range(result.n_components)]
        tokens = result.tokens[:end]
        title = f"{_title(result)}\n{_subtitle(result)}"
        signed = result.method != "nmf"
    values, tokens = values[:, :PLOT_TOKENS], tokens[:PLOT_TOKENS]
    return heatmap(
        values,
        rows=rows,
        columns=token_labels(tokens),
        title="\n".join([title, *notes(result)]),
        cmap="RdBu_r" if signed else "Purples",
        center=0.0 if signed else None,
        vmin=None if signed else 0.0,
        colorbar="activation" if isinstance(result, Activations) else "factor strength",
        annotate=False,
    )
