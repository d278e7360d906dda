"""Interventions: change a site of the model while it runs, for one run, as data.

An :class:`Intervention` names a site, the layers, positions and heads or neurons it touches,
and an operation; :func:`prepare` checks it against the model and the input *before* the model
runs (one-line :class:`~lmscope.errors.LmscopeError` for a site, layer, position, head or
neuron that does not exist, a patch source of another length or model, a vector of the wrong
size, NaN in a value) and resolves every value to a tensor; :func:`intervening` applies the
prepared plan with forward hooks that run before capture's (so the Trace records the intervened
run) and are removed in ``finally``.

Sites (the Trace's names, plus two that only interventions need)::

    embed                              [pos, d_model]    the token embedding's output
    resid_pre, resid_mid, resid_post   [pos, d_model]
    attn_out, mlp_out                  [pos, d_model]
    head_out                           [pos, head, d_head]  the output projection's input, per head
    mlp_act                            [pos, neuron]
    attn_probs                         [head, pos_q, pos_k] an edge q→k of a head (``positions``
                                       are queries, ``keys`` are keys); not renormalized

Operations: ``zero``; ``mean`` over reference texts (every position of every text);
``patch`` from another run of the same length (clean → corrupted or the reverse); ``resample``
(each layer patched from a run drawn at random among several); ``add`` a vector times ``scale``
(steering); ``set`` a value; ``apply`` a function ``fn(region, layer) -> region``.

What the Trace of an intervened run holds: every captured site as the intervened model computed
it, except ``attn_probs`` under an edge intervention, which capture recomputes from q and k (the
probabilities before the edit; the outputs do reflect it). Analyses that run the model again
(saliency, attention views that need sites the trace lacks) run it under the same interventions:
the Output of ``lm.trace``/``lm.generate`` keeps its prepared :class:`Plan`; a trace loaded from a
file records what was done but not the values, so those analyses refuse it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lmscope.capture._attention import _LISTENER, attention_probs, routed
from lmscope.errors import LmscopeError
from lmscope.models import LoadedModel

__all__ = ["INTERVENTION_OPS", "INTERVENTION_SITES", "Intervention", "Plan", "intervening", "prepare", "site_values"]

INTERVENTION_SITES: tuple[str, ...] = (
    "embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head_out",
    "mlp_act",
    "attn_probs",
)
INTERVENTION_OPS: tuple[str, ...] = ("zero", "mean", "patch", "resample", "add", "set", "apply")
_EDGE_OPS = ("zero", "patch", "add", "set", "apply")


def _ints(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, range):
        return tuple(value)
    return tuple(int(v) for v in value)


@dataclass(frozen=True, eq=False)
class Intervention:
    """One change to one site for one run (see the module docstring for sites and operations).

    ``layers``, ``positions``, ``heads``, ``neurons`` and ``keys`` are ``None`` for all of them;
    build with the class methods (``Intervention.zero("head_out", layers=3, heads=1)``).
    """

    site: str
    op: str
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    keys: tuple[int, ...] | None = None
    value: Any = field(default=None, repr=False)  # add/set: a tensor; patch: a run; mean/resample: runs
    scale: float = 1.0
    fn: Callable[[torch.Tensor, int], torch.Tensor] | None = field(default=None, repr=False)
    seed: int = 0

    @classmethod
    def _make(cls, site: str, op: str, layers: Any, positions: Any, heads: Any, neurons: Any, keys: Any, **rest: Any):
        return cls(site, op, _ints(layers), _ints(positions), _ints(heads), _ints(neurons), _ints(keys), **rest)

    @classmethod
    def zero(cls, site: str, layers=None, positions=None, *, heads=None, neurons=None, keys=None) -> Intervention:
        """Zero-ablate the selection."""
        return cls._make(site, "zero", layers, positions, heads, neurons, keys)

    @classmethod
    def mean(cls, site: str, texts: Sequence[Any], layers=None, positions=None, *, heads=None, neurons=None):
        """Mean-ablate: each layer's value averaged over every position of the reference ``texts``."""
        return cls._make(site, "mean", layers, positions, heads, neurons, None, value=tuple(texts))

    @classmethod
    def patch(cls, site: str, source: Any, layers=None, positions=None, *, heads=None, neurons=None, keys=None):
        """Replace the selection by its value in ``source`` (an Output, a Trace, a text or token ids
        of the same length, run by the same model)."""
        return cls._make(site, "patch", layers, positions, heads, neurons, keys, value=source)

    @classmethod
    def resample(cls, site: str, sources: Sequence[Any], layers=None, positions=None, *, heads=None, neurons=None,
                 seed: int = 0):  # fmt: skip
        """Resample-ablate: each layer patched from one of ``sources`` drawn at random (``seed``)."""
        return cls._make(site, "resample", layers, positions, heads, neurons, None, value=tuple(sources), seed=seed)

    @classmethod
    def steer(cls, site: str, vector: Any, scale: float = 1.0, layers=None, positions=None, *, heads=None,
              neurons=None):  # fmt: skip
        """Add ``scale × vector`` (steering; a ``[d_model]`` vector on residual sites)."""
        return cls._make(site, "add", layers, positions, heads, neurons, None, value=vector, scale=float(scale))

    @classmethod
    def set(cls, site: str, value: Any, layers=None, positions=None, *, heads=None, neurons=None, keys=None):
        """Replace the selection by ``value`` (broadcast to it)."""
        return cls._make(site, "set", layers, positions, heads, neurons, keys, value=value)

    @classmethod
    def apply(cls, site: str, fn: Callable[[torch.Tensor, int], torch.Tensor], layers=None, positions=None, *,
              heads=None, neurons=None, keys=None):  # fmt: skip
        """Replace the selection ``region`` by ``fn(region, layer)`` (same shape)."""
        return cls._make(site, "apply", layers, positions, heads, neurons, keys, fn=fn)


@dataclass(frozen=True, eq=False)
class _Item:
    """One intervention resolved against a model and an input: indices and tensors on its device."""

    site: str
    op: str
    layers: tuple[int, ...]
    positions: tuple[int, ...] | None
    units: tuple[int, ...] | None  # heads or neurons
    keys: tuple[int, ...] | None
    values: dict[int, torch.Tensor]  # per layer: the full site value ([pos, *unit]) or a vector
    scale: float
    fn: Callable[..., torch.Tensor] | None

    def edit(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``x`` (``[batch, pos, *unit]``, or ``[batch, head, q, k]`` for edges) with the selection changed."""
        device = x.device
        n = x.shape[2] if self.site == "attn_probs" else x.shape[1]
        limit = n
        if self.op in ("patch", "resample") and self.site != "attn_probs":
            limit = min(n, self.values[layer].shape[0])
        pos = torch.arange(limit) if self.positions is None else torch.tensor([p for p in self.positions if p < n])
        pos = pos.to(device)
        if self.site == "attn_probs":
            heads = torch.arange(x.shape[1]) if self.units is None else torch.tensor(self.units)
            n_k = x.shape[3]
            keys = torch.arange(n_k) if self.keys is None else torch.tensor([k for k in self.keys if k < n_k])
            index = (slice(None), heads.to(device)[:, None, None], pos[None, :, None], keys.to(device)[None, None, :])
            source_index = index[1:]
        elif self.units is None:
            index, source_index = (slice(None), pos), (pos,)
        else:
            units = torch.tensor(self.units, device=device)
            index = (slice(None), pos[:, None], units[None, :])
            source_index = (pos[:, None], units[None, :])
        region = x[index]
        if self.op == "zero":
            new = torch.zeros_like(region)
        elif self.op in ("patch", "resample"):
            new = self.values[layer][source_index].to(region.dtype).expand_as(region)
        elif self.op == "mean":
            mean = self.values[layer]  # [*unit]
            new = (mean if self.units is None else mean[torch.tensor(self.units, device=device)]).expand_as(region)
        elif self.op == "add":
            new = region + self.scale * self.values[layer].to(region.dtype)
        elif self.op == "set":
            new = self.values[layer].to(region.dtype).expand_as(region)
        else:
            new = self.fn(region, layer)
            if not isinstance(new, torch.Tensor) or new.shape != region.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise LmscopeError(
                    f"the function of an intervention on {self.site} returned {got}, not a tensor of the "
                    f"region's shape {tuple(region.shape)}"
                )
        x = x.clone()
        x[index] = new.to(x.dtype)
        return x


@dataclass(frozen=True, eq=False)
class Plan:
    """Interventions prepared for one input: what :func:`intervening` applies and the Trace records."""

    items: tuple[_Item, ...]
    records: tuple[dict[str, Any], ...]

    def __bool__(self) -> bool:
        return bool(self.items)

    def on_embeddings(self, embeds: torch.Tensor) -> tuple[torch.Tensor, Plan]:
        """``embeds [pos, d_model]`` with the plan's ``embed`` interventions applied, and the rest of the plan.

        For runs that pass ``inputs_embeds`` (saliency), where the embedding module never runs.
        """
        for item in self.items:
            if item.site == "embed":
                embeds = item.edit(embeds[None], 0)[0]
        rest = tuple(item for item in self.items if item.site != "embed")
        return embeds, Plan(rest, self.records)


def _unit_shape(lm: LoadedModel, site: str) -> tuple[int, ...]:
    arch = lm.arch
    if site == "head_out":
        return (arch.n_heads, arch.d_head)
    if site == "mlp_act":
        return (arch.n_neurons,)
    return (arch.d_model,)


def _check_indices(what: str, values: tuple[int, ...] | None, n: int, negative: bool = True) -> tuple[int, ...] | None:
    if values is None:
        return None
    if not values:
        raise LmscopeError(f"an intervention's {what} list is empty: give at least one, or None for all")
    low = -n if negative else 0
    for v in values:
        if not low <= v < n:
            span = f"0..{n - 1}" + (" or negative from the end" if negative else "")
            raise LmscopeError(f"{what[:-1]} {v} does not exist: there are {n} ({span})")
    return tuple(sorted({v % n for v in values}))


def _source_ids(lm: LoadedModel, source: Any) -> tuple[torch.Tensor, Any]:
    """Token ids of a patch source, and its Trace if it has one (checked to come from ``lm``)."""
    from lmscope.capture._run import encode, model_info

    trace = getattr(source, "trace", source)
    if hasattr(trace, "token_ids") and hasattr(trace, "model"):
        mine = model_info(lm)
        problem = mine.mismatch(trace.model) or (None if trace.model.name == mine.name else "another name")
        if problem:
            raise LmscopeError(
                f"the patch source was traced with {trace.model.name!r}, not {lm.name!r} ({problem}): "
                "patch from a run of the same model"
            )
        return trace.token_ids, trace
    if isinstance(source, str):
        return encode(lm, source), None
    if isinstance(source, (list, tuple, torch.Tensor)):
        ids = torch.as_tensor(source, dtype=torch.long).reshape(-1)
        if len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= int(lm.model.config.vocab_size):
            raise LmscopeError("a patch source's token ids must be non-empty and lie in the vocabulary")
        return ids, None
    raise LmscopeError(f"a patch source must be an Output, a Trace, a text or token ids, not {type(source).__name__}")


@torch.no_grad()
def site_values(lm: LoadedModel, ids: torch.Tensor, site: str, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """A plain run's values of ``site`` at ``layers``: ``layer -> [pos, *unit]`` (``[head, q, k]`` for edges)."""
    if site == "attn_probs":
        from lmscope.capture._run import trace_ids

        trace = trace_ids(lm, ids, sites=("attn_probs",), layers=layers)
        return {layer: trace.at("attn_probs", layer) for layer in layers}
    kept: dict[int, torch.Tensor] = {}

    def keep(region: torch.Tensor, layer: int) -> torch.Tensor:
        kept[layer] = region[0].detach().clone()
        return region

    item = _Item(site, "apply", layers, None, None, None, {}, 1.0, keep)
    with intervening(lm, Plan((item,), ())):
        lm.model(input_ids=ids[None].to(lm.device), use_cache=False)
    return kept


def _source_values(lm, source, site, layers, n_pos, what="patch source") -> dict[int, torch.Tensor]:
    ids, trace = _source_ids(lm, source)
    if len(ids) != n_pos:
        raise LmscopeError(f"the {what} has {len(ids)} tokens, the input {n_pos}: patch between runs of equal length")
    if trace is not None and getattr(trace, "interventions", ()):
        if site not in trace.tensors or any(layer not in trace.layers for layer in layers):
            raise LmscopeError(f"the {what} is itself intervened and did not capture {site} at layers {list(layers)}")
        values = {layer: trace.at(site, layer) for layer in layers}
    else:
        values = site_values(lm, ids, site, layers)
    for layer, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise LmscopeError(f"the {what}'s {site} at layer {layer} holds NaN or infinite values")
    return values


def _vector(lm: LoadedModel, item: Intervention, region: tuple[int, ...]) -> torch.Tensor:
    value = torch.as_tensor(item.value, dtype=torch.float32).to(lm.device)
    try:
        shape = torch.broadcast_shapes(value.shape, region)
    except RuntimeError:
        shape = None
    if shape != region:
        raise LmscopeError(
            f"the {'steering vector' if item.op == 'add' else 'value'} for {item.site} has shape "
            f"{list(value.shape)}, which does not fit the selection {list(region)} (e.g. {list(region[-1:])})"
        )
    if not bool(torch.isfinite(value).all()):
        raise LmscopeError(f"the value of an intervention on {item.site} holds NaN or infinite values")
    if not (item.scale == item.scale and abs(item.scale) != float("inf")):
        raise LmscopeError(f"the scale of an intervention on {item.site} must be a finite number")
    return value


def _resolve(lm: LoadedModel, item: Intervention, n_pos: int) -> tuple[_Item, dict[str, Any]]:
    from lmscope.capture._hooks import resolve_layers

    arch = lm.arch
    if not isinstance(item, Intervention):
        raise LmscopeError(f"interventions must be lmscope Intervention objects, not {type(item).__name__}")
    if item.site not in INTERVENTION_SITES:
        raise LmscopeError(f"no site {item.site!r} to intervene on: choose from {', '.join(INTERVENTION_SITES)}")
    ops = _EDGE_OPS if item.site == "attn_probs" else INTERVENTION_OPS
    if item.op not in ops:
        raise LmscopeError(f"an intervention on {item.site} cannot {item.op!r}: choose from {', '.join(ops)}")
    if item.site == "embed":
        if item.layers not in (None, (0,)):
            raise LmscopeError("the embedding has no layers: leave layers out of an intervention on 'embed'")
        layers: tuple[int, ...] = (0,)
    else:
        layers = resolve_layers(item.layers, arch.n_layers)
    positions = _check_indices("positions", item.positions, n_pos)
    heads = _check_indices("heads", item.heads, arch.n_heads, negative=False)
    neurons = _check_indices("neurons", item.neurons, arch.n_neurons, negative=False)
    keys = _check_indices("keys", item.keys, n_pos)
    if heads is not None and item.site not in ("head_out", "attn_probs"):
        raise LmscopeError(f"heads apply to the sites head_out and attn_probs, not {item.site}")
    if neurons is not None and item.site != "mlp_act":
        raise LmscopeError(f"neurons apply to the site mlp_act, not {item.site}")
    if keys is not None and item.site != "attn_probs":
        raise LmscopeError(f"keys (key positions of an edge) apply to the site attn_probs, not {item.site}")
    units = heads if item.site in ("head_out", "attn_probs") else neurons if item.site == "mlp_act" else None
    unit_shape = _unit_shape(lm, item.site)
    n_sel = n_pos if positions is None else len(positions)
    if item.site == "attn_probs":
        n_h = arch.n_heads if heads is None else len(heads)
        region = (n_h, n_sel, n_pos if keys is None else len(keys))
    else:
        region = (n_sel, *((len(units), *unit_shape[1:]) if units is not None else unit_shape))
    values: dict[int, torch.Tensor] = {}
    source = None
    if item.op == "patch":
        values = _source_values(lm, item.value, item.site, layers, n_pos)
        source = _describe_source(item.value)
    elif item.op == "resample":
        runs = [_source_values(lm, s, item.site, layers, n_pos, "resample source") for s in item.value]
        if not runs:
            raise LmscopeError("resample needs at least one source run")
        draw = random.Random(item.seed)
        values = {layer: runs[draw.randrange(len(runs))][layer] for layer in layers}
        source = f"{len(runs)} runs, seed {item.seed}"
    elif item.op == "mean":
        values = _mean(lm, item.value, item.site, layers)
        source = f"mean over {len(item.value)} texts"
    elif item.op in ("add", "set"):
        vector = _vector(lm, item, region)
        values = dict.fromkeys(layers, vector)
        source = f"vector of norm {float(vector.float().norm()):.4g}"
    elif item.op == "apply":
        if not callable(item.fn):
            raise LmscopeError("an 'apply' intervention needs a function fn(region, layer) -> region")
        source = getattr(item.fn, "__name__", "a function")
    resolved = _Item(item.site, item.op, layers, positions, units, keys, values, item.scale, item.fn)
    record = {
        "site": item.site,
        "op": item.op,
        "layers": None if item.site == "embed" else list(layers),
        "positions": None if positions is None else list(positions),
        "heads": None if heads is None else list(heads),
        "neurons": None if neurons is None else list(neurons),
        "keys": None if keys is None else list(keys),
        "scale": item.scale,
        "source": source,
    }
    return resolved, record


def _describe_source(source: Any) -> str:
    trace = getattr(source, "trace", source)
    if hasattr(trace, "tokens"):
        return "run of " + repr("".join(trace.tokens))[:200]
    if isinstance(source, str):
        return "text " + repr(source)[:200]
    return "token ids"


def _mean(lm: LoadedModel, texts: Sequence[Any], site: str, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    if not texts:
        raise LmscopeError("mean ablation needs at least one reference text")
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for text in texts:
        ids, _ = _source_ids(lm, text)
        for layer, value in site_values(lm, ids, site, layers).items():
            sums[layer] = sums.get(layer, 0) + value.float().sum(0)
        count += len(ids)
    return {layer: (total / count) for layer, total in sums.items()}


def prepare(lm: LoadedModel, interventions: Sequence[Intervention] | None, n_pos: int) -> Plan:
    """Check ``interventions`` against ``lm`` and an input of ``n_pos`` tokens, and resolve their values."""
    if not interventions:
        return Plan((), ())
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    pairs = [_resolve(lm, item, n_pos) for item in interventions]
    return Plan(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, first: torch.Tensor) -> Any:
    return (first, *output[1:]) if isinstance(output, tuple) else first


class _EdgeEditor:
    """An attention listener that recomputes attention with edited probabilities where asked, and
    passes every call on to the listener that was active (capture's recorder) unchanged."""

    def __init__(self, lm: LoadedModel, edits: dict[int, list[_Item]], previous: Any):
        self.edits = {id(lm.arch.attn(layer)): (layer, items) for layer, items in edits.items()}
        self.previous = previous
        self.reached: set[int] = set()

    def on_attention(self, module, query, key, value, mask, kwargs) -> None:
        if self.previous is not None:
            self.previous.on_attention(module, query, key, value, mask, kwargs)

    def replace_attention(self, module, query, key, value, mask, kwargs) -> Any:
        found = self.edits.get(id(module))
        if found is None:
            return None
        layer, items = found
        self.reached.add(layer)
        probs = attention_probs(module, query, key, mask, kwargs)  # [batch, head, q, k], float32
        for item in items:
            probs = item.edit(probs, layer)
        groups = query.shape[1] // value.shape[1]
        value = value.repeat_interleave(groups, dim=1) if groups > 1 else value  # [batch, head, k, d_head]
        out = torch.matmul(probs.to(value.dtype), value)  # [batch, head, q, d_head]
        return out.transpose(1, 2).contiguous(), probs.to(value.dtype)


@contextmanager
def intervening(lm: LoadedModel, plan: Plan) -> Iterator[None]:
    """Apply ``plan`` with hooks that run before any other (capture sees the changed values)."""
    arch, family = lm.arch, lm.arch.family
    with ExitStack() as stack:
        handles: list[Any] = []
        stack.callback(lambda: [h.remove() for h in handles])
        state: dict[str, Any] = {}
        edges: dict[int, list[_Item]] = {}

        def flat(x: torch.Tensor, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            if x.ndim == 2:  # OPT flattens [batch, pos] inside its blocks
                return fn(x.reshape(*state["batch_pos"], -1)).reshape(x.shape)
            return fn(x)

        def on_output(item: _Item, layer: int):
            def hook(module, args, output):
                x = _first(output)
                return _with_first(output, flat(x, item.site, lambda t: item.edit(t, layer)))

            return hook

        def on_input(item: _Item, layer: int, split: int | None = None):
            def edit(t: torch.Tensor) -> torch.Tensor:
                if split is None:
                    return item.edit(t, layer)
                shaped = t.reshape(*t.shape[:2], split, -1)  # [batch, pos, head, d_head]
                return item.edit(shaped, layer).reshape(t.shape)

            def hook(module, args, kwargs):
                if args:
                    return (flat(args[0], item.site, edit), *args[1:]), kwargs
                name = next(iter(kwargs))
                return args, {**kwargs, name: flat(kwargs[name], item.site, edit)}

            return hook

        def on_mid(item: _Item, layer: int):
            def hook(module, args, output):
                attn, pre = _first(output), state[f"pre{layer}"]
                mid = pre + attn
                return _with_first(output, attn + (item.edit(mid, layer) - mid))

            return hook

        def remember(layer: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else next(iter(kwargs.values()))
                state["batch_pos"] = tuple(hidden.shape[:2])
                state[f"pre{layer}"] = hidden

            return hook

        def add(handle: Any) -> None:
            handles.append(handle)

        used = sorted({layer for item in plan.items if item.site != "embed" for layer in item.layers})
        for layer in used:
            add(arch.blocks[layer].register_forward_pre_hook(remember(layer), with_kwargs=True))
        for item in reversed(plan.items):  # prepended: the first intervention runs first
            for layer in item.layers:
                site = item.site
                if site == "embed":
                    add(arch.embed.register_forward_hook(on_output(item, layer), prepend=True))
                elif site == "resid_pre":
                    hook = on_input(item, layer)
                    add(arch.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
                elif site == "resid_post":
                    add(arch.blocks[layer].register_forward_hook(on_output(item, layer), prepend=True))
                elif site == "resid_mid" and family.post_norm:
                    module = arch.block_part(layer, family.resid_mid)
                    add(module.register_forward_hook(on_output(item, layer), prepend=True))
                elif site == "resid_mid":
                    module = arch.block_part(layer, family.attn_out)
                    add(module.register_forward_hook(on_mid(item, layer), prepend=True))
                elif site in ("attn_out", "mlp_out"):
                    module = arch.block_part(layer, family.attn_out if site == "attn_out" else family.mlp_out)
                    add(module.register_forward_hook(on_output(item, layer), prepend=True))
                elif site == "head_out":
                    hook = on_input(item, layer, split=arch.n_heads)
                    add(arch.o_proj(layer).register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
                elif site == "mlp_act":
                    hook = on_input(item, layer)
                    add(arch.mlp_down(layer).register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
                else:
                    edges.setdefault(layer, []).insert(0, item)
        editor = _EdgeEditor(lm, edges, _LISTENER.get())
        if edges:
            stack.enter_context(routed(lm.model, editor))
        yield
        missed = sorted(set(edges) - editor.reached)
        if missed:
            raise LmscopeError(
                f"{lm.name}'s attention at layers {missed} does not pass through transformers' attention "
                "interface, so its edges (attn_probs) cannot be intervened on: intervene on head_out instead"
            )
