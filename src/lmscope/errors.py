"""The one exception lmscope raises for problems a user can fix."""

from __future__ import annotations

__all__ = ["LmscopeError"]


class LmscopeError(ValueError):
    """Bad input or an unusable model, file or setting.

    The message names the problem and what to do about it, in one line, so the command line and
    the web app can show it as it is.
    """
