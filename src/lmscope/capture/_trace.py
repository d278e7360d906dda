"""The Trace: one record of a model run behind every analysis and view.

Axis vocabulary, used in shape comments and in saved tensor names::

    layer     a Transformer block (the captured ones, in ``Trace.layers`` order)
    pos       a token position in the sequence (prompt, then generated tokens)
    head      a query head
    kv_head   a key/value head (fewer than ``head`` under grouped-query attention)
    d_model   the residual stream
    d_head    one head's query/key/value dimension
    neuron    an MLP hidden unit (the input of the MLP's output projection)
    vocab     the tokenizer's vocabulary

Sites and their shapes (per captured layer; stacked over layers in the Trace)::

    resid_pre, resid_mid, resid_post   [layer, pos, d_model]
    attn_out, mlp_out                  [layer, pos, d_model]
    attn_probs                         [layer, head, pos_q, pos_k]
    q                                  [layer, pos, head, d_head]   (after rotary embedding)
    k, v                               [layer, pos, kv_head, d_head] (k after rotary embedding)
    mlp_act                            [layer, pos, neuron]
    position_bias                      [layer, head, pos_q, pos_k]  (T5's relative position bias)
    logits                             [pos, vocab]                 (not per layer)

``attn_probs`` (and ``cross_attn_probs``) are by default not stored but computed on demand from the
queries and keys the trace then keeps (``q``, ``k`` appear among its sites) and a per-layer recipe
(``attn_recipe``: scaling, soft-cap, mask, T5's bias; see ``_lazy_attention``): ask
``trace.attention(layer, heads=..., rows=...)`` for the part you need; ``get``/``at`` compute whole
layers. The site ``attn_probs_stored`` (``cross_attn_probs_stored``) stores them in full instead.

Encoder-decoder models (T5, BART, mBART, Marian, Pegasus) give one Trace holding both stacks.
The Trace itself is the DECODER's: ``tokens``/``token_ids`` are the decoder tokens (the decoder
start token first, then the teacher-forced target, then generated tokens), ``n_input`` counts the
tokens given (start token plus target prefix), ``logits`` is ``[pos, vocab]`` over decoder
positions and ``model.stack == "decoder"``. ``trace.encoder`` is a Trace of the ENCODER stack
with the same site names over the source tokens (``tokens`` = source tokens, no logits,
``model.stack == "encoder"``); it is ``None`` for decoder-only and encoder-only models, whose
``model.stack`` is ``""``. ``pos`` is a decoder position below, ``enc_pos`` an encoder one.

A decoder block is self-attention, cross-attention, FFN::

    resid_pre --(+attn_out)--> resid_mid --(+cross_attn_out)--> resid_cross --(+mlp_out)--> resid_post

exactly for pre-norm stacks (T5, mBART, Pegasus: ``resid_post = resid_pre + attn_out +
cross_attn_out + mlp_out``); post-norm stacks (BART, Marian) normalize after each sum, and
``resid_mid`` / ``resid_cross`` are the norms' outputs. Decoder-only sites::

    resid_cross, cross_attn_out        [layer, pos, d_model]
    cross_attn_probs                   [layer, head, pos, enc_pos]
    cross_q                            [layer, pos, head, d_head]
    cross_k, cross_v                   [layer, enc_pos, kv_head, d_head]

``attn_probs`` of the decoder is its causal self-attention; ``mlp_act`` is the input of T5's
``wo`` / BART's ``fc2``. T5 does not scale ``q·kᵀ`` (``attn_scaling`` 1.0) and adds a relative
position bias, recorded as ``position_bias`` (optional site) on the stack that uses it, so
``softmax(q·kᵀ·scaling + position_bias + mask)`` reproduces its attention. Trace files store the
encoder's tensors as ``encoder.<site>`` and its tokens in the metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from lmscope.errors import LmscopeError

__all__ = ["ALL_SITES", "CROSS_SITES", "DEFAULT_SITES", "SEQ2SEQ_SITES", "ModelInfo", "Trace"]

DEFAULT_SITES: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "attn_probs",
    "v",
    "mlp_act",
)
SEQ2SEQ_SITES: tuple[str, ...] = ("resid_cross", "cross_attn_out", "cross_attn_probs", "cross_v")
"""Added to the defaults for the decoder of an encoder-decoder model."""
CROSS_SITES: tuple[str, ...] = (*SEQ2SEQ_SITES, "cross_q", "cross_k")
"""Sites only a decoder with cross-attention has."""
ALL_SITES: tuple[str, ...] = (*DEFAULT_SITES, "q", "k", "position_bias", *CROSS_SITES)


@dataclass(frozen=True)
class ModelInfo:
    """What a Trace needs to know about the model that produced it."""

    name: str
    model_type: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    vocab_size: int
    parallel: bool
    post_norm: bool
    dtype: str
    n_neurons: int | None = None  # MLP hidden units (None in trace files of format 1)
    stack: str = ""  # "encoder" / "decoder" for a stack of an encoder-decoder model, else ""

    def mismatch(self, other: ModelInfo) -> str | None:
        """A description of how ``other`` differs in ways that matter (tensor shapes), or ``None``."""
        keys = ("model_type", "stack", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "vocab_size",
                "n_neurons")  # fmt: skip
        diffs = [
            f"{k} {getattr(self, k)} vs {getattr(other, k)}"
            for k in keys
            if getattr(self, k) != getattr(other, k) and None not in (getattr(self, k), getattr(other, k))
        ]
        return ", ".join(diffs) or None


@dataclass(frozen=True)
class Trace:
    """Token ids and strings, model identity, and captured tensors of one run.

    ``tensors`` maps a site name (see the module docstring) to a tensor whose first axis runs
    over ``layers``; ``logits`` is ``[pos, vocab]``. Tensors stay on the device they were
    captured on; :meth:`save` moves copies to the CPU.
    """

    token_ids: torch.Tensor  # [pos]
    tokens: tuple[str, ...]
    n_input: int
    model: ModelInfo
    layers: tuple[int, ...]
    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    # The factor the attention function multiplied q·kᵀ by, per captured layer (empty when no
    # attention site was captured): head_dim^-0.5 on most families, 1.0 where q comes pre-scaled (OPT).
    attn_scaling: tuple[float, ...] = ()
    # Logit soft-capping per captured layer (Gemma 2: tanh(s / c) · c), None where not used.
    attn_softcap: tuple[float | None, ...] = ()
    # Where the second text of a sentence pair (``text_pair``, BERT's segment B) begins, if any.
    segment_b: int | None = None
    # The interventions applied during the run (plain descriptions: site, op, layers, positions,
    # heads, neurons, keys, scale, source); empty for a plain run. See ``capture._interventions``.
    interventions: tuple[Mapping[str, Any], ...] = ()
    # Encoder-decoder models: the encoder stack's Trace over the source tokens (this one is the decoder's).
    encoder: Trace | None = None
    # Attention kept as q/k (the default): per kind ("self", "cross") one recipe entry per captured layer
    # (scaling, soft-cap, mask, bias: see ``capture._lazy_attention``); None where probabilities are stored.
    attn_recipe: Mapping[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not getattr(self.tensors, "read_only", False):  # a stored trace's mapped tensors stay as they are
            object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def sites(self) -> tuple[str, ...]:
        """Captured sites; ``attn_probs`` (``cross_attn_probs``) also where they are computed on demand."""
        from lmscope.capture._lazy_attention import INTERNAL_SITES, KINDS, PROBS_SITE, is_lazy

        lazy = tuple(PROBS_SITE[kind] for kind in KINDS if is_lazy(self, kind))
        return tuple(s for s in self.tensors if s != "logits" and s not in INTERNAL_SITES) + lazy

    def attention(
        self, layer: int, heads: Any = None, rows: Any = None, *, cross: bool = False, stack: str | None = None
    ) -> torch.Tensor:  # [head, rows, pos_k] float32
        """Attention probabilities of ``layer`` for ``heads`` and query ``rows`` (ints, lists or slices; all if
        None), computed from the stored queries and keys in bounded blocks, or sliced from stored ones.

        ``cross=True``: the decoder's cross-attention (keys over encoder positions); ``stack="encoder"``:
        the encoder stack's self-attention. Equal to the probabilities a trace with the site
        ``attn_probs_stored`` holds (the same function computes them).
        """
        from lmscope.capture._lazy_attention import attention

        return attention(self.stack(stack), layer, heads, rows, "cross" if cross else "self")

    @property
    def logits(self) -> torch.Tensor:
        return self.get("logits")

    def get(self, site: str) -> torch.Tensor:
        """The tensor of ``site`` over all captured layers, or a clear error if not captured.

        ``attn_probs`` of a trace that keeps attention as q/k is computed here, whole (refused above
        ``_lazy_attention.MATERIALIZE_LIMIT`` bytes: ask :meth:`attention` for the part you need).
        """
        if site in ("attn_probs", "cross_attn_probs") and site in self.sites and site not in self.tensors:
            from lmscope.capture._lazy_attention import materialize

            return materialize(self, "cross" if site == "cross_attn_probs" else "self")
        if site not in self.tensors:
            if self.model.n_heads == 0 and site in ("attn_probs", "v", "q", "k", "attn_out", "resid_mid"):
                raise LmscopeError(f"{self.model.name} has no attention (a state-space model), so no {site!r}: "
                                   "the logit lens, rankings, saliency and activations apply to it")  # fmt: skip
            captured = ", ".join(self.tensors) or "nothing"
            raise LmscopeError(
                f"this trace did not capture {site!r} (it has {captured}): trace again with sites including {site!r}"
            )
        return self.tensors[site]

    def layer_index(self, layer: int) -> int:
        """Index into the stacked layer axis for model layer ``layer`` (negative counts back)."""
        if layer < 0:
            layer += self.model.n_layers
        if layer not in self.layers:
            raise LmscopeError(
                f"layer {layer} is out of range or was not captured "
                f"(captured layers: {_ranges(self.layers)} of {self.model.n_layers})"
            )
        return self.layers.index(layer)

    def at(self, site: str, layer: int) -> torch.Tensor:
        """One layer of a site: ``trace.at("resid_post", 3)`` is ``[pos, d_model]``."""
        if site in ("attn_probs", "cross_attn_probs") and site in self.sites and site not in self.tensors:
            from lmscope.capture._lazy_attention import materialize

            return materialize(self, "cross" if site == "cross_attn_probs" else "self", layer)
        return self.get(site)[self.layer_index(layer)]

    def position(self, position: int) -> int:
        """A position made non-negative and checked against the sequence."""
        n = self.n_pos
        if not -n <= position < n:
            raise LmscopeError(f"position {position} is out of range for {n} tokens (use 0..{n - 1} or -1)")
        return position % n

    @property
    def is_seq2seq(self) -> bool:
        """Whether this is the decoder Trace of an encoder-decoder model (``encoder`` holds the other stack)."""
        return self.encoder is not None

    def stack(self, name: str | None) -> Trace:
        """The Trace of one stack: ``"decoder"`` (or ``None``) is this one, ``"encoder"`` the encoder's."""
        if name in (None, "decoder", ""):
            return self
        if name == "encoder":
            if self.encoder is None:
                raise LmscopeError(
                    f"{self.model.name} is not an encoder-decoder model: this trace has no encoder stack "
                    "(leave stack out, or use stack='decoder')"
                )
            return self.encoder
        raise LmscopeError(f"unknown stack {name!r}: use 'encoder' or 'decoder'")

    @property
    def stored(self) -> Path | None:
        """The file a disk-backed trace reads its tensors from (``lm.trace(..., store=...)``), else ``None``."""
        return getattr(self.tensors, "path", None)

    def nbytes(self) -> int:
        """Memory held by the captured tensors (both stacks)."""
        return _held_bytes(self.tensors.values()) + (self.encoder.nbytes() if self.encoder is not None else 0)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file: the tensors with checksums, plus JSON metadata with tokens and
        model info (read it with :func:`lmscope.load_trace`, which checks all of it)."""
        from lmscope.capture._trace_file import save_trace

        return save_trace(self, path)


def _held_bytes(tensors: Any) -> int:
    """Bytes of ``tensors``, counting once what views of one buffer share (``resid_pre`` and
    ``resid_post`` overlap in all but one layer)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    total = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        if not t.is_contiguous() or t.device.type == "meta":
            total += size
            continue
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + size))
    for ranges in spans.values():
        end = None
        for lo, hi in sorted(ranges):
            if end is None or lo >= end:
                total += hi - lo
                end = hi
            elif hi > end:
                total += hi - end
                end = hi
    return total


def _ranges(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    if list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
