"""The factor explorer (Ecco's Figure 9) for ``Factors``, and top neurons for ``Activations``.

One row per factor (or neuron) with a sparkline of its strength over the tokens of the selected
text; hovering a row highlights every token by that factor's strength, otherwise each token takes
the color of its strongest factor. Below, the top tokens of every factor across all texts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmscope.analysis.neurons import Activations, Factors
from lmscope.views._html import fragment
from lmscope.views._text import table, visible

__all__ = ["to_html", "to_text"]

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
    return "; ".join(parts)


def _to_text_activations(result: Activations) -> str:
    layers, neurons, n_pos = result.values.shape
    shape = f"[layer, neuron, pos] = [{layers}, {neurons}, {n_pos}]"
    head = f"{result.site} activations {shape}, {_layer_range(result.layers)}"
    rows = []
    for layer, neuron, peak in result.top_neurons(10):
        pos = int(result.values[result.layers.index(layer), neuron].argmax())
        rows.append([str(layer), str(neuron), f"{peak:.3f}", f"{pos} {visible(result.tokens[pos])!r}"])
    return head + "\n" + table(["layer", "neuron", "peak", "at token"], rows)


def to_text(result: Factors | Activations) -> str:
    if isinstance(result, Activations):
        return _to_text_activations(result)
    rows = []
    for factor, top in enumerate(result.top_tokens(6)):
        tokens = ", ".join(f"{visible(token)!r} {value:.2f}" for _, token, value in top)
        neurons = ", ".join(f"L{layer}.{neuron}" for layer, neuron, _ in result.neurons(factor, 3))
        rows.append([str(factor), tokens, neurons])
    return f"{_title(result)}\n{_subtitle(result)}\n" + table(["factor", "top tokens", "top neurons"], rows)


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
        "subtitle": "rows are the neurons with the highest peak activation",
        "rows": [{"label": f"L{layer}.{neuron}", "detail": f"peak {peak:.3f}"} for layer, neuron, peak in top],
        "texts": [{"tokens": list(result.tokens), "values": np.round(values, 5).tolist()}],
        "n_texts": 1,
        "top": None,
    }


def to_html(result: Factors | Activations) -> str:
    data = _activations_data(result) if isinstance(result, Activations) else _factors_data(result)
    return fragment("nmf", data, scripts=("nmf.js",), styles=("nmf.css",), text=to_text(result))
