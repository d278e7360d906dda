"""Attention capture through transformers' attention dispatch, without changing the output.

SDPA and flash attention never materialize attention probabilities. Rather than switching the
model to eager attention (which changes its numerics), lmscope routes the traced run through a
wrapper registered in transformers' ``AttentionInterface``: the wrapper calls the model's own
attention function with the same arguments, so outputs are bit-identical, and hands the
post-rotary queries, keys and values it was given to the active recorder, which recomputes
``softmax(q·kᵀ·scaling + mask)`` once per layer.

The switch is scoped: :func:`routed` sets ``config._attn_implementation`` to the wrapper's name
and restores the original in ``finally``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = ["AttentionListener", "attention_probs", "routed"]

_PREFIX = "lmscope+"


class AttentionListener(Protocol):
    def on_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,  # [batch, head, pos_q, d_head]
        key: torch.Tensor,  # [batch, kv_head, pos_k, d_head]
        value: torch.Tensor,  # [batch, kv_head, pos_k, d_head]
        mask: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> None: ...


_LISTENER: ContextVar[AttentionListener | None] = ContextVar("lmscope_attention", default=None)


def _original(implementation: str, module: nn.Module) -> Callable[..., Any]:
    if implementation == "eager":
        # Eager attention is each model file's own function, not a registry entry.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _make_wrapper(implementation: str) -> Callable[..., Any]:
    def attention(module, query, key, value, attention_mask, **kwargs):
        listener = _LISTENER.get()
        replace = getattr(listener, "replace_attention", None)  # interventions on attention edges
        output = replace(module, query, key, value, attention_mask, kwargs) if replace else None
        if output is None:
            output = _original(implementation, module)(module, query, key, value, attention_mask, **kwargs)
        if listener is not None:
            listener.on_attention(module, query, key, value, attention_mask, kwargs)
        return output

    attention.__name__ = f"lmscope_{implementation}"
    return attention


def _register(implementation: str) -> str:
    name = _PREFIX + implementation
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(implementation))
        if implementation in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


@contextmanager
def routed(model: nn.Module, listener: AttentionListener) -> Iterator[None]:
    """Route ``model``'s attention through the recording wrapper while the block runs."""
    configs = {id(c): c for c in _configs(model)}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs]
    token = _LISTENER.set(listener)
    try:
        for config, implementation in saved:
            implementation = implementation or "eager"
            if not implementation.startswith(_PREFIX):
                config._attn_implementation_internal = _register(implementation)
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation
        _LISTENER.reset(token)


def _configs(model: nn.Module) -> Iterator[Any]:
    yield model.config
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            yield config


def attention_probs(
    module: nn.Module,
    query: torch.Tensor,  # [batch, head, pos_q, d_head]
    key: torch.Tensor,  # [batch, kv_head, pos_k, d_head]
    mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:  # [batch, head, pos_q, pos_k], float32
    """``softmax(q·kᵀ·scaling + mask)`` as the model's attention function computes it.

    Handles grouped-query attention (each key head serves ``head / kv_head`` query heads),
    boolean and additive masks, the implicit causal mask SDPA uses when no mask is passed,
    logit soft-capping (Gemma 2), and T5's relative position bias (``position_bias`` ``[1, head,
    pos_q, pos_k]``, added to the unscaled scores before the mask).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # [batch, head, pos_k, d_head]
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    bias = kwargs.get("position_bias")
    if bias is not None:
        scores = scores + bias.float()
    lowest = torch.finfo(torch.float32).min
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, lowest)
        else:
            scores = (scores + mask.float()).clamp(min=lowest)
    elif getattr(module, "is_causal", False) and query.shape[-2] > 1:
        n_q, n_k = query.shape[-2], key.shape[-2]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(future, lowest)
    return torch.softmax(scores, dim=-1)
