"""The app's core, shared by its routes: configuration, the model and run caches, model work on
worker threads (:mod:`lmscope.app._jobs`), uploads, cost limits and JSON replies."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response

from lmscope._lm import LM, from_pretrained, load_trace
from lmscope._output import Output
from lmscope.app._jobs import Cancelled, Jobs, cancellable
from lmscope.app.config import AppConfig
from lmscope.app.state import ModelCache, ModelKey, Run, RunCache
from lmscope.capture import ALL_SITES, Trace
from lmscope.errors import LmscopeError, TraceFileError

__all__ = [
    "App",
    "Service",
    "check_text",
    "check_upload",
    "describe",
    "file_job",
    "json_response",
    "receive_upload",
    "renamed",
    "temp_file",
]

log = logging.getLogger("lmscope.app")
T = TypeVar("T")
POLL_S = 0.25  # how often a waiting request checks that its client is still there


def file_job() -> Hashable:
    """A job key of its own, for work on a file without a model (reading or writing a trace)."""
    return ("file", object())


class App:
    """The app's state and the helpers every route uses (``request.app.state.lmscope``)."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.models = ModelCache(config.model_cache_size, self._load)
        self.runs = RunCache(config.run_cache_size, int(config.run_cache_mb * 2**20))
        self.trace_dir: Path | None = None  # where runs over max_trace_mb are stored (made when first needed)
        self.jobs = Jobs(config.workers, config.queue_size, config.queue_size * (config.model_cache_size + 2))

    def _load(self, key: ModelKey) -> LM:
        entry = self.config.models.get(key.model)
        source = entry.source if entry is not None else str(self.config.path_allowed(key.model))
        shown = repr(key.model) if entry is not None else repr(source)
        try:
            # trust_remote_code stays off: the app never runs code shipped with a model.
            return from_pretrained(source, device=key.device, dtype=key.dtype, max_tokens=self.config.max_input_tokens)
        except LmscopeError as error:  # a configured source may be a server path: name the model instead
            message = str(error).splitlines()[0]
            raise LmscopeError(message.replace(source, shown) if os.path.isabs(source) else message) from None
        except Exception as error:
            log.warning("lmscope: could not load %s: %s", source, error)
            raise LmscopeError(
                f"model {shown} could not be loaded ({type(error).__name__}); the server's log has the details"
            ) from None

    def key(self, model: str | None, device: str | None, dtype: str | None) -> ModelKey:
        """A checked model key; unknown names, devices and dtypes are refused with the choices.

        A model given by path is keyed by its resolved path, so ``m``, ``m/`` and ``./x/../m`` are one model."""
        config = self.config
        model = check_text(model, "model name") or config.default_model
        device, dtype = check_text(device, "device"), check_text(dtype, "dtype")
        if model not in config.models:
            if not config.allow_paths or not any(ch in model for ch in "/\\.~"):
                shown = repr(model) if len(model) <= 80 else repr(model[:60]) + "…"
                raise LmscopeError(f"unknown model {shown}: choose one of {', '.join(config.models)}")
            model = str(config.path_allowed(model))  # PermissionError (403) outside the allowed dirs
        device = device or config.devices[0]
        if device not in config.devices:
            raise LmscopeError(f"device {device!r} is not available here: choose one of {', '.join(config.devices)}")
        dtype = dtype or config.dtypes[0]
        if dtype not in config.dtypes:
            raise LmscopeError(f"dtype {dtype!r} is not offered: choose one of {', '.join(config.dtypes)}")
        return ModelKey(model, device, dtype)

    def preload(self) -> None:
        """Load the default model on the first device and dtype (errors show up again on the first run)."""
        try:
            with self.models.using(self.key(None, None, None)):
                pass
        except Exception as error:
            log.warning("lmscope: could not preload %s: %s", self.config.default_model, error)

    async def work(self, request: Request, key: Hashable, work: Callable[[threading.Event], T]) -> T:
        """``work(cancel)`` on a model worker, queued under ``key`` (:class:`~lmscope.app._jobs.Busy`
        when the queue is full); cancelled when the client goes away or this request is cancelled."""
        job = self.jobs.submit(key, work)
        waiting = asyncio.wrap_future(job.future)
        waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, even if late
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
                if done:
                    return waiting.result()
                if await request.is_disconnected():
                    raise Cancelled("the client went away")
        finally:
            if not job.future.done():
                self.jobs.cancel(job)

    def check_cost(self, cost: int, how: str) -> None:
        """Refuse a request whose ``cost`` (see the config's ``max_cost``) is over the limit, before it runs."""
        if cost > self.config.max_cost:
            raise LmscopeError(
                f"this request would cost {cost:,} ({how}), more than this app's max_cost of "
                f"{self.config.max_cost:,}: ask for less (fewer steps, positions or tokens)"
            )

    def run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise HTTPException(
                404, f"unknown run {run_id!r}: it expired from the cache or never existed; run the text again"
            )
        return run

    def check_run(self, text: str, generate: int, target: str | None = None) -> None:
        """Refuse a text, target or generation length out of bounds (before any model work)."""
        limit = self.config.max_input_tokens
        check_text(text, "text")
        if target is not None:
            check_text(target, "target")
            if len(target) > 32 * limit:
                raise LmscopeError(
                    f"the target is {len(target)} characters, far beyond the limit of {limit} tokens: shorten it"
                )
        if not isinstance(text, str) or not text.strip():
            raise LmscopeError("the text is empty: type or pick a prompt to run")
        if len(text) > 32 * limit:  # refuse before tokenizing megabytes
            raise LmscopeError(
                f"the text is {len(text)} characters, far beyond the limit of {limit} tokens: shorten it"
            )
        if not 0 <= generate <= self.config.max_generate:
            raise LmscopeError(f"generate must be between 0 and {self.config.max_generate}, not {generate}")

    def new_run(
        self,
        key: ModelKey,
        text: str,
        generate: int,
        cancel: threading.Event | None = None,
        target: str | None = None,
    ) -> Run:
        """Trace (or generate, then trace) ``text`` on the model under ``key``; cache and describe the run.

        Encoder-decoder models: ``text`` is the source; a ``target`` is teacher-forced (and continued by
        ``generate`` tokens); without one the decoder generates ``generate`` tokens (at least one)."""
        self.check_run(text, generate, target)
        target = target if target and target.strip() else None  # the page's empty target field: generate
        sites = self.config.sites or ALL_SITES
        with self.models.using(key) as lm, cancellable(lm, cancel):
            store = self._store(lm, text, generate, sites)
            if lm.is_seq2seq:
                if target is not None and not generate:
                    out = lm.trace(text, target=target, sites=sites)
                else:
                    out = lm.generate(text, max(generate, 1), target=target, sites=sites)
            elif target is not None:
                raise LmscopeError(f"{key.model} is not an encoder-decoder model, so it takes no target")
            else:
                out = (lm.generate(text, generate, sites=sites, store=store) if generate else
                       lm.trace(text, sites=sites, store=store))  # fmt: skip
            info = describe(out, lm)
        return self.runs.add(out.trace, key, info)

    def _store(self, lm: Any, text: str, generate: int, sites: Any) -> Path | None:
        """The folder a run's trace is written to under ``max_trace_mb`` (None: in memory)."""
        if self.config.max_trace_mb is None or lm.is_seq2seq:
            return None
        from lmscope.capture._store import memory_or_disk

        if self.trace_dir is None:
            self.trace_dir = self.config.trace_dir
            if self.trace_dir is None:
                import atexit
                import shutil

                self.trace_dir = Path(tempfile.mkdtemp(prefix="lmscope-app-traces-"))
                atexit.register(shutil.rmtree, self.trace_dir, True)
            self.runs.store_dir = self.trace_dir
        limit = int(self.config.max_trace_mb * 2**20)
        return memory_or_disk(lm, len(lm.encode(text)) + generate, sites, None, limit, self.trace_dir)[0]

    def read_trace(self, path: Path, key: ModelKey | None, attach: bool) -> tuple[Trace, ModelKey | None]:
        """A saved Trace (checked on reading) and the model to attach: ``key`` (checked to match later),
        else the configured model of the trace's own name when ``attach``, else none."""
        trace = load_trace(path).trace
        limit = self.config.max_input_tokens + self.config.max_generate
        if trace.n_pos > limit:
            raise LmscopeError(f"the trace has {trace.n_pos} tokens, more than this app's limit of {limit}")
        model = trace.model
        if key is None and attach and model.name in self.config.models:
            key = self.key(model.name, None, model.dtype if model.dtype in self.config.dtypes else None)
        return trace, key

    def attach(self, trace: Trace, key: ModelKey | None, cancel: threading.Event | None = None) -> Run:
        """Cache ``trace`` as a run, with the model under ``key`` attached (checked to match) or none."""
        if key is None:
            return self.runs.add(trace, None, describe(Output(trace), None))
        with self.models.using(key) as lm, cancellable(lm, cancel):
            out = lm.attach(trace, where="this trace file")
            info = describe(out, lm)
        return self.runs.add(out.trace, key, info)

    def add_trace(self, path: Path, key: ModelKey | None = None, attach: bool = True) -> Run:
        """Open a saved Trace and cache it as a run (see :meth:`read_trace` for the model attached)."""
        return self.attach(*self.read_trace(path, key, attach))

    def analyze(self, run: str | Run, method: Callable[[Output], T], cancel: threading.Event | None = None) -> T:
        """Call ``method`` on the run's Output, holding its model's lock (re-attached from the model cache)."""
        run = self.run(run) if isinstance(run, str) else run
        if run.key is None:
            result = method(Output(run.trace))
        else:
            with self.models.using(run.key) as lm, cancellable(lm, cancel):
                result = method(Output(run.trace, lm))
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        return result

    def status(self) -> dict[str, Any]:
        return {
            "models": [vars(k) for k in self.models.loaded()],
            "model_cache_size": self.models.size,
            "model_locks": self.models.locks(),
            "runs": self.runs.stats(),
            "jobs": self.jobs.stats(),
        }


def describe(out: Output, lm: LM | None) -> dict[str, Any]:
    """What the front end needs to know about a run: tokens, model, and which analyses it supports."""
    trace = out.trace
    encoder = getattr(trace, "encoder", None)
    head = lm is not None and lm.arch.lm_head is not None
    info: dict[str, Any] = {
        "model": trace.model.name,
        "tokens": list(trace.tokens),
        "token_ids": trace.token_ids.tolist(),
        # encoder-decoder models: the encoder's source tokens (``tokens`` are the decoder's target tokens)
        "source_tokens": None if getattr(trace, "encoder", None) is None else list(trace.encoder.tokens),
        "n_input": trace.n_input,
        "layers": list(trace.layers),
        "n_layers": trace.model.n_layers,
        "n_heads": trace.model.n_heads,
        "sites": list(trace.sites),
        "nbytes": trace.nbytes(),
        "has_model": lm is not None,
        "lm_head": head,
        "post_norm": trace.model.post_norm,
        # A causal LM explains the token after a state (the page names predictions by it); the input text.
        "causal": None if lm is None else bool(lm.model.can_generate()),
        "text": _text(trace, lm),
        "seq2seq": encoder is not None,
        # encoder-decoder models: the target given (teacher-forced), without the decoder's start token
        "target": None if encoder is None else _decoded(trace.token_ids[1 : trace.n_input].tolist(), trace, lm),
    }
    if head and "logits" in trace.tensors:
        probs = trace.logits.float().softmax(-1).max(-1)  # best next token per position
        strings = lm.unembed.token_strings(probs.indices.tolist())
        info["predictions"] = [{"token": t, "prob": float(p)} for t, p in zip(strings, probs.values, strict=True)]
    return info


def _decoded(ids: list[int], trace: Trace, lm: LM | None) -> str:
    """Token ids as text: decoded by the model's tokenizer, else the trace's token strings joined."""
    if lm is not None:
        return lm.tokenizer.decode(ids, skip_special_tokens=True)
    strings = dict(zip(trace.token_ids.tolist(), trace.tokens, strict=True))
    return "".join(strings.get(i, "") for i in ids)


def _text(trace: Trace, lm: LM | None) -> str:
    """The run's input text: the source of an encoder-decoder model, else the tokens given."""
    encoder = getattr(trace, "encoder", None)
    if encoder is not None:
        return _decoded(encoder.token_ids.tolist(), encoder, lm)
    return _decoded(trace.token_ids[: trace.n_input].tolist(), trace, lm)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON without FastAPI's generic encoder (results are already plain Python; large ones stay fast)."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        data = body.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (echoed from the request): JSON escapes carry it
        data = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("ascii")
    return Response(data, status_code=status, media_type="application/json", headers=headers)


def check_text(value: str | None, what: str) -> str | None:
    """``value``, if it can be encoded as UTF-8 (JSON may carry lone surrogates, which cannot)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise LmscopeError(
                f"the {what} holds a lone surrogate (U+{ord(value[error.start]):04X}) at character {error.start}, "
                "which is not a Unicode character: fix the text's encoding"
            ) from None
    return value


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.3g} MB"


def check_upload(size: int, max_bytes: int) -> None:
    """Refuse an upload of ``size`` bytes over the limit (413) or empty (400)."""
    if size > max_bytes:
        raise HTTPException(
            413, f"the trace file is {_megabytes(size)}, more than this app's limit of {_megabytes(max_bytes)}"
        )
    if size == 0:
        raise LmscopeError("the upload is empty: choose a trace file saved by lmscope")


async def receive_upload(request: Request, max_bytes: int) -> Path:
    """The request body in a temporary file, counted as it arrives: a body over ``max_bytes`` (announced
    or chunked) is refused (413) as soon as it passes the limit, so memory and disk stay bounded."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit():
        check_upload(max(1, int(announced)), max_bytes)
    path, size = temp_file(), 0
    try:
        with path.open("wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, f"the trace file is more than this app's limit of {_megabytes(max_bytes)}")
                handle.write(chunk)
        check_upload(size, max_bytes)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def renamed(error: Exception, path: Path, shown: str) -> Exception:
    """``error`` with the server's (temporary) ``path`` replaced by ``shown``, the user's name for it."""
    if isinstance(error, TraceFileError):
        return LmscopeError(f"{shown} {error.problem}")
    if isinstance(error, LmscopeError | PermissionError):
        message = str(error)
        message = message.replace(str(path) if str(path) in message else path.name, shown)
        return PermissionError(message) if isinstance(error, PermissionError) else LmscopeError(message)
    return error


def temp_file(data: bytes = b"") -> Path:
    """A temporary ``.safetensors`` file holding ``data`` (the caller deletes it)."""
    handle, name = tempfile.mkstemp(prefix="lmscope-", suffix=".safetensors")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    return Path(name)


def _app(request: Request) -> App:
    return request.app.state.lmscope


Service = Annotated[App, Depends(_app)]
