"""Choosing token positions for corpus-level analyses, and noticing one position that dominates.

Many causal LMs (SmolLM2, Llama, GPT-2, ...) park huge activations on the first token, the
*attention sink* (Xiao et al. 2024, "Efficient streaming language models with attention sinks";
Sun et al. 2024, "Massive activations in large language models"). In a matrix with one row per
position, that row alone can hold most of the squared norm, so CKA, PCA and NMF mostly describe
that one token: layer similarity reads ≈ 1 for every layer pair that shares the sink.

``positions`` (ints, negative from the end, or a slice) chooses positions *within each text*
(a Trace is one text; a Collection applies it to every text); ``skip_first=True`` is
``positions=slice(1, None)``. :func:`dominance` measures the largest share of the total squared
norm held by one position, ``max_p Σ_{i at p} ‖x_i‖² / Σ_i ‖x_i‖²`` (rows at the same position of
different texts counted together); above :data:`DOMINANT_SHARE` the views say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError

__all__ = [
    "DOMINANT_SHARE",
    "Dominance",
    "describe_selection",
    "dominance",
    "dominance_note",
    "found",
    "select_rows",
    "text_of",
    "within_text",
]

DOMINANT_SHARE = 0.5  # one position holding more than this share of the squared norm dominates


@dataclass(frozen=True)
class Dominance:
    """The position holding the largest share of a matrix's total squared norm (rows are positions).

    ``pos`` is a position within each text (a Trace is one text). In a corpus, the rows at that
    position in every text are counted together (50 first tokens are one attention sink, not 50
    small ones), unless one token holds nearly all of it: then ``text`` names its text.
    ``token`` is the token there (in the first text when ``text`` is None); ``where`` says what
    was measured.
    """

    pos: int
    token: str
    share: float
    where: str
    n_texts: int = 1
    text: int | None = None

    @property
    def dominates(self) -> bool:
        return self.share > DOMINANT_SHARE


def within_text(lengths: Sequence[int]) -> np.ndarray:
    """``[row]``: each row's position within its text, for texts of ``lengths`` tokens concatenated."""
    return np.concatenate([np.arange(int(n)) for n in lengths]) if len(lengths) else np.zeros(0, np.int64)


def text_of(lengths: Sequence[int]) -> np.ndarray:
    """``[row]``: each row's text, for texts of ``lengths`` tokens concatenated."""
    return np.repeat(np.arange(len(lengths)), np.asarray(lengths, dtype=np.int64))


def dominance(matrix: np.ndarray, centered: bool, groups: np.ndarray | None = None) -> tuple[int, float, int | None]:
    """``(position, share, row)``: the position with the largest share of ``Σ_i ‖x_i‖²`` in ``matrix [row, features]``.

    ``groups [row]`` gives each row's position within its text (``None``: the row number); rows at
    the same position are summed, unless one row holds 90% of its position's total: then ``row``
    is that row (else ``None``) and the share is its own. ``centered`` measures the rows after
    subtracting the column means (what CKA, CCA and PCA see); otherwise the raw rows (NMF's
    squared error, activations).
    """
    x = np.asarray(matrix, dtype=np.float64)
    if centered:
        x = x - x.mean(axis=0, keepdims=True)
    energy = np.einsum("ij,ij->i", x, x)  # [row]
    total = float(energy.sum())
    if total <= 0 or not len(energy):
        return 0, 0.0, None
    if groups is None:
        row = int(energy.argmax())
        return row, float(energy[row] / total), row
    grouped = np.bincount(groups, weights=energy)  # [position within text]
    top = int(grouped.argmax())
    members = np.flatnonzero(groups == top)
    row = int(members[energy[members].argmax()])
    if energy[row] >= 0.9 * grouped[top]:
        return top, float(energy[row] / total), row
    return top, float(grouped[top] / total), None


def select_rows(
    lengths: Sequence[int], positions: Any = None, skip_first: bool = False
) -> tuple[np.ndarray | None, str]:
    """Rows of the concatenated token axis to keep (``None``: all), and a description of the choice.

    ``lengths`` are the texts' token counts; ``positions`` applies within each text.
    """
    if skip_first:
        if positions is not None:
            raise LmscopeError("give either skip_first=True or positions=..., not both")
        positions = slice(1, None)
    if positions is None:
        return None, "all positions"
    rows = []
    start = 0
    for length in lengths:
        rows.append(start + np.asarray(_within(int(length), positions), dtype=np.int64))
        start += int(length)
    kept = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if kept.size == 0:
        raise LmscopeError(f"positions={_spelling(positions)} keeps no token: the texts have {list(lengths)} tokens")
    return kept, describe_selection(positions, len(lengths))


def _within(length: int, positions: Any) -> list[int]:
    """Positions ``0..length-1`` chosen by ``positions`` (a slice, an int or ints; negatives from the end)."""
    if isinstance(positions, slice):
        return list(range(length)[positions])
    if isinstance(positions, (int, np.integer)):
        positions = [positions]
    try:
        chosen = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise LmscopeError(f"positions must be ints or a slice, not {positions!r}") from None
    out = []
    for p in chosen:
        if not -length <= p < length:
            continue  # a text shorter than the position contributes nothing there
        out.append(p % length)
    return sorted(set(out))


def _spelling(positions: Any) -> str:
    if isinstance(positions, slice):
        parts = ["" if v is None else str(v) for v in (positions.start, positions.stop)]
        return ":".join(parts) + (f":{positions.step}" if positions.step not in (None, 1) else "")
    return repr(positions)


def describe_selection(positions: Any, n_texts: int = 1) -> str:
    """``"positions 1: of each text"`` and the like (``"first token skipped"`` for ``slice(1, None)``)."""
    each = " of each text" if n_texts > 1 else ""
    if isinstance(positions, slice) and positions.start == 1 and positions.stop is None and positions.step in (None, 1):
        return f"first token{each} skipped"
    return f"positions {_spelling(positions)}{each}"


def found(
    measured: tuple[int, float, int | None],
    origin: np.ndarray,
    tokens: Sequence[str],
    lengths: Sequence[int],
    where: str,
    layers_over: int = 0,
    n_layers: int = 1,
) -> Dominance:
    """A :class:`Dominance` from :func:`dominance`'s ``(position, share, row)``.

    ``origin [row]`` maps the measured matrix's rows to ``tokens`` (every text's, concatenated);
    ``layers_over`` of ``n_layers`` layers had one position over half of the norm.
    """
    pos, share, row = measured
    if layers_over > 1:
        where += f" (over half of it at {layers_over} of {n_layers} layers)"
    n_texts = len(lengths)
    if row is not None:  # one token
        index = int(origin[row])
        text = int(text_of(lengths)[index])
        return Dominance(pos, tokens[index], share, where, n_texts, text if n_texts > 1 else None)
    token = tokens[pos] if pos < lengths[0] else ""  # the first text's token at this position
    return Dominance(pos, token, share, where, n_texts, None)


def dominance_note(found: Dominance | None, shown: str) -> str | None:
    """One line for the views when one position dominates, else ``None`` (``shown``: the token as displayed)."""
    if found is None or not found.dominates:
        return None
    if found.n_texts == 1:
        which = f"position {found.pos} ({shown!r})"
    elif found.text is not None:
        which = f"position {found.pos} of text {found.text} ({shown!r})"
    else:
        which = f"position {found.pos} of each text (e.g. {shown!r})"
    first = found.pos == 0 and (found.text is None or found.n_texts == 1)
    fix = "skip_first=True (or positions=...) leaves it out" if first else "positions=... can leave it out"
    return (
        f"{which} holds {found.share:.0%} of the squared norm of {found.where}: "
        f"the result mostly describes that one token (often an attention sink); {fix}"
    )
