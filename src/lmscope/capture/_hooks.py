"""Scoped hooks that record Trace sites while the model runs unchanged.

:func:`recording` attaches forward hooks (and routes attention, see ``_attention``) for the
requested sites and layers, yields a :class:`Recorder`, and removes every hook in ``finally``,
also when the forward pass raises. Tensors are detached, never cloned or modified.

For an encoder-decoder model the recorder is the decoder stack's and ``recorder.encoder``
records the encoder stack in the same forward pass; one attention listener serves both
(self-attention of either stack and the decoder's cross-attention are told apart by module).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from lmscope.capture._attention import attention_probs, routed
from lmscope.capture._lazy_attention import KINDS, PROBS_SITE, QK_SITES, Book, compute
from lmscope.capture._trace import ALL_SITES
from lmscope.errors import LmscopeError
from lmscope.models import LoadedModel

__all__ = ["Recorder", "recording", "resolve_layers", "resolve_sites"]

_ATTENTION_SITES = frozenset({"attn_probs", "q", "k", "v", "position_bias", "cross_attn_probs", "cross_q", "cross_k",
                              "cross_v"})  # fmt: skip
STORED_SITES = {"attn_probs_stored": "attn_probs", "cross_attn_probs_stored": "cross_attn_probs"}
"""Options among the sites: store full attention probabilities rather than q/k (computed on demand)."""


def resolve_sites(sites: Iterable[str] | str | None, default: Iterable[str]) -> tuple[str, ...]:
    if sites is None:
        return tuple(default)
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    sites = tuple(dict.fromkeys(sites))
    unknown = [s for s in sites if s not in ALL_SITES and s not in STORED_SITES]
    if unknown:
        raise LmscopeError(
            f"unknown site(s) {', '.join(unknown)}: choose from {', '.join(ALL_SITES)} "
            f"(and {', '.join(STORED_SITES)} to store attention probabilities in full)"
        )
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


_SHARED = ("resid_pre", "resid_post")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Recorder:
    """Collects per-layer tensors for a set of sites; ``stacked()`` gives ``site -> [layer, ...]``.

    ``arch`` is the stack recorded (``lm.arch`` unless given: the encoder's of a seq2seq model);
    ``encoder`` is the encoder stack's recorder, fed by the same attention listener.
    """

    def __init__(self, lm: LoadedModel, sites: tuple[str, ...], layers: tuple[int, ...], arch: Any = None):
        self.arch = lm.arch if arch is None else arch
        if not self.arch.family.cross_attn:
            sites = tuple(s for s in sites if s != "cross_attn_probs_stored")
        stored = {STORED_SITES[s] for s in sites if s in STORED_SITES}
        sites = tuple(dict.fromkeys(STORED_SITES.get(s, s) for s in sites))
        self.lm, self.sites, self.layers = lm, sites, layers
        # Attention kept as q/k and a recipe (``_lazy_attention``) unless stored in full was asked for, or
        # the family computes its own attention (GPT-Neo: its module hands out probabilities).
        lazy = self.arch.family.attn is not None and not self.arch.family.qkv
        self.books = {kind: Book() for kind in KINDS if lazy and PROBS_SITE[kind] in sites and PROBS_SITE[kind]
                      not in stored}  # fmt: skip
        self._data: dict[str, dict[int, torch.Tensor]] = {}
        self._buffers: dict[str, torch.Tensor] = {}  # site -> [batch, layer, ...], filled as layers arrive
        self._unbuffered: set[str] = set()  # sites whose layers differ in shape
        self._index = {layer: i for i, layer in enumerate(layers)}
        self._shared = True  # resid_pre and resid_post share one buffer until they differ (``_new_buffer``)
        self._written: set[tuple[str, int]] = set()
        self.batch_pos: tuple[int, int] | None = None  # set from the first block's input
        has_attention = self.arch.family.attn is not None  # a state-space model (Mamba) has none
        self._attn_layer = {id(self.arch.attn(layer)): layer for layer in layers} if has_attention else {}
        self._cross_layer = (
            {id(self.arch.cross_attn(layer)): layer for layer in layers} if self.arch.family.cross_attn else {}
        )
        self.attn_scaling: dict[int, float] = {}  # the scaling the attention function applied
        self.attn_softcap: dict[int, float | None] = {}
        self.encoder: Recorder | None = None
        self.sink: Any = None  # a disk store (``_store.StoreWriter``) that takes each tensor instead of ``_data``

    def put(self, site: str, layer: int, tensor: torch.Tensor) -> None:
        if tensor.ndim == 2 and self.batch_pos is not None:
            # Some families (OPT) flatten [batch, pos] before their MLP.
            tensor = tensor.reshape(*self.batch_pos, -1)
        if self.sink is not None:
            self.sink.put(site, layer, tensor.detach())
            return
        self._keep(site, layer, self._kept(tensor))

    def _keep(self, site: str, layer: int, kept: torch.Tensor) -> None:
        """Copy one layer's tensor into its slice of the site's ``[batch, layer, ...]`` buffer, made when
        the site's first layer arrives, so that stacking at the end copies nothing and the peak is the
        trace itself, not the trace plus a site. A layer whose shape differs is kept on its own."""
        index = self._index.get(layer)
        buffer = self._buffers.get(site)
        if buffer is None and index is not None and site not in self._unbuffered:
            buffer = self._new_buffer(site, kept)
        if buffer is not None and index is not None and buffer[:, index].shape == kept.shape:
            partner = self._partner(site, index)
            if partner is None or partner not in self._written:
                buffer[:, index].copy_(kept)
            elif not torch.equal(buffer[:, index], kept.to(buffer.device)):  # the stream changed between blocks
                self._split()
                buffer = self._buffers[site]
                buffer[:, index].copy_(kept)
            self._written.add((site, index))
            kept = buffer[:, index]
        elif buffer is not None:
            self._unbuffered.add(site)
            del self._buffers[site]
        self._data.setdefault(site, {})[layer] = kept

    def _new_buffer(self, site: str, kept: torch.Tensor) -> torch.Tensor:
        """The site's ``[batch, layer, ...]`` buffer. ``resid_pre`` of a block is ``resid_post`` of the one
        before, so over consecutive layers the two sites are views of one ``[batch, layer + 1, ...]``
        buffer, which saves a site's memory (checked equal as each layer arrives; split if not)."""
        n = len(self.layers)
        if site in _SHARED and self._shared and self.layers == tuple(range(self.layers[0], self.layers[0] + n)):
            both = kept.new_empty((kept.shape[0], n + 1, *kept.shape[1:]))
            self._buffers.update(resid_pre=both[:, :n], resid_post=both[:, 1:])
        else:
            self._buffers[site] = kept.new_empty((kept.shape[0], n, *kept.shape[1:]))
        return self._buffers[site]

    def _partner(self, site: str, index: int) -> tuple[str, int] | None:
        """The other site's slot that shares memory with ``site``'s slot ``index``, if any."""
        if not self._shared or site not in _SHARED or site not in self._buffers:
            return None
        return ("resid_post", index - 1) if site == "resid_pre" else ("resid_pre", index + 1)

    def _split(self) -> None:
        """Give ``resid_pre`` a buffer of its own (a model whose stream changes between blocks)."""
        self._shared = False
        pre = self._buffers["resid_pre"].clone()
        self._buffers["resid_pre"] = pre
        self._data["resid_pre"] = {layer: pre[:, self._index[layer]] for layer in self._data.get("resid_pre", {})}

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor:
        """Detached, on the capture device (a model placed over devices makes each layer's tensors on its own)."""
        device = self.lm.capture_device
        return tensor.detach() if device is None else tensor.detach().to(device)

    def on_attention(self, module, query, key, value, mask, kwargs) -> None:
        if self.encoder is not None:
            self.encoder.on_attention(module, query, key, value, mask, kwargs)
        layer = self._attn_layer.get(id(module))
        if layer is None:
            layer = self._cross_layer.get(id(module))
            if layer is not None:
                self._on_cross_attention(layer, module, query, key, value, mask, kwargs)
            return
        bias = kwargs.get("position_bias")
        if "position_bias" in self.sites and bias is not None:
            self.put("position_bias", layer, bias.expand(query.shape[0], -1, -1, -1))  # [batch, head, pos_q, pos_k]
        scaling = kwargs.get("scaling")
        self.attn_scaling[layer] = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        self.attn_softcap[layer] = kwargs.get("softcap") or None
        book = self.books.get("self")
        lazy = book is not None and book.add(layer, module, query, key, mask, kwargs)
        if "attn_probs" in self.sites and not lazy:
            probs = attention_probs(module, query.detach(), key.detach(), mask, kwargs)
            self.put("attn_probs", layer, probs.to(query.dtype))  # [batch, head, pos_q, pos_k]
        if "q" in self.sites or book is not None:
            self.put("q", layer, query.transpose(1, 2))  # [batch, pos, head, d_head]
        if "k" in self.sites or book is not None:
            self.put("k", layer, key.transpose(1, 2))  # [batch, pos, kv_head, d_head]
        if "v" in self.sites:
            self.put("v", layer, value.transpose(1, 2))  # [batch, pos, kv_head, d_head]

    def _on_cross_attention(self, layer, module, query, key, value, mask, kwargs) -> None:
        """The decoder's cross-attention: queries over decoder positions, keys/values over encoder ones."""
        book = self.books.get("cross")
        lazy = book is not None and book.add(layer, module, query, key, mask, kwargs)
        if "cross_attn_probs" in self.sites and not lazy:
            probs = attention_probs(module, query.detach(), key.detach(), mask, kwargs)
            self.put("cross_attn_probs", layer, probs.to(query.dtype))  # [batch, head, pos, enc_pos]
        for site, tensor in (("cross_q", query), ("cross_k", key), ("cross_v", value)):
            if site in self.sites or (book is not None and site != "cross_v"):
                self._keep(site, layer, self._kept(tensor.transpose(1, 2)))  # [batch, pos, head, d_head]

    def stacked(self) -> dict[str, torch.Tensor]:
        """``site -> [batch, layer, ...]``; ``resid_mid`` (and ``resid_cross``) derived where blocks are pre-norm."""
        data = self._data
        pre_norm = not self.arch.family.post_norm
        if ("resid_mid" in self.sites or ("resid_cross" in self.sites and pre_norm)) and "resid_mid" not in data:
            pre, attn = data.get("resid_pre", {}), data.get("attn_out", {})
            for layer in self.layers:
                self._keep("resid_mid", layer, pre[layer] + attn[layer])
        if "resid_cross" in self.sites and "resid_cross" not in data and pre_norm:
            mid, cross = data.get("resid_mid", {}), data.get("cross_attn_out", {})
            for layer in self.layers:
                self._keep("resid_cross", layer, mid[layer] + cross[layer])
        for kind, book in self.books.items():
            if book.fallback:  # some layer could not be described: store every layer's probabilities
                self._store_probs(kind, book)
        lazy = {PROBS_SITE[kind] for kind, book in self.books.items() if not book.fallback}
        out = {}
        for kind, book in self.books.items():
            if not book.fallback:
                wanted = [s for s in QK_SITES[kind] if s not in self.sites]
                out.update(
                    {s: _stack(data.pop(s), self.layers, self._buffers.pop(s, None)) for s in wanted}
                )  # popped: one site at a time
                out.update(book.tensors(kind, lambda t: self._kept(t)[None]))  # [batch, ...]
        for site in self.sites:
            if site in lazy:
                continue  # computed on demand from q and k (see attn_recipe)
            per_layer = data.pop(site, {})  # the per-layer tensors go as their stack is made
            if site == "position_bias" and not per_layer:
                continue  # only families with a relative position bias (T5) have this site
            missing = [layer for layer in self.layers if layer not in per_layer]
            if missing:
                where = f" of the {self.arch.stack}" if self.arch.stack else ""
                raise LmscopeError(
                    f"{self.lm.name}: site {site!r} was not reached in layers {missing}{where} "
                    "(the architecture table may not match this model)"
                )
            out[site] = _stack(per_layer, self.layers, self._buffers.pop(site, None))
            del per_layer
        return out

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """With a ``sink`` (a disk store): what is not per layer (lazy attention's masks and biases), on the CPU."""
        out = {}
        for kind, book in self.books.items():
            if book.fallback:
                raise LmscopeError(f"{self.lm.name}'s attention cannot be kept as q/k here, and a stored "
                                   "trace cannot add them later: add 'attn_probs_stored' to the sites")  # fmt: skip
            out.update(book.tensors(kind, lambda t: t.detach().cpu()))
        return out

    def attn_recipe(self) -> dict[str, list[dict[str, Any]]] | None:
        """Per kind of attention computed on demand, one recipe entry per layer (``_lazy_attention``)."""
        recipe = {kind: book.recipe(self.layers) for kind, book in self.books.items() if not book.fallback}
        return recipe or None

    def _store_probs(self, kind: str, book: Book) -> None:
        """Probabilities of the layers kept as q/k, computed now, next to those that could not be."""
        q_site, k_site = QK_SITES[kind]
        masks = torch.stack(book.masks) if book.masks else None
        biases = torch.stack(book.biases) if book.biases else None
        per_layer = self._data.setdefault(PROBS_SITE[kind], {})
        for layer, entry in book.entries.items():
            query, key = self._data[q_site][layer][0], self._data[k_site][layer][0]  # [pos, head, d_head]
            heads, rows = torch.arange(query.shape[1]), torch.arange(query.shape[0])
            probs = compute(query, key, entry, masks, biases, heads, rows)
            per_layer[layer] = probs.to(query.dtype)[None]  # [batch, head, pos_q, pos_k]


def _stack(
    per_layer: dict[int, torch.Tensor], layers: tuple[int, ...], buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """``[batch, layer, ...]`` from one site's per-layer tensors: the site's buffer itself when every
    layer was copied into it, else a new stack (the per-layer tensors emptied as it goes)."""
    if buffer is not None and all(
        per_layer[layer].data_ptr() == buffer[:, i].data_ptr() and per_layer[layer].shape == buffer[:, i].shape
        for i, layer in enumerate(layers)
    ):
        per_layer.clear()
        return buffer
    first = per_layer[layers[0]]
    out = first.new_empty((first.shape[0], len(layers), *first.shape[1:]))
    for i, layer in enumerate(layers):
        out[:, i] = per_layer.pop(layer)
    return out


@contextmanager
def recording(
    lm: LoadedModel,
    sites: tuple[str, ...],
    layers: tuple[int, ...],
    encoder: tuple[tuple[str, ...], tuple[int, ...]] | None = None,
) -> Iterator[Recorder]:
    """Hooks for ``sites`` on ``layers`` of ``lm`` for the duration of the block.

    ``encoder``: ``(sites, layers)`` of the encoder stack of an encoder-decoder model, recorded
    in the same pass into ``recorder.encoder``.
    """
    recorder = Recorder(lm, sites, layers)
    with ExitStack() as stack:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        stack.callback(lambda: [h.remove() for h in handles])
        route = _attach(recorder, handles)
        if encoder is not None and lm.arch.encoder is not None:
            recorder.encoder = Recorder(lm, encoder[0], encoder[1], arch=lm.arch.encoder)
            route = _attach(recorder.encoder, handles) or route
        if route:
            stack.enter_context(routed(lm.model, recorder))
        yield recorder


def _attach(recorder: Recorder, handles: list[torch.utils.hooks.RemovableHandle]) -> bool:
    """Module hooks for one stack's sites; whether attention must also be routed to the recorder."""
    arch, family, sites, layers = recorder.arch, recorder.arch.family, recorder.sites, recorder.layers
    wanted = set(sites)
    if "resid_mid" in wanted and not family.post_norm:
        wanted |= {"resid_pre", "attn_out"}
    if "resid_cross" in wanted and not family.post_norm:
        wanted |= {"resid_pre", "attn_out", "cross_attn_out"}

    def keep(site: str, layer: int, scale: float = 1.0):
        def hook(module, args, output):
            # Falcon's parallel block adds attention into the MLP's output in place: sublayer outputs are copied
            copy = site in ("attn_out", "mlp_out") and scale == 1.0
            recorder.put(site, layer, _first(output).clone() if copy else _first(output) * scale)

        return hook

    def keep_input(site: str, layer: int):
        def hook(module, args, kwargs):
            recorder.put(site, layer, args[0] if args else next(iter(kwargs.values())))

        return hook

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
        if "resid_cross" in wanted and family.post_norm and family.resid_cross:
            module = arch.block_part(layer, family.resid_cross)
            handles.append(module.register_forward_hook(keep("resid_cross", layer)))
        if "attn_out" in wanted:
            module = arch.block_part(layer, family.attn_out)
            handles.append(module.register_forward_hook(keep("attn_out", layer, arch.residual_scale)))
        if "cross_attn_out" in wanted and family.cross_attn_out:
            module = arch.block_part(layer, family.cross_attn_out)
            handles.append(module.register_forward_hook(keep("cross_attn_out", layer)))
        if "mlp_out" in wanted:
            module = arch.block_part(layer, family.mlp_out)
            handles.append(module.register_forward_hook(keep("mlp_out", layer, arch.residual_scale)))
        if "mlp_act" in wanted:
            module = arch.block_part(layer, family.mlp_down)
            handles.append(module.register_forward_pre_hook(keep_input("mlp_act", layer), with_kwargs=True))
    if wanted & _ATTENTION_SITES and family.qkv:
        handles += _own_attention_hooks(recorder, layers)
        return False
    return bool(wanted & _ATTENTION_SITES)


def _disentangled(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[float, torch.Tensor | None]:
    """DeBERTa-v2's score scaling and relative-position term ``[batch, head, pos_q, pos_k]``.

    Disentangled attention (He et al. 2021, "DeBERTa", eq. 4) scores ``(q·kᵀ + c2p + p2c) / √(d·s)``,
    ``s`` counting the content term and each relative term used; the relative terms are computed
    again with the module's own ``disentangled_attention_bias``, so ``softmax(q·kᵀ·scaling +
    position_bias)`` is its attention.
    """
    arguments = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    hidden = arguments["hidden_states"]
    queries = arguments.get("query_states")
    heads = module.num_attention_heads
    factor = 1 + sum(term in module.pos_att_type for term in ("c2p", "p2c"))
    with torch.no_grad():
        q = module.transpose_for_scores(module.query_proj(hidden if queries is None else queries), heads)
        k = module.transpose_for_scores(module.key_proj(hidden), heads)  # [batch·head, pos, d_head]
        scaling = float((q.shape[-1] * factor) ** -0.5)
        if not module.relative_attention:
            return scaling, None
        embeddings = module.pos_dropout(arguments["rel_embeddings"])
        bias = module.disentangled_attention_bias(q, k, arguments.get("relative_pos"), embeddings, factor)
    return scaling, bias.view(-1, heads, *bias.shape[-2:])


def _own_attention_hooks(recorder: Recorder, layers: tuple[int, ...]) -> list[torch.utils.hooks.RemovableHandle]:
    """Attention sites of a family whose attention module computes its own eager attention (GPT-Neo, BLOOM, MPT).

    The module's second output is its attention probabilities ``[batch, head, pos_q, pos_k]``; the
    q, k, v projections' outputs (or the parts of one fused projection) are the queries, keys and
    values, split into heads. An ALiBi bias passed to the module (``family.alibi``) is recorded as
    ``position_bias [batch, head, pos_q, pos_k]``, the term added to the scaled scores.
    """
    arch, family = recorder.arch, recorder.arch.family
    handles = []

    pending: dict[int, dict[str, torch.Tensor]] = {}  # a fused projection's parts, until its module returns

    def keep_probs(layer: int):
        def hook(module, args, kwargs, output):
            scaling = getattr(module, family.scaling_attr, None) if family.scaling_attr else None
            scaling = family.attn_scaling if scaling is None else scaling
            scaling = float(arch.d_head**-0.5 if scaling is None else scaling)
            recorder.attn_scaling[layer] = scaling
            recorder.attn_softcap[layer] = None
            bias = kwargs.get(family.alibi) if family.alibi else None
            probs = output[1]  # [batch, head, pos_q, pos_k], or None (SDPA)
            parts = pending.pop(layer, None)
            clip = getattr(module, family.qkv_clip, None) if family.qkv_clip else None
            if parts is not None and clip:  # MPT clamps the fused projection's output
                parts = {name: part.clamp(min=-clip, max=clip) for name, part in parts.items()}
            if parts is not None:
                q, k, v = (parts[s].view(*parts[s].shape[:2], -1, arch.d_head).transpose(1, 2) for s in "qkv")
                if family.rotary and bias is None:  # [batch, (kv_)head, pos, d_head]
                    cos, sin = kwargs["position_embeddings"]
                    q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin)
                if probs is None and "attn_probs" in recorder.sites:
                    probs = attention_probs(module, q, k, kwargs.get("attention_mask"), {"scaling": scaling})
                    probs = probs.to(q.dtype)
                for site, tensor in (("q", q), ("k", k), ("v", v)):
                    if site in recorder.sites:
                        recorder.put(site, layer, tensor.transpose(1, 2))  # [batch, pos, (kv_)head, d_head]
            if "attn_probs" in recorder.sites:
                recorder.put("attn_probs", layer, probs)
            if family.output_attentions:  # DeBERTa-v2: its scaling and relative-position term
                recorder.attn_scaling[layer], bias = _disentangled(module, args, kwargs)
            if "position_bias" in recorder.sites and bias is not None:
                bias = kwargs["attention_mask"] if family.alibi_in_mask else bias
                batch, n_q = (args[0] if args else kwargs["hidden_states"]).shape[:2]
                bias = bias.reshape(-1, arch.n_heads, *bias.shape[-2:])[..., -n_q:]  # [batch or 1, head, 1, pos_k]
                recorder.put("position_bias", layer, bias.expand(batch, arch.n_heads, n_q, n_q))

        return hook

    def keep_fused(layer: int, path: str):
        def hook(module, args, output):
            pending[layer] = arch.split_output(path, output)  # q [batch, pos, head·d_head], k, v

        return hook

    expected: set[tuple[str, int]] = set()  # a projection's first call per attention call holds the tokens' q, k, v

    def keep_heads(site: str, layer: int):
        def hook(module, args, output):
            if (site, layer) not in expected:
                return  # DeBERTa-v2 also projects its relative-position embeddings with its key and query projections
            expected.discard((site, layer))
            recorder.put(site, layer, output.view(*output.shape[:2], -1, arch.d_head))  # [batch, pos, head, d_head]

        return hook

    def starting(layer: int):
        def hook(module, args, kwargs):
            expected.update((site, layer) for site in ("q", "k", "v"))
            if family.output_attentions:
                bound = inspect.signature(module.forward).bind(*args, **kwargs)
                bound.arguments["output_attentions"] = True
                return bound.args, bound.kwargs
            return None

        return hook

    for layer in layers:
        handles.append(arch.attn(layer).register_forward_pre_hook(starting(layer), with_kwargs=True))
        handles.append(arch.attn(layer).register_forward_hook(keep_probs(layer), with_kwargs=True))
        if len(family.qkv) == 1:  # one fused projection
            fused = arch.block_part(layer, family.qkv[0])
            handles.append(fused.register_forward_hook(keep_fused(layer, family.qkv[0])))
            continue
        for site, path in zip(("q", "k", "v"), family.qkv, strict=True):
            if site in recorder.sites:
                handles.append(arch.block_part(layer, path).register_forward_hook(keep_heads(site, layer)))
    return handles
