"""Which prediction a ``position`` names: Ecco's meaning, shared by every method that explains one.

In Ecco (Alammar 2021), ``layer_predictions(position=p)`` and ``rankings_watch(..., position=p)``
name the token being explained, the token at ``p``; a causal LM predicts it from the residual
state at ``p − 1``. So ``position=5`` on "The keys to the cabinet" (5 tokens, 0..4) is the token
after " cabinet", read from the state of " cabinet" at 4. The prediction after the last token has
its own spelling, ``"next"``; ``len(tokens)`` and ``-1`` (Ecco's ``rankings_watch`` default) name
it too. Other negative positions count tokens from the end, as in Python: ``-2`` is the token
before the last one, read from the state before it. Position 0 names the first token, which no
state predicts.

A masked LM predicts each token from its own state, so there ``position=p`` reads the state at
``p`` and there is no ``"next"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscope.capture import Trace
from lmscope.errors import LmscopeError

__all__ = ["NEXT", "Position", "Prediction", "position_of_state", "prediction"]

NEXT = "next"
Position = int | str  # a token index (Ecco's meaning) or "next"


@dataclass(frozen=True)
class Prediction:
    """One explained prediction: the token it is of, and the residual state it is read from."""

    token: int | None  # the explained token's position; None: the prediction after the last token
    state: int  # the residual position the prediction is read from


def prediction(trace: Trace, position: Position, causal: bool = True) -> Prediction:
    """The prediction ``position`` names (see the module docstring), checked against ``trace``."""
    n = trace.n_pos
    if isinstance(position, str):
        if position.strip().lower() != NEXT:
            raise LmscopeError(f"position {position!r} is not a token index or 'next'")
        if not causal:
            raise LmscopeError("a masked LM predicts each token where it stands: there is no 'next' position")
        return Prediction(None, n - 1)
    if isinstance(position, bool) or not isinstance(position, int):
        raise LmscopeError(f"position must be a token index or 'next', not {position!r}")
    if not causal:
        if not -n <= position < n:
            raise LmscopeError(f"position {position} is out of range for {n} tokens (use 0..{n - 1} or -1)")
        return Prediction(position % n, position % n)
    if position in (-1, n):
        return Prediction(None, n - 1)
    token = position + n if position < 0 else position
    if token == 0:
        raise LmscopeError(
            f"position {position} is the first token, which no state predicts: name the token being explained "
            f"(1..{n - 1}), or 'next' (also {n} or -1) for the prediction after the last token"
        )
    if not 0 < token < n:
        raise LmscopeError(
            f"position {position} is out of range for {n} tokens: name the token being explained (1..{n - 1}), "
            f"or 'next' (also {n} or -1) for the prediction after the last token"
        )
    return Prediction(token, token - 1)


def position_of_state(trace: Trace, state: int, causal: bool = True) -> int:
    """The ``position`` of the prediction read from the residual state at ``state`` (negative counts back).

    ``state + 1`` in a causal LM (``len(tokens)`` for the last state: the next token), ``state`` itself
    in a masked LM. For callers that pick a state, such as a token clicked in the app.
    """
    return trace.position(state) + 1 if causal else trace.position(state)
