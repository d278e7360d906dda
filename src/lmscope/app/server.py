"""The web app: a thin JSON API over the library, plus the static single-page front end.

``create_app(config)`` builds the FastAPI app. A run (``POST /api/runs``) traces or generates once
and is cached; every analysis is a ``GET`` on that run that calls one ``Output`` method and returns
its result three ways: ``data`` (``result.to_dict()``), ``html`` (the view's self-contained
fragment, the same one notebooks show) and ``text`` (its text twin). Errors are always JSON
``{"detail": "<one clear line>"}``: 400 for bad input (``LmscopeError``), 403 for paths outside the
allowed directories, 404 for unknown runs, 413 for oversized uploads, 422 for malformed requests,
500 for anything unexpected (logged server side; no traceback reaches the client).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from lmscope.app import analyses, routes
from lmscope.app._core import App, json_response
from lmscope.app._guard import RequestGuard
from lmscope.app._jobs import Busy, Cancelled, limit_allocator
from lmscope.app.config import AppConfig, load_config
from lmscope.errors import LmscopeError

__all__ = ["GRACEFUL_SHUTDOWN_S", "create_app"]

log = logging.getLogger("lmscope.app")

GRACEFUL_SHUTDOWN_S = 2
"""Seconds uvicorn waits for open requests on shutdown before cancelling them (and their model work)."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"detail": message}, status, headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
        if item.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})")
        else:
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is malformed"


def _install_errors(api: FastAPI) -> None:
    @api.exception_handler(LmscopeError)
    async def bad_input(request: Request, error: LmscopeError) -> Response:
        return _error(400, str(error))

    @api.exception_handler(PermissionError)
    async def refused(request: Request, error: PermissionError) -> Response:
        return _error(403, str(error))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return _error(error.status_code, str(error.detail))

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @api.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, error: StarletteHTTPException) -> Response:
        detail = "not found" if error.status_code == 404 else str(error.detail)
        return _error(error.status_code, f"{detail}: {request.url.path}" if error.status_code == 404 else detail)

    @api.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> Response:
        return _error(503, str(error), {"Retry-After": str(error.retry_after)})

    @api.exception_handler(Cancelled)
    async def cancelled(request: Request, error: Cancelled) -> Response:
        return _error(503, f"the request was cancelled: {error}", {"Retry-After": "1"})

    @api.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> Response:
        return _error(422, _validation_message(error))

    @api.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("lmscope: unexpected error on %s", request.url.path)
        # The exception's text may name server paths: the client learns its type, the log the rest.
        return _error(500, f"internal error ({type(error).__name__}); the server's log has the details")


def create_app(config: AppConfig | str | Path | None = None) -> FastAPI:
    """The FastAPI app for ``config`` (an :class:`AppConfig`, a config file path, or ``None``: the default)."""
    if not isinstance(config, AppConfig):
        config = load_config(config)
    state = App(config)
    from lmscope.analysis._onednn import keep_kernels

    keep_kernels()  # the model workers are threads: saliency's product kernels must not be removed under them

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        limit_allocator()  # before the model workers start: they then share few malloc arenas
        yield
        state.jobs.close(timeout=GRACEFUL_SHUTDOWN_S)

    api = FastAPI(
        title="lmscope",
        version="1",
        description="See inside Transformer language models.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    api.state.lmscope = state
    api.add_middleware(RequestGuard, allowed_hosts=config.allowed_hosts)
    _install_errors(api)
    static = resources.files("lmscope.app").joinpath("static")
    views = resources.files("lmscope.views").joinpath("static")
    api.mount("/static/app", StaticFiles(directory=str(static)), name="app-static")
    api.mount("/static/views", StaticFiles(directory=str(views)), name="views-static")

    @api.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")), media_type="text/html")

    api.include_router(routes.router)
    api.include_router(analyses.router)
    return api
