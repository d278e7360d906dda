"""Disk-backed traces: tensors written to a trace file while the model runs, read back memory-mapped.

``lm.trace(text, store=PATH)`` writes the same safetensors file that :meth:`Trace.save` writes
(so :func:`lmscope.load_trace` reads it), but layer by layer from inside the forward hooks:

- before the run, the file's layout is fixed from the model, the token count and the sites
  (every site's shape is ``[layer, ...]``, so layer ``i`` of a site is one contiguous range);
- each captured tensor is written at its place with positioned writes (``os.pwrite``, never a
  writable memory map, so written pages do not count as the process's memory) and dropped: RAM
  holds about one layer's tensors (a pre-norm block's ``resid_pre`` waits for its ``attn_out``
  to make ``resid_mid``);
- the logits follow after the run; the header (tensor table and metadata with checksums,
  computed as the layers were written) is written last, into room reserved at the start, and
  the file, written under a temporary name, is renamed to ``PATH`` only then. An interrupted
  run leaves no file that reads as a trace.

The returned Trace maps the file read-only (copy-on-write, so an analysis that writes into a
tensor never changes the file): its tensors are ordinary CPU tensors whose pages the OS reads
on demand and may drop again. Every access to a site checks that the file is still there and
whole, so a deleted or truncated file is a one-line :class:`~lmscope.errors.LmscopeError`
instead of a bus error.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.errors import LmscopeError

__all__ = [
    "StoreWriter",
    "StoredTensors",
    "estimate_bytes",
    "map_file",
    "memory_or_disk",
    "open_store",
    "parse_size",
    "scan_file",
    "store_path",
    "stored_trace",
    "trace_size",
]

_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}  # fmt: skip
_TORCH = {code: dtype for dtype, code in _DTYPES.items()}
# numpy stand-ins of the same width (numpy has no bfloat16: its bits are read as int16, then viewed)
_NUMPY = {"F16": np.float16, "BF16": np.int16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip
_CHUNK = 64 << 20  # bytes read at a time when a checksum is computed from the file


def store_path(store: str | os.PathLike[str]) -> Path:
    """The trace file for ``store=``: a file path (its folder must exist), or an existing folder,
    in which a new ``trace-<time>.safetensors`` is made."""
    path = Path(store)
    if path.is_dir():
        return path / f"trace-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}.safetensors"
    if not path.parent.is_dir():
        raise LmscopeError(f"cannot store the trace at {path}: the folder {path.parent} does not exist")
    return path


def estimate_bytes(model: Any, n_layers: int, n_pos: int, sites: tuple[str, ...], logits: bool = True) -> int:
    """About how many bytes a trace of ``n_pos`` tokens with ``sites`` on ``n_layers`` layers holds.

    ``model``: a :class:`~lmscope.capture.ModelInfo`. Attention probabilities count as the
    queries and keys they are computed from, unless stored in full (``attn_probs_stored``).
    """
    from lmscope.capture._trace_file import _FLOATS, _shapes

    shapes = _shapes(model, n_layers, n_pos, model.n_neurons or 4 * model.d_model)
    wanted = {"attn_probs" if s == "attn_probs_stored" else s for s in sites if s in shapes or s.endswith("_stored")}
    if "attn_probs" in sites and "attn_probs_stored" not in sites:
        wanted |= {"q", "k"}
        wanted.discard("attn_probs")
    if logits and model.vocab_size:
        wanted.add("logits")
    itemsize = _FLOATS.get(model.dtype, torch.float32).itemsize
    return sum(int(np.prod(shapes[s], dtype=np.int64)) for s in wanted if s in shapes) * itemsize


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, on the CPU, without a copy where it is already contiguous there."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class StoreWriter:
    """Writes one trace file: ``[layer, ...]`` sites a layer at a time, then the rest and the header.

    A site's place in the file is taken when its first layer arrives (its shape and dtype are
    that tensor's, over ``layers``, the model layer numbers in axis order). ``sites``: the sites
    asked for; ``derive_mid``: make ``resid_mid = resid_pre + attn_out`` per layer (pre-norm
    blocks; the two parts are then written only if asked for). ``reserve``: bytes of header room
    for the metadata.
    """

    def __init__(self, path: Path, layers: tuple[int, ...], token_ids: torch.Tensor, sites: tuple[str, ...],
                 derive_mid: bool, reserve: int, needed: int) -> None:  # fmt: skip
        self.path, self.layers, self.derive_mid, self.sites = path, layers, derive_mid, sites
        self.skip = {"resid_pre", "attn_out"} - set(sites) if derive_mid else set()
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self.header_room = _round8(reserve + 8192)  # the tensor table, the metadata and slack
        self.table: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}  # name -> dtype, shape, span
        self.end = 0  # of the data written so far (relative to the data's start)
        self.written: dict[str, set[int]] = {}
        self.crc: dict[str, int] = {}
        self.in_order: dict[str, bool] = {}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.fd = -1
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError as error:
            raise LmscopeError(f"cannot store the trace at {path}: {error.strerror or error}") from None
        if free < needed:
            raise LmscopeError(f"cannot store the trace at {path}: it needs about {_gib(needed)} and the disk there "
                               f"has {_gib(free)} free")  # fmt: skip
        try:
            self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            raise LmscopeError(f"cannot store the trace at {path}: {error.strerror or error}") from None
        self.add("token_ids", token_ids.long())

    def _place(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if dtype not in _DTYPES:
            raise LmscopeError(f"{name!r} is {str(dtype).removeprefix('torch.')}, which a trace file cannot hold")
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        self.table[name] = (_DTYPES[dtype], shape, (self.end, self.end + size))
        self.end += size
        self.written[name], self.in_order[name] = set(), True
        self.crc[name] = zlib.crc32(_head(dtype, shape))

    # -- while the model runs ------------------------------------------------------------------

    def put(self, site: str, layer: int, tensor: torch.Tensor) -> None:
        """Write layer ``layer`` of ``site`` (``[batch=1, ...]``) at its place in the file."""
        if self.derive_mid and site in ("resid_pre", "attn_out"):
            pending = self.pending.setdefault(layer, {})
            pending[site] = tensor
            if len(pending) == 2:
                del self.pending[layer]
                self.put("resid_mid", layer, pending["resid_pre"] + pending["attn_out"])
            if site in self.skip:
                return  # recorded only to derive resid_mid
        tensor = tensor[0]  # drop the batch axis
        if site not in self.table:
            self._place(site, tensor.dtype, (len(self.layers), *tensor.shape))
        code, shape, (begin, _) = self.table[site]
        i = self.index[layer]
        if tuple(tensor.shape) != shape[1:] or _DTYPES.get(tensor.dtype) != code:
            raise LmscopeError(f"site {site!r} of layer {layer} came out {str(tensor.dtype).removeprefix('torch.')} "
                               f"{list(tensor.shape)}, unlike its other layers ({code} {list(shape[1:])})")  # fmt: skip
        data = _bytes(tensor)
        self._write_at(site, begin + i * len(data), data)
        if self.in_order[site] and i == len(self.written[site]) and i not in self.written[site]:
            self.crc[site] = zlib.crc32(data, self.crc[site])
        else:
            self.in_order[site] = False
        self.written[site].add(i)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (token ids, logits, small per-trace tensors) after the others."""
        self._place(name, tensor.dtype, tuple(tensor.shape))
        data = _bytes(tensor)
        self._write_at(name, self.table[name][2][0], data)
        self.crc[name] = zlib.crc32(data, self.crc[name])
        self.written[name] = set(range(len(self.layers)))

    def add_blocks(self, name: str, rows: int, blocks: Iterator[torch.Tensor]) -> None:
        """Write a tensor of ``rows`` rows given as consecutive blocks of rows (``[rows, ...]`` each), placed
        after the others, so that it is never whole in memory (the logits of a long input)."""
        done = 0
        for block in blocks:
            if done == 0:
                self._place(name, block.dtype, (rows, *block.shape[1:]))
            code, shape, (begin, _) = self.table[name]
            if tuple(block.shape[1:]) != shape[1:] or _DTYPES.get(block.dtype) != code or done + len(block) > rows:
                raise LmscopeError(f"{name!r} came out in blocks of unlike shapes or types")
            data = _bytes(block)
            self._write_at(name, begin + done * (len(data) // max(1, len(block))), data)
            self.crc[name] = zlib.crc32(data, self.crc[name])
            done += len(block)
        if done != rows:
            raise LmscopeError(f"{name!r} came out {done} rows long, not {rows}")
        self.written[name] = set(range(len(self.layers)))

    def _write_at(self, name: str, begin: int, data: memoryview) -> None:
        position = self.header_room + begin
        try:
            while len(data):
                n = os.pwrite(self.fd, data, position)
                data, position = data[n:], position + n
        except OSError as error:
            raise LmscopeError(f"cannot store the trace at {self.path}: {error.strerror or error} "
                               f"(writing {name!r})") from None  # fmt: skip

    # -- after the run ---------------------------------------------------------------------------

    def finish(self, metadata: Any) -> Path:
        """Write the header (``metadata(checksums)`` gives the lmscope JSON) and rename the file into place."""
        for site, done in self.written.items():
            missing = [self.layers[i] for i in range(len(self.layers)) if i not in done]
            if missing:
                raise LmscopeError(f"site {site!r} was not reached in layers {missing} (the architecture table may "
                                   "not match this model)")  # fmt: skip
        os.ftruncate(self.fd, self.header_room + self.end)  # a run with nothing after the header still ends here
        checksums = {name: self._checksum(name, code, shape, span) for name, (code, shape, span) in self.table.items()}
        text = json.dumps(metadata(checksums))
        header: dict[str, Any] = {name: {"dtype": code, "shape": list(shape), "data_offsets": list(span)}
                                  for name, (code, shape, span) in self.table.items()}  # fmt: skip
        header["__metadata__"] = {"lmscope": text, "lmscope_crc32": f"{zlib.crc32(text.encode()):08x}"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) + 8 > self.header_room:
            raise LmscopeError(f"the stored trace's header ({len(raw)} bytes) outgrew the room kept for it")
        raw += b" " * (self.header_room - 8 - len(raw))  # safetensors allows a header padded with spaces
        try:
            os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.partial, self.path)
        except OSError as error:
            raise LmscopeError(f"cannot store the trace at {self.path}: {error.strerror or error}") from None
        return self.path

    def _checksum(self, name: str, code: str, shape: tuple[int, ...], span: tuple[int, int]) -> str:
        """CRC-32 as ``_trace_file.tensor_checksum`` gives it (read back if the layers came out of order)."""
        if self.in_order[name]:
            return f"{self.crc[name]:08x}"
        crc = zlib.crc32(_head(_TORCH[code], shape))
        for begin in range(span[0], span[1], _CHUNK):
            crc = zlib.crc32(os.pread(self.fd, min(_CHUNK, span[1] - begin), self.header_room + begin), crc)
        return f"{crc:08x}"

    def abort(self) -> None:
        """Remove the partial file (an interrupted run leaves nothing behind)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)


def _head(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}".encode()


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


class _Descriptor:
    """An open file descriptor, closed when the last mapping of its file is gone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __del__(self) -> None:
        os.close(self.fd)

    def __reduce__(self) -> Any:
        raise TypeError("an open trace file cannot be copied or pickled")


class StoredTensors(Mapping[str, torch.Tensor]):
    """A trace file's tensors, memory-mapped; every access checks the file is still there and whole."""

    read_only = True  # ``Trace`` keeps this mapping as it is instead of copying it

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], size: int, handle: Any,
                 metadata: dict[str, str], whole: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.path, self._tensors, self.size, self._handle = path, tensors, size, handle
        self.metadata = metadata  # the safetensors header's metadata strings
        self.whole = tensors if whole is None else whole  # every tensor of the file
        self.spans: dict[str, tuple[int, int]] = {}  # name -> (offset in the file, bytes)

    def __reduce__(self) -> Any:
        """Copied or pickled (another process): the file is mapped again there, by its path."""
        names = {name: next(k for k, v in self.whole.items() if v is tensor) for name, tensor in self._tensors.items()}
        return _remapped, (str(self.path), names)

    def subset(self, tensors: dict[str, torch.Tensor]) -> StoredTensors:
        """Some of the file's tensors (under the names given), watched like these."""
        subset = StoredTensors(self.path, tensors, self.size, self._handle, self.metadata, self.whole)
        subset.spans = self.spans
        return subset

    def check(self) -> None:
        """Raise if the file was deleted, replaced or truncated since it was mapped."""
        stat = os.fstat(self._handle.fileno())
        if stat.st_nlink == 0:
            raise LmscopeError(f"the stored trace {self.path} was deleted or replaced while in use: trace again")
        if stat.st_size < self.size:
            raise LmscopeError(f"the stored trace {self.path} was truncated to {stat.st_size} bytes while in use "
                               f"(it holds {self.size}): trace again")  # fmt: skip

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        self.check()
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def map_file(path: Path) -> StoredTensors:
    """A safetensors file's tensors mapped copy-on-write (the file is never written), with its metadata.

    The header and the file's size are checked first, so no tensor reaches past the end.
    """
    try:
        handle = _Descriptor(os.open(path, os.O_RDONLY))  # kept while the mapping lives, to watch the file
    except OSError as error:
        raise LmscopeError(f"{path} cannot be read: {error.strerror or error}") from None
    try:
        size = os.fstat(handle.fd).st_size
        head = os.pread(handle.fd, 8, 0)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= 1 << 30:
            raise LmscopeError(f"{path} is not a safetensors file (its header length is wrong)")
        if n > size - 8:
            raise LmscopeError(f"{path} is truncated: {size} bytes, shorter than its header")
        header = json.loads(os.pread(handle.fd, n, 8))
        metadata = header.pop("__metadata__", None) or {}
        start, end = 8 + n, 8 + n
        spans = {}
        for name, entry in header.items():
            code, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
            if code not in _NUMPY or stop - begin != count * _NUMPY[code]().itemsize or begin < 0:
                raise LmscopeError(f"{path} is damaged: tensor {name!r} has a wrong size or type")
            spans[name] = (code, shape, start + begin, count)
            end = max(end, start + stop)
        if size < end:
            raise LmscopeError(f"{path} is truncated: {size} bytes of the {end} its header describes")
        memory = mmap.mmap(handle.fd, 0, access=mmap.ACCESS_COPY) if size else None
    except LmscopeError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise LmscopeError(f"{path} is not a readable trace file ({error})") from None
    tensors = {}
    for name, (code, shape, offset, count) in spans.items():
        dtype = _NUMPY[code]
        array = np.frombuffer(memory, dtype, count, offset) if count else np.empty(0, dtype)
        tensor = torch.from_numpy(array)
        if code == "BF16":
            tensor = tensor.view(torch.bfloat16)
        tensors[name] = tensor.reshape(shape)
    stored = StoredTensors(path, tensors, end, handle, metadata)
    stored.spans = {name: (offset, count * _NUMPY[code]().itemsize) for name, (code, _, offset, count) in spans.items()}
    return stored


def _remapped(path: str, names: dict[str, str]) -> StoredTensors:
    """``names`` (name in the trace -> name in the file) of the trace file at ``path``, mapped."""
    stored = map_file(Path(path))
    return stored.subset({name: stored.whole[source] for name, source in names.items()})


def scan_file(stored: StoredTensors, checksums: dict[str, str] | None, probabilities: tuple[str, ...]) -> str | None:
    """The first problem with a mapped file's tensors, read a block at a time (never mapped, so the
    process's memory stays one block): a checksum that does not match, NaN or infinite values, or
    attention probabilities outside [0, 1]; ``None`` if there is none."""
    fd = stored._handle.fileno()
    for name, tensor in stored.whole.items():
        begin, size = stored.spans[name]
        crc = zlib.crc32(_head(tensor.dtype, tuple(tensor.shape)))
        step = _CHUNK - _CHUNK % max(tensor.element_size(), 1)
        low, high = 0.0, 1.0
        for offset in range(begin, begin + size, step):
            block = os.pread(fd, min(step, begin + size - offset), offset)
            crc = zlib.crc32(block, crc)
            if tensor.dtype.is_floating_point and block:
                values = torch.frombuffer(bytearray(block), dtype=tensor.dtype)
                if not (bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())):
                    return f"tensor {name!r} holds NaN or infinite values"
                if name in probabilities:
                    low, high = min(low, float(values.min())), max(high, float(values.max()))
        if checksums is not None and name in checksums and checksums[name] != f"{crc:08x}":
            return f"tensor {name!r} does not match its checksum"
        if low < 0 or high > 1:
            return f"tensor {name!r} holds values outside [0, 1], which no attention probability takes"
    return None


def open_store(store: str | os.PathLike[str], skeleton: Any, sites: tuple[str, ...]) -> StoreWriter:
    """A writer for ``skeleton`` (a tensor-less Trace: tokens, model, layers) with ``sites``, before the run."""
    from lmscope.capture._trace_file import trace_metadata

    path = store_path(store)
    model, n_layers = skeleton.model, len(skeleton.layers)
    placeholder = (1.2345678901234567e-100,) * n_layers
    names = (*sites, "q", "k", "token_ids", "logits", "attn_mask", "attn_bias")
    meta = trace_metadata(replace(skeleton, attn_scaling=placeholder, attn_softcap=placeholder),
                          dict.fromkeys(names, "00000000"))  # fmt: skip
    reserve = len(json.dumps(meta)) + 2048 * (n_layers + 1)  # the lazy-attention recipe: a small entry per layer
    needed = estimate_bytes(model, n_layers, skeleton.n_pos, sites)
    derive_mid = "resid_mid" in sites and not model.post_norm  # as ``Recorder.stacked`` derives it
    return StoreWriter(path, skeleton.layers, skeleton.token_ids, sites, derive_mid, reserve, needed)


def stored_trace(writer: StoreWriter, skeleton: Any, extra: Mapping[str, torch.Tensor]) -> Any:
    """Write ``extra`` (the logits, per-trace tensors), finish ``writer``'s file and return ``skeleton``
    reading its tensors from it, memory-mapped."""
    from lmscope.capture._trace_file import trace_metadata

    for name, tensor in extra.items():
        writer.add(name, tensor)
    path = writer.finish(lambda checksums: trace_metadata(skeleton, checksums))
    stored = map_file(path)
    sites = writer.sites  # in the in-memory trace's order: what was added for them first, the logits last

    def rank(name: str) -> tuple[bool, bool, int]:
        return name == "logits", name in sites, sites.index(name) if name in sites else 0

    names = sorted((name for name in stored.whole if name != "token_ids"), key=rank)
    return replace(skeleton, tensors=stored.subset({name: stored.whole[name] for name in names}))


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int | float) -> int:
    """Bytes in ``4GiB``, ``500MB``, ``2G`` (binary), ``1.5e9`` or a number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        raw = str(text).strip().lower().replace(" ", "")
        digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        value, unit = (float(digits) if digits else float("nan")), raw[len(digits) :]
        if unit not in _UNITS:
            raise LmscopeError(f"{text!r} is not a size: write a number with a unit, e.g. 4GiB, 500MB or 2G")
    if not (np.isfinite(value) and value > 0):
        raise LmscopeError(f"{text!r} is not a size: it must be a positive number of bytes, e.g. 4GiB")
    return int(value * _UNITS[unit])


def trace_size(lm: Any, n_pos: int, sites: Any = None, layers: Any = None) -> int:
    """About how many bytes ``lm.trace`` of ``n_pos`` tokens with ``sites`` and ``layers`` holds."""
    from lmscope.capture._hooks import resolve_layers, resolve_sites
    from lmscope.capture._run import model_info
    from lmscope.capture._trace import DEFAULT_SITES

    loaded = getattr(lm, "loaded", lm)
    chosen = resolve_sites(sites, DEFAULT_SITES)
    n_layers = len(resolve_layers(layers, loaded.arch.n_layers))
    return estimate_bytes(model_info(loaded), n_layers, n_pos, chosen, logits=loaded.arch.lm_head is not None)


def memory_or_disk(lm: Any, n_pos: int, sites: Any, layers: Any, max_memory: int | None,
                   folder: str | os.PathLike[str] | None) -> tuple[Path | None, str]:  # fmt: skip
    """Where a trace goes under a memory limit: ``(None, "")`` in memory, else a folder to store
    it in (``folder``, or a new temporary one) and the one line that says why."""
    if max_memory is None:
        return (None, "") if folder is None else (Path(folder), "")
    size = trace_size(lm, n_pos, sites, layers)
    if size <= max_memory:
        return None, ""
    if folder is None:
        import tempfile

        folder = tempfile.mkdtemp(prefix="lmscope-trace-")
    line = (f"the trace of {n_pos} tokens would take about {_gib(size)}, over the memory limit of "
            f"{_gib(max_memory)}: it is written to {folder} and read from there")  # fmt: skip
    return Path(folder), line
