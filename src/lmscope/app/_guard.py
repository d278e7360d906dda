"""Requests the app refuses before any route sees them: foreign ``Host`` names and cross-site writes.

A page on another site cannot read the app's answers (browsers keep responses same-origin), but it
can still *send* requests to ``127.0.0.1``. Two tricks remain, and both are closed here:

* **DNS rebinding**: a name the attacker controls is made to resolve to ``127.0.0.1``, so the
  attacker's page becomes "same-origin" with the app. Its requests still carry the attacker's name
  in ``Host``: only loopback names, the address the connection arrived on (what the server listens
  on) and the config's ``allowed_hosts`` are accepted, each with the listening port (421 otherwise).
* **Cross-site writes**: a form or a ``text/plain`` fetch is sent without a CORS preflight. Every
  ``POST`` must carry ``application/json`` or (a trace file) ``application/octet-stream``, which a
  cross-site page cannot send without a preflight the app never grants (415 otherwise), and any
  ``Origin`` a browser sends with a write must be the app's own (403 otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["RequestGuard"]

Scope = dict[str, Any]
ASGI = Callable[[Scope, Any, Any], Awaitable[None]]

LOOPBACK = ("localhost", "127.0.0.1", "::1")
BODY_TYPES = ("application/json", "application/octet-stream")
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(hostname, port)`` of a ``Host`` header value (``None`` if it is not one)."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return None


class RequestGuard:
    """ASGI middleware refusing foreign ``Host`` headers and cross-site or form-encoded writes."""

    def __init__(self, app: ASGI, allowed_hosts: Iterable[str] = ()):
        self.app = app
        self.names = {*LOOPBACK, *(h.lower() for h in allowed_hosts)}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, message = problem
        body = json.dumps({"detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def problem(self, scope: Scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        server_host, server_port = (scope.get("server") or (None, None))[:2]
        default_port = 443 if scope.get("scheme") == "https" else 80
        host = _split_host(headers.get("host", ""))
        names = self.names | ({str(server_host).lower()} if server_host else set())
        if (
            host is None
            or host[0].lower().strip("[]") not in names
            or (server_port is not None and (host[1] or default_port) != server_port)
        ):
            shown = headers.get("host", "")[:80]
            return 421, (
                f"this server does not answer for the host {shown!r}: use http://127.0.0.1 or http://localhost "
                "with its port (other names must be listed in the config's allowed_hosts)"
            )
        if scope.get("method") not in WRITES:
            return None
        origin = headers.get("origin")
        if origin is not None and origin != "null" and urlsplit(origin).netloc.lower() != headers["host"].lower():
            return 403, "cross-origin requests may not change anything here: use the app's own page"
        if origin == "null" or headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-origin requests may not change anything here: use the app's own page"
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope.get("method") != "DELETE" and kind not in BODY_TYPES:
            return 415, (
                f"send JSON (Content-Type: application/json) or a trace file (application/octet-stream), "
                f"not {kind or 'no content type'}"
            )
        return None
