"""Views of attention (``Attention``): BertViz's head view, model view and neuron view.

The page gets, per shown layer and head, the weights of every query row: all of them for small
inputs, else the strongest ``top_k`` keys per query (the cut-off is reported in the view and the
text twin). Weights travel as integers in units of ``1 / SCALE`` of each map's maximum (1 for
probabilities), so a 1,000-token view stays a few megabytes.

An encoder-decoder model's ``EncoderDecoderAttention`` ships one such block per kind of attention
(``parts``); the page offers them in BertViz's "Attention" selector (Encoder, Decoder, Cross).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmscope.analysis.attention import PART_LABELS, Attention, EncoderDecoderAttention, neuron_scores_of, sparsify
from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["to_html", "to_text", "view_data"]

SCALE = 10_000
_KIND = {
    "weights": "Attention weights",
    "rollout": "Attention rollout (Abnar & Zuidema 2020)",
    "value_norm": "Attention × value norm ‖α·f(x)‖ (Kobayashi et al. 2020)",
}
_PART = {
    "encoder": "Encoder self-attention (source tokens)",
    "decoder": "Decoder self-attention (target tokens)",
    "cross": "Cross-attention (rows: target tokens, columns: source tokens)",
}


def _labels(result: Attention) -> list[str]:
    if result.weights.shape[1] == 1:
        return ["all heads"]
    return [f"head {h}" for h in range(result.weights.shape[1])]


def _value(result: Attention, w: float) -> str:
    return f"{w:.3g}" if result.kind == "value_norm" else percent(w)


def view_data(result: Attention | EncoderDecoderAttention) -> dict[str, Any]:
    """The JSON the page's ``attention`` view draws (weights as integers, see the module docstring)."""
    if isinstance(result, EncoderDecoderAttention):
        return {
            "kind": result.kind,
            "view": result.view,
            "model": result.model,
            "source_tokens": list(result.source_tokens),
            "target_tokens": list(result.target_tokens),
            "parts": [view_data(part) for part in result.parts],
        }
    weights = result.weights  # [layer, head, pos_q, pos_k]
    n_layers, n_heads, n, n_keys = weights.shape
    peak = weights.max(axis=(2, 3)) if result.kind == "value_norm" else np.ones((n_layers, n_heads))
    peak = np.where(peak > 0, peak, 1.0)  # [layer, head]
    if result.top_k is None:
        idx, val, k = None, weights.reshape(n_layers, n_heads, n * n_keys), n_keys
        cutoff = kept = None
    else:
        sparse = sparsify(weights, result.top_k)
        idx, val, k = sparse.idx.reshape(n_layers, n_heads, -1), sparse.val.reshape(n_layers, n_heads, -1), sparse.k
        cutoff, kept = sparse.cutoff.tolist(), sparse.kept.tolist()
    ints = np.rint(val / peak[:, :, None] * SCALE).astype(np.int32)
    maps = [
        [
            {"w": ints[li, h].tolist(), "idx": None if idx is None else idx[li, h].tolist(), "max": float(peak[li, h])}
            for h in range(n_heads)
        ]
        for li in range(n_layers)
    ]
    data: dict[str, Any] = {
        "kind": result.kind,
        "view": result.view,
        "model": result.model,
        "tokens": list(result.tokens),
        "key_tokens": None if result.key_tokens is None else list(result.key_tokens),
        "key_n_input": result.key_n_input,
        "part": result.part,
        "part_label": PART_LABELS.get(result.part, ""),
        "layers": list(result.layers),
        "labels": _labels(result),
        "n_heads": result.n_heads,
        "n_kv_heads": result.n_kv_heads,
        "n_input": result.n_input,
        "segment_b": result.segment_b,
        "head": result.head,
        "query": result.query,
        "top_k": result.top_k,
        "k": int(k),
        "scale": SCALE,
        "maps": maps,
        "cutoff": cutoff,
        "kept": kept,
        "neuron": None,
    }
    nd = result.neuron
    if nd is not None:
        data["neuron"] = {
            "q": np.round(nd.q, 6).tolist(),  # [layer][pos][head][d_head]
            "k": np.round(nd.k, 6).tolist(),  # [layer][pos][kv_head][d_head]
            "band": nd.band.tolist(),
            "scaling": list(nd.scaling),
            "softcap": list(nd.softcap),
            "bias": None if nd.bias is None else np.round(nd.bias, 6).tolist(),  # [layer][head][pos_q][pos_k]
        }
    return data


def _strongest(result: Attention) -> str:
    query = result.query
    token = visible(result.tokens[query])
    top = min(3, result.weights.shape[-1])
    rows = []
    labels = _labels(result)
    for li, layer in enumerate(result.layers):
        for h, label in enumerate(labels):
            row = result.weights[li, h, query]  # [pos_k]
            order = np.argsort(-row, kind="stable")[:top]
            rows.append(
                [str(layer), label, *(f"{k} {visible(result.keys[k])} {_value(result, row[k])}" for k in order)]
            )
    header = ["layer", "head", *(f"top {i + 1}" for i in range(top))]
    return f"Strongest keys of query {query} ({token!r}):\n" + table(header, rows)


def _neuron_text(result: Attention) -> str:
    scores = neuron_scores_of(result, result.layers[0], result.head, result.query)
    group = result.n_heads // result.n_kv_heads
    bias = scores.bias is not None
    head = (
        f"Neuron view: layer {scores.layer}, head {scores.head}, query {scores.query} "
        f"({visible(result.tokens[scores.query])!r}), score = (q·k) × {scores.scaling:.4g}"
        + (" + position bias" if bias else "")
    )
    if scores.softcap:
        head += f", soft-capped at {scores.softcap:.4g}"
    if group > 1:
        first = scores.kv_head * group
        head += f"\nkey/value head {scores.kv_head}, shared by heads {first}..{first + group - 1}"
    dots = scores.products.sum(-1) * scores.scaling  # [pos_k]
    rows = [
        [
            str(k),
            visible(result.keys[k]),
            *((f"{dots[k]:.4f}", f"{scores.bias[k]:+.4f}") if bias else ()),
            f"{scores.scores[k]:.4f}",
            percent(float(scores.probs[k])) if scores.visible[k] else "masked",
        ]
        for k in range(len(result.keys))
    ]
    header = ["key", "token", *(("q·k×scale", "bias") if bias else ()), "score", "softmax"]
    return head + "\n" + table(header, rows)


def to_text(result: Attention | EncoderDecoderAttention) -> str:
    if isinstance(result, EncoderDecoderAttention):
        lines = [
            f"{_KIND[result.kind]} of {result.model} (encoder-decoder): {len(result.source_tokens)} source tokens, "
            f"{len(result.target_tokens)} target tokens; {result.view} view of "
            + ", ".join(PART_LABELS[p.part] for p in result.parts)
        ]
        for part in result.parts:
            lines += ["", _PART[part.part] + ":", to_text(part)]
        return "\n".join(lines)
    layers = result.layers
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    heads = f"{result.n_heads} heads" + (
        f" ({result.n_kv_heads} key/value heads)" if result.n_kv_heads < result.n_heads else ""
    )
    if result.key_tokens is None:
        size = f"{len(result.tokens)} tokens"
    else:
        size = f"{len(result.tokens)} query tokens × {len(result.key_tokens)} key tokens"
    part = f" ({_PART[result.part].split(' (')[0].lower()})" if result.part else ""
    lines = [f"{_KIND[result.kind]}{part} of {result.model}: {size}, {span}, {heads}; {result.view} view"]
    if result.segment_b is not None:
        n = len(result.tokens)
        lines.append(f"sentence A: tokens 0..{result.segment_b - 1}, sentence B: tokens {result.segment_b}..{n - 1}")
    if result.top_k is not None and result.top_k < len(result.keys):
        sparse = sparsify(result.weights, result.top_k)
        lines.append(
            f"sparsified for display: the strongest {sparse.k} keys per query; largest weight left out "
            f"{_value(result, float(sparse.cutoff.max()))}, kept {100 * float(sparse.kept.min()):.1f}% "
            "of each head's weight or more"
        )
    lines.append(_neuron_text(result) if result.view == "neuron" else _strongest(result))
    return "\n".join(lines)


def to_html(result: Attention | EncoderDecoderAttention) -> str:
    return fragment(
        "attention",
        view_data(result),
        scripts=("attention.js",),
        styles=("attention.css",),
        text=to_text(result),
    )
