"""Scoped hooks that record Trace sites while the model runs unchanged.

:func:`recording` attaches forward hooks (and routes attention, see ``_attention``) for the
requested sites and layers, yields a :class:`Recorder`, and removes every hook in ``finally``,
also when the forward pass raises. Tensors are detached, never cloned or modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from lmscope.capture._attention import attention_probs, routed
from lmscope.capture._trace import ALL_SITES
from lmscope.errors import LmscopeError
from lmscope.models import LoadedModel

__all__ = ["Recorder", "recording", "resolve_layers", "resolve_sites"]

_ATTENTION_SITES = frozenset({"attn_probs", "q", "k", "v"})


def resolve_sites(sites: Iterable[str] | str | None, default: Iterable[str]) -> tuple[str, ...]:
    if sites is None:
        return tuple(default)
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    sites = tuple(dict.fromkeys(sites))
    unknown = [s for s in sites if s not in ALL_SITES]
    if unknown:
        raise LmscopeError(f"unknown site(s) {', '.join(unknown)}: choose from {', '.join(ALL_SITES)}")
    return sites


def resolve_layers(layers: Iterable[int] | int | slice | None, n_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, slice):
        return tuple(range(n_layers)[layers])
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise LmscopeError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
        out.append(layer % n_layers)
    return tuple(sorted(set(out)))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Recorder:
    """Collects per-layer tensors for a set of sites; ``stacked()`` gives ``site -> [layer, ...]``."""

    def __init__(self, lm: LoadedModel, sites: tuple[str, ...], layers: tuple[int, ...]):
        self.lm, self.sites, self.layers = lm, sites, layers
        self._data: dict[str, dict[int, torch.Tensor]] = {}
        self.batch_pos: tuple[int, int] | None = None  # set from the first block's input
        self._attn_layer = {id(lm.arch.attn(layer)): layer for layer in layers}
        self.attn_scaling: dict[int, float] = {}  # the scaling the attention function applied
        self.attn_softcap: dict[int, float | None] = {}

    def put(self, site: str, layer: int, tensor: torch.Tensor) -> None:
        if tensor.ndim == 2 and self.batch_pos is not None:
            # Some families (OPT) flatten [batch, pos] before their MLP.
            tensor = tensor.reshape(*self.batch_pos, -1)
        self._data.setdefault(site, {})[layer] = tensor.detach()

    def on_attention(self, module, query, key, value, mask, kwargs) -> None:
        layer = self._attn_layer.get(id(module))
        if layer is None:
            return
        scaling = kwargs.get("scaling")
        self.attn_scaling[layer] = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        self.attn_softcap[layer] = kwargs.get("softcap") or None
        if "attn_probs" in self.sites:
            probs = attention_probs(module, query.detach(), key.detach(), mask, kwargs)
            self.put("attn_probs", layer, probs.to(query.dtype))  # [batch, head, pos_q, pos_k]
        if "q" in self.sites:
            self.put("q", layer, query.transpose(1, 2))  # [batch, pos, head, d_head]
        if "k" in self.sites:
            self.put("k", layer, key.transpose(1, 2))  # [batch, pos, kv_head, d_head]
        if "v" in self.sites:
            self.put("v", layer, value.transpose(1, 2))  # [batch, pos, kv_head, d_head]

    def stacked(self) -> dict[str, torch.Tensor]:
        """``site -> [batch, layer, ...]``; ``resid_mid`` derived where blocks are pre-norm."""
        data = self._data
        if "resid_mid" in self.sites and "resid_mid" not in data:
            pre, attn = data.get("resid_pre", {}), data.get("attn_out", {})
            data["resid_mid"] = {layer: pre[layer] + attn[layer] for layer in self.layers}
        out = {}
        for site in self.sites:
            per_layer = data.get(site, {})
            missing = [layer for layer in self.layers if layer not in per_layer]
            if missing:
                raise LmscopeError(
                    f"{self.lm.name}: site {site!r} was not reached in layers {missing} "
                    "(the architecture table may not match this model)"
                )
            out[site] = torch.stack([per_layer[layer] for layer in self.layers], dim=1)
        return out


@contextmanager
def recording(lm: LoadedModel, sites: tuple[str, ...], layers: tuple[int, ...]) -> Iterator[Recorder]:
    """Hooks for ``sites`` on ``layers`` of ``lm`` for the duration of the block."""
    arch, family = lm.arch, lm.arch.family
    recorder = Recorder(lm, sites, layers)
    wanted = set(sites)
    derived_mid = "resid_mid" in wanted and not family.post_norm
    if derived_mid:
        wanted |= {"resid_pre", "attn_out"}

    def keep(site: str, layer: int, scale: float = 1.0):
        def hook(module, args, output):
            recorder.put(site, layer, _first(output) if scale == 1.0 else _first(output) * scale)

        return hook

    def keep_input(site: str, layer: int):
        def hook(module, args, kwargs):
            recorder.put(site, layer, args[0] if args else next(iter(kwargs.values())))

        return hook

    with ExitStack() as stack:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        stack.callback(lambda: [h.remove() for h in handles])

        def shape(module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            recorder.batch_pos = tuple(hidden.shape[:2])

        handles.append(arch.blocks[layers[0]].register_forward_pre_hook(shape, with_kwargs=True))
        for layer in layers:
            block = arch.blocks[layer]
            if "resid_pre" in wanted:
                handles.append(block.register_forward_pre_hook(keep_input("resid_pre", layer), with_kwargs=True))
            if "resid_post" in wanted:
                handles.append(block.register_forward_hook(keep("resid_post", layer)))
            if "resid_mid" in wanted and family.post_norm:
                module = arch.block_part(layer, family.resid_mid)
                handles.append(module.register_forward_hook(keep("resid_mid", layer)))
            if "attn_out" in wanted:
                module = arch.block_part(layer, family.attn_out)
                handles.append(module.register_forward_hook(keep("attn_out", layer, arch.residual_scale)))
            if "mlp_out" in wanted:
                module = arch.block_part(layer, family.mlp_out)
                handles.append(module.register_forward_hook(keep("mlp_out", layer, arch.residual_scale)))
            if "mlp_act" in wanted:
                module = arch.block_part(layer, family.mlp_down)
                handles.append(module.register_forward_pre_hook(keep_input("mlp_act", layer), with_kwargs=True))
        if wanted & _ATTENTION_SITES and family.qkv:
            handles += _own_attention_hooks(recorder, layers)
        elif wanted & _ATTENTION_SITES:
            stack.enter_context(routed(lm.model, recorder))
        yield recorder


def _own_attention_hooks(recorder: Recorder, layers: tuple[int, ...]) -> list[torch.utils.hooks.RemovableHandle]:
    """Attention sites of a family whose attention module computes its own eager attention (GPT-Neo).

    The module's second output is its attention probabilities ``[batch, head, pos_q, pos_k]``; the
    q, k, v projections' outputs are the queries, keys and values, split into heads.
    """
    arch, family = recorder.lm.arch, recorder.lm.arch.family
    handles = []

    def keep_probs(layer: int):
        def hook(module, args, output):
            scaling = family.attn_scaling
            recorder.attn_scaling[layer] = float(arch.d_head**-0.5 if scaling is None else scaling)
            recorder.attn_softcap[layer] = None
            if "attn_probs" in recorder.sites:
                recorder.put("attn_probs", layer, output[1])

        return hook

    def keep_heads(site: str, layer: int):
        def hook(module, args, output):
            recorder.put(site, layer, output.view(*output.shape[:2], -1, arch.d_head))  # [batch, pos, head, d_head]

        return hook

    for layer in layers:
        handles.append(arch.attn(layer).register_forward_hook(keep_probs(layer)))
        for site, path in zip(("q", "k", "v"), family.qkv, strict=True):
            if site in recorder.sites:
                handles.append(arch.block_part(layer, path).register_forward_hook(keep_heads(site, layer)))
    return handles
