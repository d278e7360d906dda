"""The JSON API's runs and traces: configuration, new runs, Trace files out and in (analyses: ``analyses``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from lmscope.app._core import Service, file_job, json_response, receive_upload, renamed, temp_file
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
    target: str | None = Field(
        None, description="encoder-decoder models: the target to teacher-force (none or empty: generate)"
    )


class OpenRequest(BaseModel):
    """A Trace file on the server to open (only when the config allows paths)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    model: str | None = Field(None, description="attach this model (checked to match), or none")
    device: str | None = None
    dtype: str | None = None


@router.get("/config")
async def get_config(app: Service) -> Response:
    """Models, devices, dtypes, sample prompts and limits offered by this app."""
    return json_response({**app.config.public(), "analyses": list(ANALYSES)})


@router.get("/status")
async def get_status(app: Service) -> Response:
    """Loaded models, the run cache's size and memory, and the model workers' queues."""
    return json_response(app.status())


@router.post("/runs")
async def create_run(body: RunRequest, request: Request, app: Service) -> Response:
    """Run a text on a model (trace, or generate then trace); the reply describes the cached run."""
    key = app.key(body.model, body.device, body.dtype)
    app.check_run(body.text, body.generate, body.target)
    run = await app.work(request, key, lambda cancel: app.new_run(key, body.text, body.generate, cancel, body.target))
    return _reply(dict(run.info))


@router.get("/runs/{run_id}")
async def get_run(run_id: str, app: Service) -> Response:
    return _reply(dict(app.run(run_id).info))


@router.delete("/runs/{run_id}")
async def delete_run(run_id: str, app: Service) -> Response:
    app.run(run_id)
    app.runs.remove(run_id)
    return json_response({"deleted": run_id})


def _saved(trace: Any, run_id: str) -> Response:
    path = temp_file()
    try:
        trace.save(path)
        data = path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
    headers = {"Content-Disposition": f'attachment; filename="lmscope-{run_id}.safetensors"'}
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.get("/runs/{run_id}/trace")
async def export_trace(run_id: str, request: Request, app: Service) -> Response:
    """The run's Trace as one safetensors file (open it again with POST /api/traces or lmscope.load_trace)."""
    trace = app.run(run_id).trace
    return await app.work(request, file_job(), lambda cancel: _saved(trace, run_id))


@router.post("/traces")
async def upload_trace(
    request: Request,
    app: Service,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attach: bool = True,
    name: Annotated[str | None, Query(description="the file's name, for messages")] = None,
) -> Response:
    """Open a Trace file sent as the raw request body (``Content-Type: application/octet-stream``).

    With ``model`` that model is attached (checked to match); otherwise the configured model of the
    trace's own name, unless ``attach=false`` (then only analyses that need no weights work).
    """
    key = app.key(model, device, dtype) if model else None
    path = await receive_upload(request, int(app.config.max_upload_mb * 2**20))
    try:
        trace, key = await app.work(request, file_job(), lambda cancel: app.read_trace(path, key, attach))
        run = await app.work(request, key, lambda cancel: app.attach(trace, key, cancel))
    except Exception as error:
        raise renamed(error, path, repr(name[:120]) if name else "the uploaded file") from None
    finally:
        path.unlink(missing_ok=True)
    return _reply(dict(run.info))


@router.post("/traces/open")
async def open_trace(body: OpenRequest, request: Request, app: Service) -> Response:
    """Open a Trace file by path: refused unless paths are allowed and it lies in an allowed directory."""
    path = app.config.path_allowed(body.path)
    key = app.key(body.model, body.device, body.dtype) if body.model else None
    try:
        trace, key = await app.work(request, file_job(), lambda cancel: app.read_trace(path, key, True))
        run = await app.work(request, key, lambda cancel: app.attach(trace, key, cancel))
    except Exception as error:
        raise renamed(error, path, repr(body.path)) from None
    return _reply(dict(run.info))
