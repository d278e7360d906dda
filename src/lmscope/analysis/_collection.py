"""Storage of a corpus collection: safetensors shards plus ``collection.json``, read lazily.

Written by :func:`lmscope.collect` (see ``lmscope.analysis.collect`` for the API and the layout).
Each shard holds tensors ``"<site>.<layer>"`` ``[row, features]`` (float32) and ``"dest"`` ``[row]``,
each row's place on the concatenated token axis, so shards can hold texts in any order (collection
runs texts sorted by length) while :meth:`Collection.get` returns them in input order.

Every file is written atomically (a temporary name, then a rename: :mod:`lmscope._files`), and the
manifest ``collection.json`` is written last, so a folder holds a loadable collection exactly when the
manifest is there. While a collection is being written, ``collection.partial.json`` records the run's
plan (a hash of the model, sites, layers, batching and token ids) and the shards finished so far; a
collection that stopped half-way (an error, a full disk, Ctrl+C) resumes from there when ``collect``
runs again with the same texts and settings, or is discarded with ``restart=True``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.capture import ModelInfo
from lmscope.errors import LmscopeError

__all__ = ["FORMAT", "META", "PARTIAL", "VERSION", "Collection", "load_collection", "write_json", "write_shard"]

FORMAT, VERSION, META = "lmscope-collection", 1, "collection.json"
PARTIAL = "collection.partial.json"  # the record of a collection being written (gone once it is complete)


class Collection:
    """Per-token activations of a corpus (the API is documented in ``lmscope.analysis.collect``)."""

    def __init__(self, meta: dict[str, Any], shards: list[Any], root: Path | None = None):
        self._meta, self._shards, self.root = meta, shards, root
        self.texts: tuple[str, ...] = tuple(meta["texts"])
        self.token_ids: list[list[int]] = [list(ids) for ids in meta["token_ids"]]
        self.tokens: list[list[str]] = [list(t) for t in meta["tokens"]]
        lengths = np.array([len(ids) for ids in self.token_ids], dtype=np.int64)
        self.offsets: list[int] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
        self.n_tokens = int(lengths.sum())
        self.sites: tuple[str, ...] = tuple(meta["sites"])
        self.layers: tuple[int, ...] = tuple(meta["layers"])
        self.features: dict[str, int] = dict(meta["features"])
        self.model = ModelInfo(**meta["model"])
        # an encoder-decoder model's stack ("encoder"/"decoder"; "" for a model of one stack); model describes it
        self.stack: str = meta.get("stack") or self.model.stack
        targets, sources = meta.get("targets"), meta.get("source_token_ids")
        self.targets: tuple[str, ...] | None = None if targets is None else tuple(targets)
        self.source_token_ids: list[list[int]] | None = None if sources is None else [list(s) for s in sources]

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        where = f", {str(self.root)!r}" if self.root else ", in memory"
        stack = f", stack={self.stack!r}" if self.stack else ""
        return (
            f"Collection({self.model.name!r}{stack}, {len(self)} texts, {self.n_tokens} tokens, "
            f"sites={list(self.sites)}, layers={len(self.layers)}{where})"
        )

    def span(self, index: int) -> slice:
        """Text ``index``'s rows on the concatenated token axis."""
        start = self.offsets[index]
        return slice(start, start + len(self.token_ids[index]))

    @property
    def all_tokens(self) -> list[str]:
        """Token strings of every text, concatenated (aligned with ``get``'s rows)."""
        return [t for tokens in self.tokens for t in tokens]

    def run_nmf(
        self, n_components: int = 8, from_layer: int | None = None, to_layer: int | None = None, **options: Any
    ) -> Any:
        """NMF (or ``method="pca"``/``"ica"``) over the whole corpus: see :func:`lmscope.analysis.factorize`."""
        from lmscope.analysis.neurons import factorize

        return factorize(self, n_components, from_layer, to_layer, **options)

    def layer_similarity(self, method: str = "cka", **options: Any) -> Any:
        """Similarity of every layer pair over the corpus: see :func:`lmscope.analysis.layer_similarity`."""
        from lmscope.analysis.layer_similarity import layer_similarity

        return layer_similarity(self, method, **options)

    def shards(self, names: Any, order: Any = None) -> Any:
        """Each shard in turn (or shards ``order``) as ``{name: [row, ...]}`` for ``names`` (``"<site>.<layer>"``,
        ``"dest"``); one shard is in memory at a time (the streaming analyses read collections this way)."""
        for shard in self._shards if order is None else [self._shards[int(i)] for i in order]:
            if isinstance(shard, dict):
                yield {name: shard[name] for name in names}
            else:
                from safetensors import safe_open

                with safe_open(str(shard), framework="np") as handle:
                    yield {name: handle.get_tensor(name) for name in names}

    def pieces(self, names: Any, rows: int) -> Any:
        """Each shard in turn as ``(shard number, {name: [row, ...]})`` pieces of at most ``rows`` rows.

        A piece is read from the file with plain reads at its byte offsets (no memory map is kept), so
        memory is one piece however large the collector made its shards.
        """
        for number, shard in enumerate(self._shards):
            if isinstance(shard, dict):
                for start in range(0, len(shard["dest"]), rows):
                    yield number, {name: shard[name][start : start + rows] for name in names}
                continue
            with open(shard, "rb") as file:
                (size,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(size))
                for start in range(0, int(header["dest"]["shape"][0]), rows):
                    yield number, {name: _read_rows(file, 8 + size, header[name], start, rows) for name in names}

    def get(
        self, site: str, layer: int, *, positions: Any = None, skip_first: bool = False
    ) -> np.ndarray:  # [n_tokens, features], float32
        """Activations of ``site`` at model layer ``layer`` for every token, texts in input order.

        ``positions`` (ints or a slice, within each text) or ``skip_first=True`` keep only those rows.
        """
        if site not in self.sites:
            raise LmscopeError(f"this collection has sites {', '.join(self.sites)}, not {site!r}: collect it again")
        if layer < 0:
            layer += self.model.n_layers
        if layer not in self.layers:
            raise LmscopeError(f"layer {layer} was not collected (collected layers: {list(self.layers)})")
        out = np.empty((self.n_tokens, self.features[site]), dtype=np.float32)
        name = f"{site}.{layer}"
        for shard in self._shards:
            if isinstance(shard, dict):
                out[shard["dest"]] = shard[name]
            else:
                from safetensors import safe_open

                with safe_open(str(shard), framework="np") as handle:
                    out[handle.get_tensor("dest")] = handle.get_tensor(name)
        if positions is None and not skip_first:
            return out
        from lmscope.analysis._positions import select_rows

        rows, _ = select_rows([len(ids) for ids in self.token_ids], positions, skip_first)
        return out if rows is None else out[rows]


def write_shard(parts: list[dict[str, np.ndarray]], root: Path | None, number: int) -> Any:
    """Shard ``number`` from buffered ``parts`` (each ``name -> [row, ...]``, the same names in each).

    With ``root`` None the parts are concatenated and kept in memory; else they are streamed into
    ``root/shard-NNNNN.safetensors`` part by part (no concatenated copy is made, so memory stays at
    the buffered parts), atomically, and the path is returned.
    """
    if root is None:
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    from lmscope._files import write_with

    def write(temporary: Path) -> None:
        with open(temporary, "xb") as file:
            _stream_safetensors(parts, file)
            file.flush()
            os.fsync(file.fileno())

    return write_with(root / f"shard-{number:05d}.safetensors", write)


_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32"}


def _stream_safetensors(parts: list[dict[str, np.ndarray]], file: Any) -> None:
    """Write the row-wise concatenation of ``parts`` in the safetensors format (an 8-byte little-endian
    header length, a JSON header of dtypes, shapes and byte offsets, then each tensor's bytes in order)."""
    header: dict[str, Any] = {}
    offset = 0
    for name in parts[0]:
        arrays = [part[name] for part in parts]
        nbytes = sum(a.nbytes for a in arrays)
        shape = [sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]]
        header[name] = {
            "dtype": _DTYPES[arrays[0].dtype.name],
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    file.write(struct.pack("<Q", len(text)) + text)
    for name in parts[0]:
        for part in parts:
            array = np.ascontiguousarray(part[name], dtype=part[name].dtype.newbyteorder("<"))
            file.write(memoryview(array).cast("B"))


def _read_rows(file: Any, base: int, info: dict[str, Any], start: int, rows: int) -> np.ndarray:
    """Rows ``start:start + rows`` of the safetensors tensor ``info`` (its header entry; data from byte ``base``)."""
    dtype = np.dtype({code: name for name, code in _DTYPES.items()}[info["dtype"]]).newbyteorder("<")
    shape = info["shape"]
    out = np.empty((max(0, min(rows, shape[0] - start)), *shape[1:]), dtype=dtype)
    file.seek(base + info["data_offsets"][0] + start * (out[0].nbytes if out.size else 0))
    if out.size and file.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise LmscopeError(f"{file.name} is truncated: collect again")
    return out


def write_json(path: Path, data: Any) -> Path:
    """``data`` as JSON in ``path``, written atomically."""
    from lmscope._files import write_atomic

    return write_atomic(path, json.dumps(data, ensure_ascii=False))


def load_collection(out_dir: str | os.PathLike[str]) -> Collection:
    """A collection written by :func:`collect`, read lazily (activations load on ``get``)."""
    root = Path(out_dir)
    path = root / META
    if not path.is_file():
        if (root / PARTIAL).is_file():
            raise LmscopeError(
                f"{root} holds an unfinished collection: run lmscope.collect again with the same texts and "
                "settings to finish it (or with restart=True to start over)"
            )
        raise LmscopeError(f"{root} holds no lmscope collection ({META} not found): run lmscope.collect first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError("wrong format marker")
        if meta.get("version", 0) > VERSION:
            raise LmscopeError(f"{root} was written by a newer lmscope (collection format {meta['version']})")
        shards = [root / name for name in meta["shards"]]
    except LmscopeError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise LmscopeError(f"{path} is damaged ({error})") from error
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise LmscopeError(f"{root} is missing shard files {', '.join(missing)}: collect again")
    return Collection(meta, shards, root)
