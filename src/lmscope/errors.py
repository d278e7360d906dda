"""The exceptions lmscope raises for problems a user can fix."""

from __future__ import annotations

__all__ = ["LmscopeError", "TraceFileError"]


class LmscopeError(ValueError):
    """Bad input or an unusable model, file or setting.

    The message names the problem and what to do about it, in one line, so the command line and
    the web app can show it as it is.
    """


class TraceFileError(LmscopeError):
    """A Trace file that cannot be read: missing, unreadable, forged, inconsistent or damaged.

    The message is the file's path followed by ``problem`` (``"... is damaged: ..."``); a server
    that must not show its temporary paths can show ``problem`` after words of its own.
    """

    def __init__(self, message: str, *, path: object = None, problem: str | None = None):
        super().__init__(message)
        self.path = path
        self.problem = message if problem is None else problem
