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

Relative paths (model sources that exist as files, the prompts file, allowed dirs) are resolved
against the config file's directory, so a config can sit next to its models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

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

    def __post_init__(self) -> None:
        if not self.models:
            raise LmscopeError("the app config lists no models: add at least one under 'models'")
        if self.default_model not in self.models:
            raise LmscopeError(
                f"default_model {self.default_model!r} is not among the configured models ({', '.join(self.models)})"
            )
        for name in ("max_input_tokens", "max_generate", "model_cache_size", "run_cache_size"):
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
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(d) for d in self.allowed_dirs):
            raise PermissionError(f"{path} is outside the directories this app may read: {_names(self.allowed_dirs)}")
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
        }


def _names(dirs: tuple[Path, ...]) -> str:
    return ", ".join(map(str, dirs)) or "none"


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
    known = {f.name for f in fields(AppConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise LmscopeError(
            f"{where} has unknown key(s) {', '.join(unknown)}: known keys are {', '.join(sorted(known))}"
        )
    return from_dict(raw, base)


def from_dict(raw: dict[str, Any], base: Path) -> AppConfig:
    """An :class:`AppConfig` from parsed JSON, with paths resolved against ``base``."""
    models: dict[str, ModelEntry] = {}
    for name, entry in dict(raw.get("models") or {}).items():
        if isinstance(entry, str):
            entry = {"source": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("source", name), str):
            raise LmscopeError(f"model {name!r} in the app config needs a 'source' string")
        source = _resolve_source(entry.get("source", name), base)
        models[name] = ModelEntry(name, source, str(entry.get("description", "")))
    settings = {k: v for k, v in raw.items() if k not in ("models", "sample_prompts", "devices", "allowed_dirs")}
    try:
        return AppConfig(
            models=models,
            default_model=settings.pop("default_model", next(iter(models), "")),
            sample_prompts=_prompts(raw.get("sample_prompts", []), base),
            devices=_available_devices(list(raw.get("devices", ["cpu"]))),
            allowed_dirs=tuple((base / Path(d).expanduser()).resolve() for d in raw.get("allowed_dirs", [])),
            **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()},
        )
    except TypeError as error:
        raise LmscopeError(f"the app config has a value of the wrong type ({error})") from error
