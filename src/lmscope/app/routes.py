"""The JSON API's runs and traces: configuration, new runs, Trace files out and in (analyses: ``analyses``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lmscope.app._core import Service, check_upload, json_response, temp_file
from lmscope.app.analyses import ANALYSES, capabilities

__all__ = ["router"]

router = APIRouter(prefix="/api")


def _reply(info: dict[str, Any]) -> Response:
    return json_response({**info, "capabilities": capabilities(info)})


class RunRequest(BaseModel):
    """A text to run: traced once, or extended by ``generate`` tokens and then traced."""

    model_config = ConfigDict(extra="forbid")

    text: str
    model: str | None = Field(None, description="a configured model name (or an allowed path)")
    device: str | None = None
    dtype: str | None = None
    generate: int = Field(0, description="tokens to generate before tracing (0: trace only)")


class OpenRequest(BaseModel):
    """A Trace file on the server to open (only when the config allows paths)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    model: str | None = Field(None, description="attach this model (checked to match), or none")
    device: str | None = None
    dtype: str | None = None


@router.get("/config")
def get_config(app: Service) -> Response:
    """Models, devices, dtypes, sample prompts and limits offered by this app."""
    return json_response({**app.config.public(), "analyses": list(ANALYSES)})


@router.get("/status")
def get_status(app: Service) -> Response:
    """Loaded models and the run cache's size and memory."""
    return json_response(app.status())


@router.post("/runs")
def create_run(body: RunRequest, app: Service) -> Response:
    """Run a text on a model (trace, or generate then trace); the reply describes the cached run."""
    run = app.new_run(app.key(body.model, body.device, body.dtype), body.text, body.generate)
    return _reply(dict(run.info))


@router.get("/runs/{run_id}")
def get_run(run_id: str, app: Service) -> Response:
    return _reply(dict(app.run(run_id).info))


@router.delete("/runs/{run_id}")
def delete_run(run_id: str, app: Service) -> Response:
    app.run(run_id)
    app.runs.remove(run_id)
    return json_response({"deleted": run_id})


@router.get("/runs/{run_id}/trace")
def export_trace(run_id: str, app: Service) -> Response:
    """The run's Trace as one safetensors file (open it again with POST /api/traces or lmscope.load_trace)."""
    run = app.run(run_id)
    path = temp_file()
    try:
        run.trace.save(path)
        data = path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
    headers = {"Content-Disposition": f'attachment; filename="lmscope-{run_id}.safetensors"'}
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.post("/traces")
async def upload_trace(
    request: Request,
    app: Service,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attach: bool = True,
) -> Response:
    """Open a Trace file sent as the raw request body.

    With ``model`` that model is attached (checked to match); otherwise the configured model of the
    trace's own name, unless ``attach=false`` (then only analyses that need no weights work).
    """
    limit = int(app.config.max_upload_mb * 2**20)
    with contextlib.suppress(ValueError):  # refuse an announced oversized body before reading it
        check_upload(max(1, int(request.headers.get("content-length", "1"))), limit)
    data = await request.body()
    check_upload(len(data), limit)
    path = temp_file(data)
    try:
        key = app.key(model, device, dtype) if model else None
        run = await run_in_threadpool(app.add_trace, path, key, attach)
    finally:
        os.unlink(path)
    return _reply(dict(run.info))


@router.post("/traces/open")
def open_trace(body: OpenRequest, app: Service) -> Response:
    """Open a Trace file by path: refused unless paths are allowed and it lies in an allowed directory."""
    path = app.config.path_allowed(body.path)
    key = app.key(body.model, body.device, body.dtype) if body.model else None
    return _reply(dict(app.add_trace(path, key).info))
