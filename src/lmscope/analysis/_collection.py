"""Storage of a corpus collection: safetensors shards plus ``collection.json``, read lazily.

Written by :func:`lmscope.collect` (see ``lmscope.analysis.collect`` for the API and the layout).
Each shard holds tensors ``"<site>.<layer>"`` ``[row, features]`` (float32) and ``"dest"`` ``[row]``,
each row's place on the concatenated token axis, so shards can hold texts in any order (collection
runs texts sorted by length) while :meth:`Collection.get` returns them in input order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.capture import ModelInfo
from lmscope.errors import LmscopeError

__all__ = ["FORMAT", "META", "VERSION", "Collection", "load_collection", "write_shard"]

FORMAT, VERSION, META = "lmscope-collection", 1, "collection.json"


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

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        where = f", {str(self.root)!r}" if self.root else ", in memory"
        return (
            f"Collection({self.model.name!r}, {len(self)} texts, {self.n_tokens} tokens, "
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


def write_shard(shard: dict[str, np.ndarray], root: Path | None, number: int) -> Any:
    """Shard ``number``: kept as is when ``root`` is None, else written to ``root`` (its path is returned)."""
    if root is None:
        return shard
    from safetensors.numpy import save_file

    path = root / f"shard-{number:05d}.safetensors"
    save_file(shard, str(path))
    return path


def load_collection(out_dir: str | os.PathLike[str]) -> Collection:
    """A collection written by :func:`collect`, read lazily (activations load on ``get``)."""
    root = Path(out_dir)
    path = root / META
    if not path.is_file():
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
