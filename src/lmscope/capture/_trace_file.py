"""Trace files: one safetensors file per Trace, written atomically, checked completely when read.

A file holds the tensors of :class:`Trace` (names and shapes in ``_trace``'s module docstring)
plus ``token_ids``, and two metadata strings: ``lmscope``, a JSON object with the tokens, the
model's description and the other fields of the Trace, and ``lmscope_crc32``, the CRC-32 of that
JSON text. Since format version 2 the JSON also holds ``checksums``: for every tensor the CRC-32
of its dtype, shape and raw bytes. CRC-32 finds every change of one byte (indeed every burst of
up to 32 bits), and it is several times faster than SHA-256 or BLAKE2 on the same bytes; it is
no protection against a forger, who can recompute any checksum stored in the file itself, and
that is why everything read is also checked against the model's own description.

Reading refuses, with a :class:`~lmscope.errors.TraceFileError` naming the first problem, any
file whose metadata has the wrong type or an unknown key, token lists of the wrong length,
layers out of range, an ``n_input`` or ``segment_b`` outside the tokens, tensors of the wrong
shape or dtype, token ids outside the vocabulary, NaN or infinite values, attention
probabilities outside [0, 1], or a checksum that does not match. Files of format version 1 (no
checksums) are read with every check but the checksums.

Format version 3 adds encoder-decoder traces: the encoder stack's tensors are stored as
``encoder.<site>`` (and ``encoder.token_ids``), its tokens, layers, model description and
attention factors under the metadata key ``encoder``; the decoder's are stored as before.
Traces of other models are still written as version 2.

Format version 4 adds attention kept as queries and keys (``_lazy_attention``): the metadata key
``attn_recipe`` (also under ``encoder``) holds one entry per layer and kind of attention, and the
tensors ``attn_mask`` / ``cross_attn_mask`` (bool ``[mask, pos_q, pos_k]``) and ``attn_bias`` /
``cross_attn_bias`` (``[bias, head, pos_q, pos_k]``) the masks and biases entries point to. Traces
with stored attention probabilities are written in the version their content needs, as before.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from lmscope.capture._lazy_attention import BIAS_SITE, INTERNAL_SITES, KINDS, MASK_SITE, QK_SITES
from lmscope.capture._trace import ALL_SITES, CROSS_SITES, ModelInfo, Trace
from lmscope.errors import LmscopeError, TraceFileError

__all__ = ["load_trace", "save_trace", "tensor_checksum"]

_FORMAT = "lmscope-trace"
_VERSION = 4  # 2: checksums, the model's n_neurons; 3: encoder-decoder traces; 4: attention as q/k (attn_recipe)
_ENCODER = "encoder."  # the prefix of the encoder stack's tensor names
_META, _META_CRC = "lmscope", "lmscope_crc32"
_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_LIMIT = 2**31  # no dimension, layer count or vocabulary of a real model comes near
_KEYS = {"format", "version", "tokens", "n_input", "layers", "model", "attn_scaling", "attn_softcap", "segment_b",
         "checksums", "interventions", "encoder", "attn_recipe"}  # fmt: skip
# absent from version 1 files (some or all); "interventions" only in files of intervened runs, "encoder" only
# in traces of encoder-decoder models
_OPTIONAL = {"attn_scaling", "attn_softcap", "segment_b", "checksums", "interventions", "encoder", "attn_recipe"}
_ENCODER_KEYS = {"tokens", "layers", "model", "attn_scaling", "attn_softcap", "attn_recipe"}
_RECIPE_KEYS = {"scaling", "softcap", "mask", "fill", "mask_dtype", "bias"}
# An intervention's description (``capture._interventions``): key -> what its value must be.
_INTERVENTION_KEYS = {"site": "string", "op": "string", "layers": "indices", "positions": "indices",
                      "heads": "indices", "neurons": "indices", "keys": "indices", "scale": "number",
                      "source": "text"}  # fmt: skip
_MODEL_OPTIONAL = {"n_neurons", "stack"}  # n_neurons: absent from version 1 files; stack: before version 3


class _Invalid(Exception):
    """One problem with a file's contents (raised by the checks, reported with the file's path)."""

    def __init__(self, problem: str, lead: str = "is not a valid lmscope trace"):
        super().__init__(f"{lead}: {problem}")


def _damaged(problem: str) -> _Invalid:
    return _Invalid(f"{problem} (the file changed after it was saved)", lead="is damaged")


def _file_error(path: Path, problem: str) -> TraceFileError:
    return TraceFileError(f"{path} {problem}", path=path, problem=problem)


def tensor_checksum(tensor: torch.Tensor) -> str:
    """CRC-32 of a CPU tensor's dtype, shape and raw bytes, as 8 hex digits."""
    head = f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}".encode()
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data, zlib.crc32(head)):08x}"


def _text_checksum(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of each tensor that shares memory with one before it (``resid_pre`` and ``resid_post``
    are views of one buffer), as safetensors writes each tensor on its own."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write ``trace`` to ``path`` (a temporary name first, then renamed: never half a file)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise LmscopeError(f"cannot write the trace to {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        raise LmscopeError(f"cannot write the trace to {path}: the folder {path.parent} does not exist")
    tensors = {name: t.detach().cpu().contiguous() for name, t in trace.tensors.items()}
    tensors["token_ids"] = trace.token_ids.detach().cpu().contiguous()
    if trace.encoder is not None:
        encoder = trace.encoder
        for name, t in (*encoder.tensors.items(), ("token_ids", encoder.token_ids)):
            tensors[_ENCODER + name] = t.detach().cpu().contiguous()
    tensors = _unshared(tensors)
    whole = _whole_file(trace)  # a stored trace: its file, as it is
    if whole is not None and path.resolve() == whole.resolve():
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if whole is not None:
            shutil.copyfile(whole, partial)
            os.replace(partial, path)
            return path
        text = json.dumps(trace_metadata(trace, {name: tensor_checksum(t) for name, t in tensors.items()}))
        save_file(tensors, str(partial), metadata={_META: text, _META_CRC: _text_checksum(text)})
        os.replace(partial, path)
    except (OSError, SafetensorError) as error:  # a full disk, no permission
        raise LmscopeError(f"cannot write the trace to {path}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return path


def trace_metadata(trace: Trace, checksums: dict[str, str]) -> dict[str, Any]:
    """The ``lmscope`` metadata of a trace file holding ``trace`` (``checksums``: tensor name -> CRC-32)."""
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "version": 4 if _lazy(trace) else 3 if trace.encoder is not None else 2,
        "tokens": list(trace.tokens),
        "n_input": trace.n_input,
        "layers": list(trace.layers),
        "model": asdict(trace.model),
        "attn_scaling": list(trace.attn_scaling),
        "attn_softcap": list(trace.attn_softcap),
        "segment_b": trace.segment_b,
        "checksums": checksums,
    }
    if trace.attn_recipe:
        meta["attn_recipe"] = dict(trace.attn_recipe)
    if trace.interventions:
        meta["interventions"] = [dict(record) for record in trace.interventions]
    if trace.encoder is not None:
        encoder = trace.encoder
        meta["encoder"] = {
            "tokens": list(encoder.tokens),
            "layers": list(encoder.layers),
            "model": asdict(encoder.model),
            "attn_scaling": list(encoder.attn_scaling),
            "attn_softcap": list(encoder.attn_softcap),
        }
        if encoder.attn_recipe:
            meta["encoder"]["attn_recipe"] = dict(encoder.attn_recipe)
    return meta


def _whole_file(trace: Trace) -> Path | None:
    """The file of a stored trace if it holds exactly this trace (copied on saving, no tensor read into memory)."""
    from lmscope.capture._store import StoredTensors

    stored = trace.tensors
    if not isinstance(stored, StoredTensors) or trace.encoder is not None or not stored.path.is_file():
        return None
    header = stored.metadata
    try:
        meta = json.loads(header[_META])
        same = meta == json.loads(json.dumps(trace_metadata(trace, meta["checksums"])))
    except (KeyError, ValueError, TypeError):
        return None
    if not same or set(meta["checksums"]) != set(stored.whole) or set(stored.whole) != {*stored, "token_ids"}:
        return None
    if not torch.equal(stored.whole["token_ids"], trace.token_ids):
        return None
    stored.check()
    return stored.path


MAP_ABOVE = 256 << 20
"""Trace files larger than this (bytes) are memory-mapped by :func:`load_trace` unless told otherwise."""


def load_trace(path: str | os.PathLike[str], mmap: bool | None = None) -> Trace:
    """Read a Trace written by :meth:`Trace.save` (or ``lm.trace(..., store=)``), without the model,
    checking all of it.

    ``mmap``: map the file instead of reading it into memory (by default, files over 256 MiB):
    the tensors are then read from disk as analyses touch them, and the checks stream through
    the file a block at a time, so a trace larger than RAM loads.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _file_error(path, "was not found: no trace file there")
    if mmap or (mmap is None and path.stat().st_size > MAP_ABOVE):
        return _mapped(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if _META not in header:
                raise _file_error(path, "is a safetensors file but not an lmscope trace")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except LmscopeError:
        raise
    except Exception as error:  # safetensors reports corruption with several error types
        raise _file_error(path, f"is not a readable lmscope trace file ({error})") from error
    try:
        return _checked(header, tensors)
    except _Invalid as problem:
        raise _file_error(path, str(problem)) from None


def _mapped(path: Path) -> Trace:
    """A trace file memory-mapped: checksums and values checked by streaming through it, then the rest."""
    from lmscope.capture._store import map_file, scan_file

    stored = map_file(path)
    header = stored.metadata
    if _META not in header:
        raise _file_error(path, "is a safetensors file but not an lmscope trace")
    try:
        trace = _checked(header, dict(stored.whole), scan=False)  # the metadata, names, shapes and dtypes
        checksums = json.loads(header[_META]).get("checksums")
        problem = scan_file(stored, checksums, probabilities=("attn_probs", "cross_attn_probs",
                                                              _ENCODER + "attn_probs"))  # fmt: skip
        if problem is not None:
            raise _damaged(problem) if "checksum" in problem else _Invalid(problem)
    except _Invalid as problem:
        raise _file_error(path, str(problem)) from None
    encoder = trace.encoder
    if encoder is not None:
        encoder = replace(encoder, tensors=stored.subset(dict(encoder.tensors)))
    return replace(trace, tensors=stored.subset(dict(trace.tensors)), encoder=encoder)


def _checked(header: Mapping[str, str], tensors: dict[str, torch.Tensor], scan: bool = True) -> Trace:
    """The Trace in a file's metadata and tensors, or :class:`_Invalid` naming the first problem.

    ``scan=False``: the checksums and values were checked already (streaming through a mapped file).
    """
    try:
        meta = json.loads(header[_META])
    except (ValueError, RecursionError) as error:
        raise _Invalid(f"its lmscope metadata is not JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _Invalid("its lmscope metadata has no 'format': 'lmscope-trace' marker")
    version = meta.get("version")
    if type(version) is not int or version < 1:
        raise _Invalid(f"metadata 'version' must be a positive integer, not {_kind(version)}")
    if version > _VERSION:
        raise _Invalid(f"it was written by a newer lmscope (trace format {version}): upgrade lmscope", "cannot be read")
    if version >= 2:
        _verify_header(header)
    required = _KEYS - _OPTIONAL | ({"checksums"} if version >= 2 else set())
    _keys("metadata", meta, _KEYS, required)
    if "checksums" in meta:
        _verify_tensors(meta["checksums"], tensors, scan)
    model = _model(meta["model"], version)
    tokens = meta["tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise _Invalid(f"metadata 'tokens' must be a non-empty list of strings, not {_kind(tokens)}")
    for i, token in enumerate(tokens):
        _string(f"metadata 'tokens' entry {i}", token)
    n_pos = len(tokens)
    n_input = _integer("metadata 'n_input'", meta["n_input"], 1, n_pos, f"1..{n_pos} (the number of tokens)")
    layers = _layers(meta["layers"], model.n_layers)
    attn_scaling, attn_softcap = _attention_factors(meta, len(layers))
    segment_b = meta.get("segment_b")
    if segment_b is not None:
        segment_b = _integer("metadata 'segment_b'", segment_b, 1, n_pos - 1, f"1..{n_pos - 1} or null")
    interventions = _interventions(meta.get("interventions", []))
    encoder_tensors = {name.removeprefix(_ENCODER): tensors.pop(name) for name in list(tensors) if
                       name.startswith(_ENCODER)}  # fmt: skip
    encoder = _encoder(meta["encoder"], encoder_tensors, version, scan) if "encoder" in meta else None
    if encoder is None and encoder_tensors:
        raise _Invalid(f"tensor {_ENCODER + next(iter(encoder_tensors))!r} belongs to no encoder in the metadata")
    if encoder is not None and model.stack != "decoder":
        raise _Invalid(f"it has an encoder stack, but its model 'stack' is {model.stack!r}, not 'decoder'")
    token_ids = _token_ids(tensors, n_pos, model.vocab_size)
    _check_tensors(tensors, model, len(layers), n_pos, encoder.n_pos if encoder is not None else None, scan)
    recipe = _recipe(meta.get("attn_recipe"), tensors, len(layers), version)
    return Trace(
        token_ids=token_ids,
        tokens=tuple(tokens),
        n_input=n_input,
        model=model,
        layers=layers,
        tensors=tensors,
        attn_scaling=attn_scaling,
        attn_softcap=attn_softcap,
        segment_b=segment_b,
        interventions=interventions,
        encoder=encoder,
        attn_recipe=recipe,
    )


def _encoder(meta: Any, tensors: dict[str, torch.Tensor], version: int, scan: bool = True) -> Trace:
    """The encoder stack's Trace of an encoder-decoder trace file (format 3), checked like the decoder's."""
    if version < 3:
        raise _Invalid(f"metadata 'encoder' appears in a format {version} file (encoder stacks came with format 3)")
    if not isinstance(meta, dict):
        raise _Invalid(f"metadata 'encoder' must be an object, not {_kind(meta)}")
    _keys("metadata 'encoder'", meta, _ENCODER_KEYS, _ENCODER_KEYS - {"attn_recipe"})
    model = _model(meta["model"], version)
    if model.stack != "encoder":
        raise _Invalid(f"metadata 'encoder' describes the model stack {model.stack!r}, not 'encoder'")
    tokens = meta["tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise _Invalid(f"metadata 'encoder' 'tokens' must be a non-empty list of strings, not {_kind(tokens)}")
    for i, token in enumerate(tokens):
        _string(f"metadata 'encoder' 'tokens' entry {i}", token)
    layers = _layers(meta["layers"], model.n_layers)
    attn_scaling, attn_softcap = _attention_factors(meta, len(layers))
    token_ids = _token_ids(tensors, len(tokens), model.vocab_size)
    if any(name in CROSS_SITES or name == "logits" for name in tensors):
        raise _Invalid("the encoder stack holds a site only the decoder has (cross-attention or logits)")
    _check_tensors(tensors, model, len(layers), len(tokens), scan=scan)
    recipe = _recipe(meta.get("attn_recipe"), tensors, len(layers), version)
    return Trace(
        token_ids=token_ids,
        tokens=tuple(tokens),
        n_input=len(tokens),
        model=model,
        layers=layers,
        tensors=tensors,
        attn_scaling=attn_scaling,
        attn_softcap=attn_softcap,
        attn_recipe=recipe,
    )


def _lazy(trace: Trace) -> bool:
    return bool(trace.attn_recipe) or (trace.encoder is not None and bool(trace.encoder.attn_recipe))


def _recipe(recipe: Any, tensors: Mapping[str, torch.Tensor], n_layers: int, version: int) -> dict[str, Any] | None:
    """The ``attn_recipe`` of a stack (attention kept as q/k), checked against its tensors."""
    extra = [name for name in tensors if name in INTERNAL_SITES]
    if recipe is None:
        if extra:
            raise _Invalid(f"tensor {extra[0]!r} serves attention kept as q/k, but the metadata has no 'attn_recipe'")
        return None
    if version < 4:
        raise _Invalid(f"metadata 'attn_recipe' appears in a format {version} file (it came with format 4)")
    if not isinstance(recipe, dict) or not recipe:
        raise _Invalid(f"metadata 'attn_recipe' must be a non-empty object, not {_kind(recipe)}")
    for kind, entries in recipe.items():
        where = f"metadata 'attn_recipe' {kind!r}"
        if kind not in KINDS:
            raise _Invalid(f"metadata 'attn_recipe' has an unknown kind {kind!r} (use 'self' or 'cross')")
        missing = [site for site in QK_SITES[kind] if site not in tensors]
        if missing:
            raise _Invalid(f"{where} computes attention from {missing[0]!r}, which the file lacks")
        if not isinstance(entries, list) or len(entries) != n_layers:
            raise _Invalid(f"{where} must be a list of one entry per layer in 'layers' ({n_layers})")
        masks, biases = tensors.get(MASK_SITE[kind]), tensors.get(BIAS_SITE[kind])
        for i, entry in enumerate(entries):
            _recipe_entry(f"{where} entry {i}", entry, masks, biases, MASK_SITE[kind])
    for kind in KINDS:
        for name in (MASK_SITE[kind], BIAS_SITE[kind]):
            if name in tensors and kind not in recipe:
                raise _Invalid(f"tensor {name!r} serves no kind of attention in metadata 'attn_recipe'")
    return recipe


def _recipe_entry(place: str, entry: Any, masks: torch.Tensor | None, biases: torch.Tensor | None, name: str) -> None:
    if not isinstance(entry, dict):
        raise _Invalid(f"{place} must be an object, not {_kind(entry)}")
    _keys(place, entry, _RECIPE_KEYS, _RECIPE_KEYS)
    _positive(f"{place} 'scaling'", entry["scaling"])
    if entry["softcap"] is not None:
        _positive(f"{place} 'softcap'", entry["softcap"])
    if entry["mask"] not in (None, "causal", "full"):
        count = 0 if masks is None else len(masks)
        _integer(f"{place} 'mask'", entry["mask"], 0, count - 1, f"0..{count - 1} (the masks in {name!r})")
    if entry["fill"] is not None:
        if type(entry["fill"]) is not float or not math.isfinite(entry["fill"]) or entry["fill"] >= 0:
            raise _Invalid(f"{place} 'fill' must be a finite negative number or null, not {_kind(entry['fill'])}")
        if entry["mask_dtype"] not in _FLOATS:
            raise _Invalid(f"{place} 'mask_dtype' must be one of {', '.join(_FLOATS)}")
    elif entry["mask_dtype"] is not None:
        raise _Invalid(f"{place} 'mask_dtype' must be null where 'fill' is")
    if entry["bias"] is not None:
        count = 0 if biases is None else len(biases)
        _integer(f"{place} 'bias'", entry["bias"], 0, count - 1, f"0..{count - 1} (the stored biases)")


def _interventions(records: Any) -> tuple[dict[str, Any], ...]:
    """The interventions of an intervened run, each a plain description (see ``_INTERVENTION_KEYS``)."""
    from lmscope.capture._interventions import INTERVENTION_OPS, INTERVENTION_SITES

    if not isinstance(records, list):
        raise _Invalid(f"metadata 'interventions' must be a list, not {_kind(records)}")
    for i, record in enumerate(records):
        where = f"metadata 'interventions' entry {i}"
        if not isinstance(record, dict):
            raise _Invalid(f"{where} must be an object, not {_kind(record)}")
        _keys(where, record, set(_INTERVENTION_KEYS), {"site", "op"})
        for key, value in record.items():
            kind = _INTERVENTION_KEYS[key]
            if kind == "string" or (kind == "text" and value is not None):
                _string(f"{where} '{key}'", value)
            elif kind == "number":
                _positive_or_any(f"{where} '{key}'", value)
            elif kind == "indices" and value is not None:
                if not isinstance(value, list):
                    raise _Invalid(f"{where} '{key}' must be a list of integers or null, not {_kind(value)}")
                for v in value:
                    _integer(f"an entry of {where} '{key}'", v, 0, _LIMIT - 1)
        if record["site"] not in INTERVENTION_SITES:
            raise _Invalid(f"{where} names the site {record['site']!r}, not one of {', '.join(INTERVENTION_SITES)}")
        if record["op"] not in INTERVENTION_OPS:
            raise _Invalid(f"{where} names the operation {record['op']!r}, not one of {', '.join(INTERVENTION_OPS)}")
    return tuple(records)


def _positive_or_any(where: str, value: Any) -> None:
    """A finite number (of any sign)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _Invalid(f"{where} must be a finite number, not {_kind(value)}")


def _verify_header(header: Mapping[str, str]) -> None:
    stored = header.get(_META_CRC)
    if stored is None:
        raise _Invalid(f"it has no checksum of its metadata ('{_META_CRC}'), which format 2 files always have")
    if stored != _text_checksum(header[_META]):
        raise _damaged("its lmscope metadata do not match their checksum")


def _verify_tensors(checksums: Any, tensors: Mapping[str, torch.Tensor], scan: bool = True) -> None:
    if not isinstance(checksums, dict):
        raise _Invalid(f"metadata 'checksums' must be an object, not {_kind(checksums)}")
    for name in tensors:
        if name not in checksums:
            raise _Invalid(f"tensor {name!r} has no checksum in metadata 'checksums'")
    for name in checksums:
        if name not in tensors:
            raise _Invalid(f"tensor {name!r}, named in metadata 'checksums', is missing")
    for name, stored in checksums.items() if scan else ():
        if stored != tensor_checksum(tensors[name]):
            raise _damaged(f"tensor {name!r} does not match its checksum")


def _model(model: Any, version: int) -> ModelInfo:
    if not isinstance(model, dict):
        raise _Invalid(f"metadata 'model' must be an object, not {_kind(model)}")
    names = {f.name for f in fields(ModelInfo)}
    required = names if version >= 3 else names - {"stack"} if version == 2 else names - _MODEL_OPTIONAL
    _keys("metadata 'model'", model, names, required=required)
    for key in ("name", "model_type", "family", "dtype"):
        _string(f"model '{key}'", model[key])
    if model.get("stack", "") not in ("", "encoder", "decoder"):
        raise _Invalid(f"model 'stack' must be '', 'encoder' or 'decoder', not {_kind(model['stack'])}")
    heads = ("n_heads", "n_kv_heads", "d_head")
    attention_free = all(model.get(key) == 0 for key in heads)  # a state-space model: all three are 0
    for key in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "vocab_size"):
        _integer(f"model '{key}'", model[key], 0 if key in heads and attention_free else 1, _LIMIT - 1)
    if model.get("n_neurons") is not None:
        _integer("model 'n_neurons'", model["n_neurons"], 1, _LIMIT - 1)
    for key in ("parallel", "post_norm"):
        if type(model[key]) is not bool:
            raise _Invalid(f"model '{key}' must be true or false, not {_kind(model[key])}")
    if model["dtype"] not in _FLOATS:
        raise _Invalid(f"model 'dtype' must be one of {', '.join(_FLOATS)}, not {model['dtype']!r}")
    if model["n_heads"] and model["n_heads"] % max(model["n_kv_heads"], 1):
        raise _Invalid(f"model 'n_kv_heads' {model['n_kv_heads']} does not divide 'n_heads' {model['n_heads']}")
    return ModelInfo(**model)


def _layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    if not isinstance(layers, list) or not layers:
        raise _Invalid(f"metadata 'layers' must be a non-empty list of layer numbers, not {_kind(layers)}")
    for layer in layers:
        _integer("a layer in metadata 'layers'", layer, 0, n_layers - 1, f"0..{n_layers - 1} (the model's layers)")
    if layers != sorted(set(layers)):
        raise _Invalid(f"metadata 'layers' must be increasing without repeats, not {layers[:8]}")
    return tuple(layers)


def _attention_factors(meta: dict[str, Any], n_layers: int) -> tuple[tuple[float, ...], tuple[float | None, ...]]:
    scaling, softcap = meta.get("attn_scaling", []), meta.get("attn_softcap", [])
    for key, values in (("attn_scaling", scaling), ("attn_softcap", softcap)):
        if not isinstance(values, list) or len(values) not in (0, n_layers):
            raise _Invalid(
                f"metadata {key!r} must be a list of one number per layer in 'layers' ({n_layers}) or empty, "
                f"not {_kind(values)}"
            )
    if len(softcap) != len(scaling):
        raise _Invalid(f"metadata 'attn_softcap' has {len(softcap)} entries and 'attn_scaling' {len(scaling)}")
    for value in scaling:
        _positive("a value in metadata 'attn_scaling'", value)
    for value in softcap:
        if value is not None:
            _positive("a value in metadata 'attn_softcap'", value)
    return tuple(float(v) for v in scaling), tuple(None if v is None else float(v) for v in softcap)


def _token_ids(tensors: dict[str, torch.Tensor], n_pos: int, vocab_size: int) -> torch.Tensor:
    ids = tensors.pop("token_ids", None)
    if ids is None:
        raise _Invalid("the tensor 'token_ids' is missing")
    if ids.dtype not in _INTEGERS:
        raise _Invalid(f"tensor 'token_ids' must hold integers, not {str(ids.dtype).removeprefix('torch.')}")
    if tuple(ids.shape) != (n_pos,):
        raise _Invalid(f"tensor 'token_ids' has shape {list(ids.shape)}, not [{n_pos}] (one id per token)")
    ids = ids.long()
    low, high = (int(x) for x in torch.aminmax(ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise _Invalid(f"tensor 'token_ids' holds the id {bad}, outside the vocabulary 0..{vocab_size - 1}")
    return ids


def _shapes(
    model: ModelInfo, n_layers: int, n_pos: int, n_neurons: int, n_enc: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Each site's shape (the axis vocabulary of ``_trace``'s module docstring); ``n_enc``: encoder positions."""
    resid = (n_layers, n_pos, model.d_model)
    kv = (n_layers, n_pos, model.n_kv_heads, model.d_head)
    cross: dict[str, tuple[int, ...]] = {}
    if n_enc is not None:
        cross = {
            "resid_cross": resid,
            "cross_attn_out": resid,
            "cross_attn_probs": (n_layers, model.n_heads, n_pos, n_enc),
            "cross_q": (n_layers, n_pos, model.n_heads, model.d_head),
            "cross_k": (n_layers, n_enc, model.n_kv_heads, model.d_head),
            "cross_v": (n_layers, n_enc, model.n_kv_heads, model.d_head),
        }
    return {
        **cross,
        "position_bias": (n_layers, model.n_heads, n_pos, n_pos),
        "resid_pre": resid,
        "resid_mid": resid,
        "resid_post": resid,
        "attn_out": resid,
        "mlp_out": resid,
        "attn_probs": (n_layers, model.n_heads, n_pos, n_pos),
        "q": (n_layers, n_pos, model.n_heads, model.d_head),
        "k": kv,
        "v": kv,
        "mlp_act": (n_layers, n_pos, n_neurons),
        "logits": (n_pos, model.vocab_size),
    }


def _check_tensors(
    tensors: Mapping[str, torch.Tensor],
    model: ModelInfo,
    n_layers: int,
    n_pos: int,
    n_enc: int | None = None,
    scan: bool = True,
) -> None:
    unknown = [name for name in tensors if name not in (*ALL_SITES, "logits", *INTERNAL_SITES)]
    if unknown:
        raise _Invalid(f"tensor {unknown[0]!r} is no site of a trace (sites: {', '.join(ALL_SITES)}, logits)")
    cross = [name for name in tensors if name in CROSS_SITES]
    if cross and n_enc is None:
        raise _Invalid(f"tensor {cross[0]!r} is a cross-attention site, but the file holds no encoder stack")
    act = tensors.get("mlp_act")
    n_neurons = model.n_neurons or (int(act.shape[-1]) if act is not None and act.ndim else 1)
    shapes = _shapes(model, n_layers, n_pos, n_neurons, n_enc)
    dtype = _FLOATS[model.dtype]
    for name, tensor in tensors.items():
        if name in INTERNAL_SITES:
            _check_recipe_tensor(name, tensor, model, n_pos, n_enc)
            continue
        if name == "logits":
            if not tensor.dtype.is_floating_point or tensor.dtype not in _FLOATS.values():
                raise _Invalid(
                    f"tensor 'logits' must be floating point, not {str(tensor.dtype).removeprefix('torch.')}"
                )
        elif tensor.dtype != dtype:
            raise _Invalid(
                f"tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, not the model's {model.dtype}"
            )
        if tuple(tensor.shape) != shapes[name]:
            raise _Invalid(f"tensor {name!r} has shape {list(tensor.shape)}, not {list(shapes[name])}")
    if not scan:
        return
    for name, tensor in tensors.items():  # after all shapes: the costlier scans
        # A sum is finite unless a value is NaN or infinite (or the sum overflows: then look closer).
        if not (bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())):
            raise _Invalid(f"tensor {name!r} holds NaN or infinite values")
    for name in ("attn_probs", "cross_attn_probs"):
        probs = tensors.get(name)
        if probs is not None and probs.numel():
            low, high = (float(x) for x in torch.aminmax(probs))
            if low < 0 or high > 1:
                raise _Invalid(f"tensor {name!r} holds values outside [0, 1], which no attention probability takes")


def _check_recipe_tensor(name: str, tensor: torch.Tensor, model: ModelInfo, n_pos: int, n_enc: int | None) -> None:
    """A mask (bool ``[mask, pos_q, pos_k]``) or bias (``[bias, head, pos_q, pos_k]``) of attention kept as q/k."""
    cross = name.startswith("cross_")
    if cross and n_enc is None:
        raise _Invalid(f"tensor {name!r} is a cross-attention site, but the file holds no encoder stack")
    n_k = n_enc if cross else n_pos
    kind = str(tensor.dtype).removeprefix("torch.")
    if name in MASK_SITE.values():
        if tensor.dtype != torch.bool or tensor.ndim != 3 or tuple(tensor.shape[1:]) != (n_pos, n_k):
            raise _Invalid(f"tensor {name!r} must be bool [mask, {n_pos}, {n_k}], not {kind} {list(tensor.shape)}")
    elif tensor.dtype not in _FLOATS.values() or tuple(tensor.shape[1:]) != (model.n_heads, n_pos, n_k):
        raise _Invalid(f"tensor {name!r} must be floating point [bias, {model.n_heads}, {n_pos}, {n_k}], not "
                       f"{kind} {list(tensor.shape)}")  # fmt: skip


def _keys(where: str, mapping: dict[str, Any], known: set[str], required: set[str]) -> None:
    for key in mapping:
        if key not in known:
            raise _Invalid(f"{where} has an unknown key {key!r}")
    for key in sorted(required):
        if key not in mapping:
            raise _Invalid(f"{where} lacks the key {key!r}")


def _string(where: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a string, not {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None


def _integer(where: str, value: Any, low: int, high: int, allowed: str | None = None) -> int:
    if type(value) is not int:
        raise _Invalid(f"{where} must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise _Invalid(f"{where} is {value}, outside {allowed or f'{low}..{high}'}")
    return value


def _positive(where: str, value: Any) -> None:
    if type(value) not in (int, float):
        raise _Invalid(f"{where} must be a number, not {_kind(value)}")
    if not (math.isfinite(value) and value > 0):
        raise _Invalid(f"{where} is {value}, not a finite positive number")


def _kind(value: Any) -> str:
    """A JSON value's kind, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return "an object" if isinstance(value, dict) else type(value).__name__
