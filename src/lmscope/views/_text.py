"""Text helpers shared by every view: visible whitespace and plain tables."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["percent", "table", "visible"]

_WHITESPACE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """A token with its whitespace made visible (``·`` for spaces, ``↵`` for newlines)."""
    if token == "":
        return "∅"
    return "".join(_WHITESPACE.get(ch, ch) for ch in token)


def percent(p: float) -> str:
    """A probability as a percentage; anything below 0.01% prints as ``<0.01%``, never 0."""
    if p != p:  # NaN
        return "nan"
    if p < 1e-4:
        return "<0.01%"
    return f"{100 * p:.2f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned plain-text table."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
