"""The one sentence every view uses to say which prediction it explains and where it is read."""

from __future__ import annotations

from collections.abc import Sequence

from lmscope.views._text import visible

__all__ = ["describe"]


def describe(token: int | None, state: int, tokens: Sequence[str]) -> str:
    """``prediction of '·are' at 5, read from the state at 4 ('·cabinet')``, or, for ``token=None``,
    ``prediction after the last token, read from the state at 4 ('·cabinet')``."""
    read = f"read from the state at {state} ({visible(tokens[state])!r})"
    if token is None:
        return f"prediction after the last token, {read}"
    if token == state:  # a masked LM
        return f"prediction of {visible(tokens[token])!r} at {token}, read from its own state"
    return f"prediction of {visible(tokens[token])!r} at {token}, {read}"
