"""Cross-attention rewritten for batched gradient passes, so that the encoder's keys and values are not differentiated.

In an encoder-decoder model, decoder position ``t`` reads the encoder output ``E [src_pos,
d_model]`` through each cross-attention's keys ``K = E·W_kᵀ + b_k`` and values ``V = E·W_vᵀ + b_v``.
Autograd pulls a target's cotangent back to ``E`` through ``dK`` and ``dV``, each ``[src_pos,
d_model]``: ``dE = dK·W_k + dV·W_v``, two ``[src_pos, d_model] @ [d_model, d_model]`` products per
layer and target (on a t5-small-sized model, 128 source positions: 0.4 G multiply-adds per
target, a seventh of the whole pass). Yet ``dK`` and ``dV`` have rank at most the number of
decoder positions ``t``: per head ``h``, ``dK_h = dS_hᵀ·q_h`` and ``dV_h = P_hᵀ·dout_h`` (``S`` the
scores, ``P`` the probabilities). Associating the products the other way round,

``S_h = (q_h·W_k,h)·Eᵀ + q_h·b_k,h`` and ``out_h = (P_h·E)·W_v,hᵀ + b_v,h``

(the bias terms use ``Σ_k P_hk = 1``), the backward gives ``dE = Σ_h dS_hᵀ·(q_h·W_k,h) +
P_hᵀ·(dout_h·W_v,h)``, products with ``heads · t`` inner terms instead of ``d_model``. Both are
computed with the heads stacked along one axis, so each is one product per target.

The forward values stay the eager ones bit for bit: the scores are eager's ``q·Kᵀ·scale`` with
``K`` held fixed, plus ``T − T.detach()`` (exactly zero) for ``T = (q·W_k)·Eᵀ·scale`` computed
with ``q`` held fixed, so autograd takes ``dq`` from the first term and ``dE`` from the second;
the output is eager's ``P·V`` with ``V`` held fixed, plus the same zero built from ``(P·E)·W_vᵀ``
with ``P`` held fixed. :func:`attention` checks on every call that ``T`` and ``(P·E)·W_vᵀ`` (with
the biases) equal eager's scores and output to float32 rounding, and uses the family's eager
function where they do not (keys or values that are not plain projections of the encoder state
the module recorded). Self-attention, and any attention that needs a gradient for its bias or
mask, or runs dropout, also uses the eager function. Of a batched backward on a t5-small-sized
model (10 targets, 128 source positions) this leaves 0.8 G of the 4 G multiply-adds that
cross-attention's pull-back to ``E`` took.

:func:`rewritten_cross_attention` puts this in place for the length of a scope: every attention
module with ``k``/``v`` (T5) or ``k_proj``/``v_proj`` (BART, mBART, Marian, Pegasus) projections
records the ``key_value_states`` it is called with (a scoped forward pre-hook), and the model's
attention implementation is set to :func:`attention` through transformers' attention registry
(the name :data:`NAME`, registered on first use with the eager mask format). Everything is
restored in ``finally``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

__all__ = ["NAME", "attention", "rewritten_cross_attention"]

NAME = "lmscope_cross_attention_gradients"
_TOLERANCE = 1e-4  # relative: the rewritten scores and outputs agree with the eager ones to float32 rounding
_local = threading.local()  # .states: id(attention module) -> the key_value_states of its current call, per thread


def _states() -> dict[int, torch.Tensor]:
    states = getattr(_local, "states", None)
    if states is None:
        states = _local.states = {}
    return states


def _projections(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The key and value projections of an attention module, if it has plain linear ones."""
    for k, v in (("k", "v"), ("k_proj", "v_proj")):
        pair = getattr(module, k, None), getattr(module, v, None)
        if all(isinstance(p, torch.nn.Linear) for p in pair):
            return pair  # type: ignore[return-value]
    return None


def _eager(module: torch.nn.Module) -> Any:
    return sys.modules[type(module).__module__].eager_attention_forward


def _close(fast: torch.Tensor, plain: torch.Tensor) -> bool:
    with torch.no_grad():
        scale = float(plain.abs().max()) if plain.numel() else 0.0
        return bool(torch.isfinite(fast).all()) and float((fast - plain).abs().max()) <= _TOLERANCE * (1.0 + scale)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A family's eager attention (``[b, q_pos, head, d_head]`` output, probabilities), cross-attention rewritten.

    ``query [b, head, q_pos, d_head]``, ``key``/``value [b, head, k_pos, d_head]``;
    ``position_bias`` (T5's, added before the mask) and ``attention_mask`` are additive.
    """
    extra = {} if position_bias is None else {"position_bias": position_bias}
    states = _states().get(id(module))
    projections = _projections(module)
    if (
        states is None
        or projections is None
        or (dropout and module.training)
        or any(t is not None and t.requires_grad for t in (position_bias, attention_mask))
        or key.shape[-2] != states.shape[-2]
        or states.dim() != 3
    ):
        return _eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extra)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    k_proj, v_proj = projections
    b, heads, q_pos, d_head = query.shape
    d_model = states.shape[-1]
    w_k = k_proj.weight.view(heads, d_head, d_model)  # [head, d_head, d_model]
    w_v = v_proj.weight.view(heads, d_head, d_model)
    scores = torch.matmul(query, key.detach().transpose(2, 3)) * scaling  # [b, head, q_pos, k_pos] eager's
    qk = torch.matmul(query.detach(), w_k).reshape(b, heads * q_pos, d_model)  # [b, head·q_pos, d_model]
    through_states = torch.matmul(qk, states.transpose(1, 2)).view(b, heads, q_pos, -1) * scaling
    shift = 0.0 if k_proj.bias is None else torch.matmul(query, k_proj.bias.view(1, heads, d_head, 1)) * scaling
    if not _close(through_states + shift, scores):  # the keys are not this projection of the states
        return _eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extra)
    scores = scores + (through_states - through_states.detach())  # the same value; dE by the cheap product
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.nn.functional.softmax(scores, dim=-1)  # [b, head, q_pos, k_pos]
    out = torch.matmul(probs, value.detach())  # [b, head, q_pos, d_head] eager's, but value held fixed
    mixed = torch.matmul(probs.detach().reshape(b, heads * q_pos, -1), states).view(b, heads, q_pos, d_model)
    via_states = torch.matmul(mixed, w_v.transpose(1, 2))  # [b, head, q_pos, d_head]
    shift = 0.0 if v_proj.bias is None else v_proj.bias.view(1, heads, 1, d_head)
    if not _close(via_states + shift, out):  # the values are not this projection of the states
        return _eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extra)
    out = out + (via_states - via_states.detach())
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextmanager
def rewritten_cross_attention(model: PreTrainedModel) -> Iterator[None]:
    """Every attention of ``model`` computed by :func:`attention` in this scope (restored in ``finally``)."""
    _register()

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states = kwargs.get("key_value_states")
        if states is None:
            _states().pop(id(module), None)
        else:
            _states()[id(module)] = states

    modules = [m for m in model.modules() if _projections(m) is not None]
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs if hasattr(c, "_attn_implementation_internal")]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = NAME
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation
        for handle in handles:
            handle.remove()
        for m in modules:
            _states().pop(id(m), None)
