"""Views of input saliency (``Saliency``): Ecco's minimal and detailed views, and a text twin.

Minimal: the whole text; hovering (or focusing) an output token colours every token before it by
its attribution. Detailed: the same, with a bar and a percentage under every input token. Signed
methods colour positive attributions warm and negative ones cool. Encoder-decoder results add the
source tokens as a row of their own above the decoder tokens, coloured on the same scale.
"""

from __future__ import annotations

from lmscope.analysis.saliency import Saliency
from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["GRADIENT_NOTE", "note", "to_html", "to_text"]

_TARGETS = {"prob": "probability", "logit": "logit", "contrast": "logit difference"}
GRADIENT_NOTE = (
    "Gradient methods measure sensitivity around the actual input and can under-credit a token the "
    "prediction depends on decisively (' France' for ' Paris'); method='occlusion' measures the effect "
    "of removing each token."
)


def note(result: Saliency) -> str | None:
    """The caveat shown with gradient-based attributions (every method but occlusion)."""
    return None if result.method == "occlusion" else GRADIENT_NOTE


def _value(result: Saliency, value: float) -> str:
    return f"{value:+.3g}" if result.signed else percent(value)


def _target_value(result: Saliency, value: float) -> str:
    return percent(value) if result.target == "prob" else f"{value:.3f}"


def to_text(result: Saliency, k: int = 5) -> str:
    """One row per output token: its target value and its top ``k`` input tokens."""
    head = (
        f"Saliency: {result.method} of each output token's {_TARGETS[result.target]}, "
        f"{len(result.positions)} output token(s)"
    )
    if result.steps is not None and result.completeness_error is not None:
        head += f"; {result.steps} steps, max completeness error {float(result.completeness_error.max()):.2e}"
    rows = []
    tokens = _tokens(result)
    for i, t in enumerate(result.positions):
        output = f"{t} {visible(tokens[t])!r}" + (" (next)" if t == len(result.tokens) else "")
        if result.contrast is not None:
            output += f" vs {visible(result.contrast[i])!r}"
        tops = "  ".join(f"{label} {_value(result, v)}" for label, v in _top(result, i, k))
        rows.append([output, _target_value(result, float(result.values[i])), tops])
    caveat = note(result)
    head += "" if caveat is None else "\n" + caveat
    if _source(result):
        head += "\nEncoder-decoder: inputs are the source tokens (src) and the decoder prefix, normalized together"
    return head + "\n" + table(["output", _TARGETS[result.target], f"top {k} input tokens"], rows)


def _source(result: Saliency) -> tuple[str, ...]:
    """The source tokens of an encoder-decoder result (empty for a decoder-only one)."""
    return tuple(getattr(result, "source_tokens", ()))


def _top(result: Saliency, index: int, k: int) -> list[tuple[str, float]]:
    """The ``k`` largest attributions by magnitude, source tokens (``src``) and decoder prefix together."""
    found = [(repr(visible(result.tokens[s])), v) for s, v in result.top(index, k)]
    if _source(result):
        found += [(f"src {visible(result.source_tokens[s])!r}", v) for s, v in result.top_source(index, k)]
        found.sort(key=lambda item: -abs(item[1]))
    return found[:k]


def _tokens(result: Saliency) -> list[str]:
    """The trace's tokens, then the top prediction after the last one when it is explained."""
    return [*result.tokens, *([] if result.next_token is None else [result.next_token])]


def to_html(result: Saliency) -> str:
    data = {
        "tokens": _tokens(result),
        "n_input": result.n_input,
        "positions": list(result.positions),
        "attributions": [[float(v) for v in row] for row in result.attributions],
        "values": [float(v) for v in result.values],
        "contrast": None if result.contrast is None else list(result.contrast),
        "method": result.method,
        "target": _TARGETS[result.target],
        "signed": result.signed,
        "style": result.style,
        "note": note(result),
    }
    if _source(result):  # encoder-decoder: the source row, coloured on the same scale as the decoder prefix
        data["source_tokens"] = list(result.source_tokens)
        data["source_attributions"] = [[float(v) for v in row] for row in result.source_attributions]
    return fragment("saliency", data, scripts=("saliency.js",), styles=("saliency.css",), text=to_text(result))
