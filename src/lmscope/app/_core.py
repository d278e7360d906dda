"""The app's core, shared by its routes: configuration, the model and run caches, and JSON replies."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response

from lmscope._lm import LM, from_pretrained, load_trace
from lmscope._output import Output
from lmscope.app.config import AppConfig
from lmscope.app.state import ModelCache, ModelKey, Run, RunCache
from lmscope.capture import ALL_SITES
from lmscope.errors import LmscopeError

__all__ = ["App", "Service", "check_upload", "describe", "json_response", "temp_file"]

log = logging.getLogger("lmscope.app")


class App:
    """The app's state and the helpers every route uses (``request.app.state.lmscope``)."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.models = ModelCache(config.model_cache_size, self._load)
        self.runs = RunCache(config.run_cache_size, int(config.run_cache_mb * 2**20))

    def _load(self, key: ModelKey) -> LM:
        entry = self.config.models.get(key.model)
        source = entry.source if entry is not None else str(self.config.path_allowed(key.model))
        # trust_remote_code stays off: the app never runs code shipped with a model.
        return from_pretrained(source, device=key.device, dtype=key.dtype, max_tokens=self.config.max_input_tokens)

    def key(self, model: str | None, device: str | None, dtype: str | None) -> ModelKey:
        """A checked model key; unknown names, devices and dtypes are refused with the choices."""
        config = self.config
        model = model or config.default_model
        if model not in config.models:
            if not config.allow_paths or not any(ch in model for ch in "/\\.~"):
                raise LmscopeError(f"unknown model {model!r}: choose one of {', '.join(config.models)}")
            config.path_allowed(model)  # raises PermissionError (403) outside the allowed dirs
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

    def run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise HTTPException(
                404, f"unknown run {run_id!r}: it expired from the cache or never existed; run the text again"
            )
        return run

    def new_run(self, key: ModelKey, text: str, generate: int) -> Run:
        """Trace (or generate, then trace) ``text`` on the model under ``key``; cache and describe the run."""
        limit = self.config.max_input_tokens
        if not isinstance(text, str) or not text.strip():
            raise LmscopeError("the text is empty: type or pick a prompt to run")
        if len(text) > 32 * limit:  # refuse before tokenizing megabytes
            raise LmscopeError(
                f"the text is {len(text)} characters, far beyond the limit of {limit} tokens: shorten it"
            )
        if not 0 <= generate <= self.config.max_generate:
            raise LmscopeError(f"generate must be between 0 and {self.config.max_generate}, not {generate}")
        sites = self.config.sites or ALL_SITES
        with self.models.using(key) as lm:
            out = lm.generate(text, generate, sites=sites) if generate else lm.trace(text, sites=sites)
            info = describe(out, lm)
        return self.runs.add(out.trace, key, info)

    def add_trace(self, path: Path, key: ModelKey | None = None, attach: bool = True) -> Run:
        """Open a saved Trace; attach ``key``'s model (checked to match), else the configured model of the
        trace's own name when ``attach``, else none (then only analyses without weights work)."""
        out = load_trace(path)
        limit = self.config.max_input_tokens + self.config.max_generate
        if out.trace.n_pos > limit:
            raise LmscopeError(f"the trace has {out.trace.n_pos} tokens, more than this app's limit of {limit}")
        model = out.trace.model
        if key is None and attach and model.name in self.config.models:
            dtype = model.dtype if model.dtype in self.config.dtypes else None
            key = self.key(model.name, None, dtype)
        if key is None:
            return self.runs.add(out.trace, None, describe(out, None))
        with self.models.using(key) as lm:
            out = lm.attach(out.trace, where="this trace file")
            info = describe(out, lm)
        return self.runs.add(out.trace, key, info)

    def analyze(self, run_id: str, method: Callable[[Output], Any]) -> Any:
        """Call ``method`` on the run's Output, holding its model's lock (re-attached from the model cache)."""
        run = self.run(run_id)
        if run.key is None:
            return method(Output(run.trace))
        with self.models.using(run.key) as lm:
            return method(Output(run.trace, lm))

    def status(self) -> dict[str, Any]:
        return {
            "models": [vars(k) for k in self.models.loaded()],
            "model_cache_size": self.models.size,
            "runs": self.runs.stats(),
        }


def describe(out: Output, lm: LM | None) -> dict[str, Any]:
    """What the front end needs to know about a run: tokens, model, and which analyses it supports."""
    trace = out.trace
    head = lm is not None and lm.arch.lm_head is not None
    info: dict[str, Any] = {
        "model": trace.model.name,
        "tokens": list(trace.tokens),
        "token_ids": trace.token_ids.tolist(),
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
        "text": lm.tokenizer.decode(trace.token_ids[: trace.n_input].tolist(), skip_special_tokens=True)
        if lm is not None
        else "".join(trace.tokens[: trace.n_input]),
    }
    if head and "logits" in trace.tensors:
        probs = trace.logits.float().softmax(-1).max(-1)  # best next token per position
        strings = lm.unembed.token_strings(probs.indices.tolist())
        info["predictions"] = [{"token": t, "prob": float(p)} for t, p in zip(strings, probs.values, strict=True)]
    return info


def json_response(payload: Any, status: int = 200) -> Response:
    """JSON without FastAPI's generic encoder (results are already plain Python; large ones stay fast)."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body.encode("utf-8"), status_code=status, media_type="application/json")


def check_upload(size: int, max_bytes: int) -> None:
    """Refuse an upload of ``size`` bytes over the limit (413) or empty (400)."""
    if size > max_bytes:
        raise HTTPException(
            413, f"the trace file is {size >> 20} MB, more than this app's limit of {max_bytes >> 20} MB"
        )
    if size == 0:
        raise LmscopeError("the upload is empty: choose a trace file saved by lmscope")


def temp_file(data: bytes = b"") -> Path:
    """A temporary ``.safetensors`` file holding ``data`` (the caller deletes it)."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


def _app(request: Request) -> App:
    return request.app.state.lmscope


Service = Annotated[App, Depends(_app)]
