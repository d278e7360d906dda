"""Attention kept as what it is computed from, and its probabilities computed on demand.

Attention probabilities grow with the square of the length (``[layer, head, pos_q, pos_k]``: 1.1 GB
of float32 for the embedded model at 1,024 tokens, 72 GB at 8,192), while the queries and keys they
are computed from grow linearly. So by default a Trace keeps, per captured layer, the post-rotary
queries ``q [pos, head, d_head]`` and keys ``k [pos, kv_head, d_head]`` exactly as the model's
attention function received them, plus a *recipe*: the scaling, the soft-cap, which mask (and which
relative position bias, for T5) the layer used. Masks are stored once however many layers share
them, as booleans (``attn_mask [mask, pos_q, pos_k]``, True = attended) with the fill value an
additive mask used, or as the word ``"causal"`` / ``"full"`` when they are just that; T5's position
bias is stored once per stack (``attn_bias [bias, head, pos_q, pos_k]``). :func:`attention` then
rebuilds exactly the mask rows asked for and calls the same
:func:`~lmscope.capture._attention.attention_probs` capture used to call for the whole layer, so the
probabilities are the ones a trace that stored them holds, for just the layers, heads and query rows
asked for, computed in blocks of bounded size. Blocks of rows go through the same matrix-product
kernel as the whole layer (blocks of fewer than ``_MIN_ROWS`` rows are padded, as CPU BLAS switches
kernels for tiny products), which gives identical bits on the CPU builds tested here; another BLAS or
a GPU may differ from stored probabilities by float rounding (~1e-7).

A layer whose mask or bias cannot be described this way (a per-head mask, an additive mask with
more than two values such as ALiBi, a family that computes its own attention) makes the recorder
store that stack's probabilities instead (see :meth:`Book.fallback`); such a trace simply holds
``attn_probs`` as before.

A recipe entry (JSON, saved in trace files)::

    {"scaling": float, "softcap": float | None,
     "mask": None | "causal" | "full" | int,   # int: index into attn_mask
     "fill": None | float,                     # None: a boolean mask; else the additive mask's fill value
     "mask_dtype": None | str,                 # the additive mask's dtype
     "bias": None | int}                       # index into attn_bias
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lmscope.capture._attention import attention_probs
from lmscope.errors import LmscopeError

__all__ = [
    "BIAS_SITE",
    "INTERNAL_SITES",
    "KINDS",
    "MASK_SITE",
    "MATERIALIZE_LIMIT",
    "PROBS_SITE",
    "QK_SITES",
    "Book",
    "attention",
    "compute",
    "is_lazy",
    "materialize",
]

KINDS = ("self", "cross")
PROBS_SITE = {"self": "attn_probs", "cross": "cross_attn_probs"}
QK_SITES = {"self": ("q", "k"), "cross": ("cross_q", "cross_k")}
MASK_SITE = {"self": "attn_mask", "cross": "cross_attn_mask"}
BIAS_SITE = {"self": "attn_bias", "cross": "cross_attn_bias"}
INTERNAL_SITES = frozenset({*MASK_SITE.values(), *BIAS_SITE.values()})
"""Tensors of a lazy trace that are no site of their own (they serve ``attention``)."""

MATERIALIZE_LIMIT = 4 * 2**30
"""``trace.get("attn_probs")`` of a lazy trace refuses above this many bytes (use ``trace.attention``)."""
_BLOCK_BYTES = 32 * 2**20  # the scores of one block of query rows, all heads asked for
# CPU matrix products of fewer than 4 rows take another kernel, whose sums can differ in the last bit from
# a whole layer's: a block of fewer rows is padded to this many (see ``compute``).
_MIN_ROWS = 8
_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class _Stub:
    """What ``attention_probs`` reads of the module: the mask is always passed explicitly."""

    is_causal = False


class Book:
    """What one kind of attention (``"self"`` or ``"cross"``) of one stack needs, collected during the run."""

    def __init__(self) -> None:
        self.entries: dict[int, dict[str, Any]] = {}  # layer -> recipe entry
        self.masks: list[torch.Tensor] = []  # [pos_q, pos_k] bool
        self.biases: list[torch.Tensor] = []  # [head, pos_q, pos_k]
        self._bias_index: dict[tuple[Any, ...], int] = {}
        self.fallback = False  # some layer could not be described: store probabilities instead

    def add(self, layer: int, module: Any, query: torch.Tensor, key: torch.Tensor, mask, kwargs) -> bool:
        """Record layer ``layer``'s recipe; False (and ``fallback`` set) if it cannot be described."""
        entry = _describe(self, module, query, key, mask, kwargs)
        if entry is None:
            self.fallback = True
            return False
        self.entries[layer] = entry
        return True

    def add_mask(self, keep: torch.Tensor) -> int:
        for i, known in enumerate(self.masks):
            if known.shape == keep.shape and torch.equal(known, keep):
                return i
        self.masks.append(keep)
        return len(self.masks) - 1

    def add_bias(self, bias: torch.Tensor) -> int:
        key = (bias.data_ptr(), tuple(bias.shape), tuple(bias.stride()), bias.dtype)
        if key in self._bias_index:  # T5 hands every layer of a stack the same tensor
            return self._bias_index[key]
        for i, known in enumerate(self.biases):
            if known.shape == bias.shape and known.dtype == bias.dtype and torch.equal(known, bias):
                return i
        self.biases.append(bias)  # kept, so its address is not reused while the key is known
        self._bias_index[key] = len(self.biases) - 1
        return len(self.biases) - 1

    def tensors(self, kind: str, keep: Any) -> dict[str, torch.Tensor]:
        """The mask and bias tensors to store (``keep``: detaches and moves to the capture device)."""
        out = {}
        if self.masks:
            out[MASK_SITE[kind]] = keep(torch.stack(self.masks))  # [mask, pos_q, pos_k]
        if self.biases:
            out[BIAS_SITE[kind]] = keep(torch.stack(self.biases))  # [bias, head, pos_q, pos_k]
        return out

    def recipe(self, layers: Iterable[int]) -> list[dict[str, Any]]:
        return [self.entries[layer] for layer in layers]


def _describe(book: Book, module, query, key, mask, kwargs) -> dict[str, Any] | None:
    if query.shape[0] != 1:
        return None  # one sequence per trace
    n_q, n_k = query.shape[-2], key.shape[-2]
    scaling = kwargs.get("scaling")
    entry: dict[str, Any] = {
        "scaling": float(query.shape[-1] ** -0.5 if scaling is None else scaling),
        "softcap": float(kwargs["softcap"]) if kwargs.get("softcap") else None,
        "mask": None,
        "fill": None,
        "mask_dtype": None,
        "bias": None,
    }
    bias = kwargs.get("position_bias")
    if bias is not None:
        if bias.ndim != 4 or bias.shape[0] != 1 or tuple(bias.shape[1:]) != (query.shape[1], n_q, n_k):
            return None
        entry["bias"] = book.add_bias(bias.detach()[0])
    if mask is None:
        if getattr(module, "is_causal", False) and n_q > 1:
            entry["mask"] = "causal"
        return entry
    mask = mask[..., :n_k]
    if mask.ndim != 4 or tuple(mask.shape[:2]) != (1, 1) or mask.shape[-1] != n_k or mask.shape[-2] not in (1, n_q):
        return None
    mask = mask.detach()[0, 0].expand(n_q, n_k)  # [pos_q, pos_k]
    if mask.dtype == torch.bool:
        keep = mask
    else:
        low = mask.min()
        fill = float(low) if bool(low < 0) else float(torch.finfo(mask.dtype).min)
        keep = mask == 0
        if not bool((keep | (mask == fill)).all()):
            return None  # an additive mask with values besides 0 and the fill (ALiBi): not described
        entry["fill"], entry["mask_dtype"] = fill, str(mask.dtype).removeprefix("torch.")
    if bool(keep.all()):
        entry["mask"] = "full"
    elif n_q > 1 and torch.equal(keep, _causal(torch.arange(n_q, device=keep.device), n_q, n_k)):
        entry["mask"] = "causal"
    else:
        entry["mask"] = book.add_mask(keep.contiguous())
    return entry


def _causal(rows: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:  # [rows, pos_k] bool
    """Rows of the causal mask of ``n_q`` queries over ``n_k`` keys (the last query sees every key)."""
    return torch.arange(n_k, device=rows.device)[None, :] <= (rows[:, None] + (n_k - n_q))


def is_lazy(trace: Any, kind: str = "self") -> bool:
    """Whether ``trace`` computes this kind of attention on demand (it holds q/k and a recipe)."""
    recipe = trace.attn_recipe
    return bool(recipe) and kind in recipe and PROBS_SITE[kind] not in trace.tensors


def _indices(value: int | Sequence[int] | torch.Tensor | slice | None, n: int, what: str) -> torch.Tensor:
    if value is None:
        return torch.arange(n)
    if isinstance(value, slice):
        return torch.arange(n)[value]
    index = torch.as_tensor(value, dtype=torch.long).reshape(-1)
    if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
        bad = int(index.min()) if int(index.min()) < -n else int(index.max())
        raise LmscopeError(f"{what} {bad} is out of range: there are {n} (0..{n - 1})")
    return index % n


def attention(
    trace: Any,
    layer: int,
    heads: int | Sequence[int] | slice | None = None,
    rows: int | Sequence[int] | slice | None = None,
    kind: str = "self",
) -> torch.Tensor:  # [head, rows, pos_k] float32
    """Attention probabilities of model layer ``layer`` for ``heads`` and query ``rows`` (all by default).

    Sliced from stored probabilities, or computed from q and k by the function capture uses, in
    blocks of query rows, so that no more than the result and one block of scores is ever held.
    """
    if kind not in KINDS:
        raise LmscopeError(f"unknown attention {kind!r}: use 'self' or 'cross'")
    probs_site = PROBS_SITE[kind]
    if kind == "cross" and not trace.is_seq2seq:
        raise LmscopeError(f"{trace.model.name} has no cross-attention: leave cross out")
    index = trace.layer_index(layer)
    head_index = _indices(heads, trace.model.n_heads, "head")
    if not is_lazy(trace, kind):
        probs = trace.tensors.get(probs_site)
        if probs is None:
            trace.get(probs_site)  # the clear error: not captured
        probs = probs[index]  # [head, pos_q, pos_k]
        row_index = _indices(rows, probs.shape[1], "query row")
        return probs[head_index.to(probs.device)][:, row_index.to(probs.device)].float()
    q_site, k_site = QK_SITES[kind]
    query = trace.tensors[q_site][index]  # [pos_q, head, d_head]
    row_index = _indices(rows, query.shape[0], "query row")
    return compute(
        query,
        trace.tensors[k_site][index],
        trace.attn_recipe[kind][index],
        trace.tensors.get(MASK_SITE[kind]),
        trace.tensors.get(BIAS_SITE[kind]),
        head_index,
        row_index,
    )


def compute(
    query: torch.Tensor,  # [pos_q, head, d_head]
    key: torch.Tensor,  # [pos_k, kv_head, d_head]
    entry: Mapping[str, Any],
    masks: torch.Tensor | None,  # [mask, pos_q, pos_k] bool
    biases: torch.Tensor | None,  # [bias, head, pos_q, pos_k]
    heads: torch.Tensor,  # head indices
    rows: torch.Tensor,  # query row indices
) -> torch.Tensor:  # [head, rows, pos_k] float32
    """One layer's probabilities from its recipe ``entry``, by ``attention_probs``, in blocks of rows."""
    n_q, n_k = query.shape[0], key.shape[0]
    groups = query.shape[1] // key.shape[1]
    device = query.device
    keys = key[:, (heads // groups).to(key.device)].transpose(0, 1)[None].to(device)  # [1, head, pos_k, d_head]
    bias = None
    if entry["bias"] is not None:
        bias = biases[entry["bias"]][heads.to(biases.device)]  # [head, pos_q, pos_k]
    out = torch.empty(len(heads), len(rows), n_k, dtype=torch.float32, device=device)
    block = max(1, _BLOCK_BYTES // max(1, 4 * len(heads) * n_k))
    kwargs: dict[str, Any] = {"scaling": entry["scaling"], "softcap": entry["softcap"]}
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        n = len(chunk)
        if n < _MIN_ROWS:  # few rows: padded with others, computed by the same kernel as a whole layer
            chunk = torch.arange(n_q) if n_q <= _MIN_ROWS else torch.cat([chunk, torch.arange(_MIN_ROWS)])
        q = query[chunk.to(device)][:, heads.to(device)].transpose(0, 1)[None]  # [1, head, rows, d_head]
        if bias is not None:
            kwargs["position_bias"] = bias[:, chunk.to(bias.device)][None].to(device)  # [1, head, rows, pos_k]
        mask = _mask_rows(masks, entry, chunk, n_q, n_k)
        mask = None if mask is None else mask.to(device)
        probs = attention_probs(_Stub(), q, keys, mask, kwargs)[0]  # [head, rows, pos_k]
        out[:, start : start + n] = (
            probs[:, rows[start : start + n]] if n_q <= _MIN_ROWS and n < _MIN_ROWS else probs[:, :n]
        )
    return out


def _mask_rows(masks: torch.Tensor | None, entry: Mapping[str, Any], rows: torch.Tensor, n_q: int, n_k: int):
    """The mask ``attention_probs`` was given, rows ``rows`` of it: ``[1, 1, rows, pos_k]`` (or None)."""
    which = entry["mask"]
    if which is None:
        return None
    if which == "causal":
        keep = _causal(rows, n_q, n_k)
    elif which == "full":
        keep = torch.ones(len(rows), n_k, dtype=torch.bool)
    else:
        keep = masks[which][rows.to(masks.device)]
    if entry["fill"] is None:
        return keep[None, None]
    dtype = _FLOATS[entry["mask_dtype"]]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, entry["fill"])[None, None]


def materialize(trace: Any, kind: str = "self", layer: int | None = None) -> torch.Tensor:
    """``attn_probs`` of a lazy trace as a stored one held it: ``[layer, head, pos_q, pos_k]`` in the model's
    dtype (one layer: ``[head, pos_q, pos_k]``), or a clear error above :data:`MATERIALIZE_LIMIT` bytes."""
    q_site, k_site = QK_SITES[kind]
    n_layers = 1 if layer is not None else len(trace.layers)
    n_q, n_k = trace.tensors[q_site].shape[1], trace.tensors[k_site].shape[1]
    dtype = trace.tensors[q_site].dtype
    size = n_layers * trace.model.n_heads * n_q * n_k * max(4, torch.empty((), dtype=dtype).element_size())
    if size > MATERIALIZE_LIMIT:
        raise LmscopeError(
            f"{PROBS_SITE[kind]} of {n_layers} layer(s) at {n_q} x {n_k} positions would take "
            f"{size / 2**30:.1f} GiB: ask for the layers, heads and query rows you need with "
            f"trace.attention(layer, heads=..., rows=...), which computes them from the stored queries and keys"
        )
    if layer is not None:
        return attention(trace, layer, kind=kind).to(dtype)
    return torch.stack([attention(trace, lay, kind=kind).to(dtype) for lay in trace.layers])
