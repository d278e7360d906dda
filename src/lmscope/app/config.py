"""The web app's settings, read from a JSON file (``lmscope serve --config FILE``).

The default config ships next to this module (``default_config.json``) and works out of the box with
the embedded model and the tiny models. A config file names::

    models            name -> {"source": embedded/tiny name, HF id, local directory or .gguf file,
                               "description": shown in the model menu}
    default_model     the model selected when the page opens
    sample_prompts    a JSON file holding a list of prompts (or the list itself)
    max_input_tokens  the longest text (plus generated tokens) a run may have
    max_generate      the most tokens one run may generate
    devices, dtypes   the choices offered (devices the machine lacks are dropped)
    allow_paths       whether requests may name files (models, traces) by path ...
    allowed_dirs      ... and only inside these directories
    model_cache_size  models kept loaded, keyed by (model, device, dtype)
    run_cache_size    runs kept (least recently used dropped first) ...
    run_cache_mb      ... and the most memory their captured tensors may hold
    max_upload_mb     the largest Trace file that may be uploaded
    max_cost          the most work one request may ask for, counted before it runs (a token through
                      one layer is 1: saliency costs outputs × tokens × layers, integrated gradients
                      2 × steps × outputs × tokens × layers, the flow graph 4 × targets × tokens × layers)
    workers           threads running models (at most one request per model at a time)
    queue_size        requests one model may have queued or running; more get 503 and Retry-After
    allowed_hosts     host names, besides loopback and the listening address, that requests may
                      use in their Host header (a guard against DNS rebinding)
    sites             the sites a run captures (default: all)
    max_trace_mb      a run whose trace would hold more than this is written to disk and read
                      memory-mapped (``lm.trace(..., store=)``; default: none, all in memory) ...
    trace_dir         ... into this folder (default: a temporary one); a run's file is deleted
                      when the run leaves the cache

Values are checked against a schema (strict types, no unknown keys): a wrong type is a one-line
error naming the key. Relative paths (model sources that exist as files, the prompts file, allowed dirs) are resolved
against the config file's directory, so a config can sit next to its models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmscope.capture import ALL_SITES
from lmscope.errors import LmscopeError

__all__ = ["AppConfig", "ModelEntry", "load_config"]


@dataclass(frozen=True)
class ModelEntry:
    """One model the app offers: what ``from_pretrained`` is called with, and a description."""

    name: str
    source: str
    description: str = ""


@dataclass(frozen=True)
class AppConfig:
    """Validated web app settings (see the module docstring for each field)."""

    models: dict[str, ModelEntry]
    default_model: str
    sample_prompts: tuple[str, ...] = ()
    max_input_tokens: int = 128
    max_generate: int = 16
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("float32",)
    allow_paths: bool = False
    allowed_dirs: tuple[Path, ...] = ()
    model_cache_size: int = 2
    run_cache_size: int = 16
    run_cache_mb: float = 512.0
    max_upload_mb: float = 256.0
    sites: tuple[str, ...] | None = field(default=None)
    max_cost: int = 1_000_000
    workers: int = 2
    queue_size: int = 8
    allowed_hosts: tuple[str, ...] = ()
    max_trace_mb: float | None = None
    trace_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise LmscopeError("the app config lists no models: add at least one under 'models'")
        if self.default_model not in self.models:
            raise LmscopeError(
                f"default_model {self.default_model!r} is not among the configured models ({', '.join(self.models)})"
            )
        for name in ("max_input_tokens", "max_generate", "model_cache_size", "run_cache_size", "max_cost", "workers"):
            if int(getattr(self, name)) < 1:
                raise LmscopeError(f"{name} must be at least 1 in the app config")
        if self.run_cache_mb <= 0 or self.max_upload_mb <= 0:
            raise LmscopeError("run_cache_mb and max_upload_mb must be positive in the app config")
        if not self.devices or not self.dtypes:
            raise LmscopeError("the app config must offer at least one device and one dtype")

    def path_allowed(self, path: str | os.PathLike[str]) -> Path:
        """``path`` resolved, if requests may load it; otherwise a clear error."""
        if not self.allow_paths:
            raise PermissionError("loading files by path is turned off in this app's config (allow_paths)")
        resolved = resolve_path(path)
        if not any(resolved.is_relative_to(d) for d in self.allowed_dirs):
            raise PermissionError(f"{_shown(path)} is outside the directories this app may read")
        return resolved

    def public(self) -> dict[str, Any]:
        """What the front end may know (no filesystem paths)."""
        return {
            "models": {n: m.description for n, m in self.models.items()},
            "default_model": self.default_model,
            "sample_prompts": list(self.sample_prompts),
            "max_input_tokens": self.max_input_tokens,
            "max_generate": self.max_generate,
            "devices": list(self.devices),
            "dtypes": list(self.dtypes),
            "allow_paths": self.allow_paths,
            # models known to be encoder-decoders before loading (the page offers them a target field)
            "seq2seq_models": [n for n, m in self.models.items() if _seq2seq_source(m.source)],
        }


def _seq2seq_source(source: str) -> bool:
    """Whether a model source is an encoder-decoder, as far as is known without loading it: a seeded
    tiny model, or a local directory whose ``config.json`` says so (others show it after their first run)."""
    from lmscope.models._tiny import TINY_SEQ2SEQ

    if source.startswith("tiny-"):
        return source[5:] in TINY_SEQ2SEQ
    try:
        config = Path(source) / "config.json"
        return config.is_file() and bool(json.loads(config.read_text()).get("is_encoder_decoder"))
    except (OSError, ValueError, AttributeError):
        return False


MAX_PATH = 1024


def _shown(path: str | os.PathLike[str]) -> str:
    text = repr(os.fspath(path))
    return text if len(text) <= 120 else text[:100] + "…"


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute with every symlink and ``..`` resolved, so that one file has one name;
    a path that cannot name a file (NUL byte, too long, a symlink loop) is a clear error."""
    text = os.fspath(path)
    if "\0" in text:
        raise LmscopeError(f"the path {_shown(text)} holds a NUL byte")
    if len(text) > MAX_PATH or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in Path(text).parts):
        raise LmscopeError(f"the path {_shown(text)} is too long")
    try:
        text.encode("utf-8")
        return Path(text).expanduser().resolve()
    except UnicodeEncodeError:
        raise LmscopeError(f"the path {_shown(text)} is not valid Unicode") from None
    except RuntimeError:  # Python < 3.13 raises this for a symlink loop
        raise LmscopeError(f"the path {_shown(text)} is a symlink loop") from None
    except (OSError, ValueError) as error:
        raise LmscopeError(f"the path {_shown(text)} cannot be resolved ({type(error).__name__})") from None


def _available_devices(devices: list[str]) -> tuple[str, ...]:
    import torch

    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return tuple(d for d in devices if present.get(d.split(":")[0], False))


def _resolve_source(source: str, base: Path) -> str:
    # A source that names a file or directory relative to the config is a local path; an HF id
    # ("org/name") or a known name stays as it is.
    path = Path(source).expanduser()
    if path.is_absolute():
        return str(path)
    if source.startswith(".") or (base / path).exists():
        return str((base / path).resolve())
    return source


def _prompts(value: Any, base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        path = base / value
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise LmscopeError(f"cannot read the sample prompts file {path}: {error}") from error
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise LmscopeError("sample_prompts must be a JSON list of strings (or a file holding one)")
    return tuple(value)


Positive = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _ModelSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    source: str
    description: str = ""


class _Schema(BaseModel):
    """The app config file's schema: strict types (no "false" for false), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models: dict[str, _ModelSchema | str]
    default_model: str | None = None
    sample_prompts: str | list[str] = []
    max_input_tokens: Positive = 128
    max_generate: Positive = 16
    devices: list[str] = ["cpu"]
    dtypes: list[str] = ["float32"]
    allow_paths: bool = False
    allowed_dirs: list[str] = []
    model_cache_size: Positive = 2
    run_cache_size: Positive = 16
    run_cache_mb: PositiveFloat = 512.0
    max_upload_mb: PositiveFloat = 256.0
    sites: list[str] | None = None
    max_cost: Positive = 1_000_000
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    queue_size: Positive = 8
    allowed_hosts: list[str] = []
    max_trace_mb: PositiveFloat | None = None
    trace_dir: str | None = None


def _schema_error(error: ValidationError, where: str) -> LmscopeError:
    item = error.errors()[0]
    key = ".".join(str(part) for part in item["loc"] if not str(part).startswith(("function-", "str", "_Model")))
    if item["type"] == "extra_forbidden":
        known = ", ".join(_Schema.model_fields)
        return LmscopeError(f"{where} has an unknown key {key!r}: known keys are {known}")
    if item["type"] == "missing":
        return LmscopeError(f"{where} lacks the key {key!r}")
    value = repr(item.get("input"))
    value = value if len(value) <= 60 else value[:57] + "..."
    message = item["msg"].removeprefix("Input ")
    return LmscopeError(f"{where}: {key!r} {message}, not {value}")


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> AppConfig:
    """Read and validate a config file (``None``: the default config); ``overrides`` replace its keys."""
    if path is None:
        text = resources.files("lmscope.app").joinpath("default_config.json").read_text(encoding="utf-8")
        base = Path(str(resources.files("lmscope.app")))
        where = "the default config"
    else:
        file = Path(path).expanduser()
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as error:
            raise LmscopeError(f"cannot read the app config {file}: {error.strerror or error}") from error
        base, where = file.resolve().parent, str(file)
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise LmscopeError(f"{where} is not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise LmscopeError(f"{where} must hold a JSON object")
    raw.update(overrides)
    try:
        # JSON mode: strict types, yet a model entry may be a JSON object
        checked = _Schema.model_validate_json(json.dumps(raw, default=str))
    except ValidationError as error:
        raise _schema_error(error, where) from None
    return from_dict(checked.model_dump(exclude_unset=True), base)


def from_dict(raw: dict[str, Any], base: Path) -> AppConfig:
    """An :class:`AppConfig` from parsed JSON, with paths resolved against ``base``."""
    models: dict[str, ModelEntry] = {}
    for name, entry in dict(raw.get("models") or {}).items():
        if isinstance(entry, str):
            entry = {"source": entry}
        source = _resolve_source(entry["source"], base)
        models[name] = ModelEntry(name, source, entry.get("description", ""))
    sites = raw.get("sites")
    unknown = sorted(set(sites or ()) - set(ALL_SITES))
    if unknown:
        raise LmscopeError(f"the app config's 'sites' has unknown sites {unknown}: choose from {', '.join(ALL_SITES)}")
    plain = ("models", "sample_prompts", "devices", "allowed_dirs", "default_model", "trace_dir")
    settings = {k: v for k, v in raw.items() if k not in plain}
    if raw.get("trace_dir") is not None:
        trace_dir = resolve_path(base / Path(raw["trace_dir"]).expanduser())
        if not trace_dir.is_dir():
            raise LmscopeError(f"the app config's trace_dir {_shown(trace_dir)} is not a folder: create it first")
        settings["trace_dir"] = trace_dir
    return AppConfig(
        models=models,
        default_model=raw.get("default_model") or next(iter(models), ""),
        sample_prompts=_prompts(raw.get("sample_prompts", []), base),
        devices=_available_devices(list(raw.get("devices", ["cpu"]))),
        allowed_dirs=tuple(resolve_path(base / Path(d).expanduser()) for d in raw.get("allowed_dirs", [])),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()},
    )
