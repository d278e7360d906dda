"""The structural fallback: a layout guessed from the module tree for a model type the table lacks.

:func:`bind_architecture` binds a model to its table entry when there is one; otherwise
:func:`discover` reads the layout off the model itself and returns an :class:`Architecture` whose
family is not in :data:`FAMILIES` (see :func:`is_guessed`). Nothing is taken on trust: the caller
(``lmscope.from_pretrained`` / ``lmscope.wrap``) runs ``lmscope.verify`` on the guessed layout at
once and keeps it only if every check passes.

What is read from the module tree, and what from one short forward pass over a few token ids
(forward hooks record which modules run, in what order, with what inputs and outputs):

* the blocks: the ``nn.ModuleList`` of identical modules with ``config.num_hidden_layers`` entries;
* the embedding and the unembedding: ``get_input_embeddings()`` / ``get_output_embeddings()``;
* the attention: the innermost ``...Attention`` module of a block whose modeling code dispatches
  through transformers' ``AttentionInterface`` (so its queries and keys can be seen); its output
  projection is the last linear map it runs that returns ``d_model`` features;
* the MLP: the block's child that runs after the attention and returns ``d_model`` features; its
  output projection is the last linear map it runs;
* the norms: the norm whose output the attention (the MLP) reads, a norm that re-normalizes an
  update before it is added to the residual ("sandwich" norms), and the final norm, the norm
  outside the blocks that reads the last block's output;
* parallel or sequential: whether the MLP's norm reads the block input or the block input plus
  the attention update; and the block's output must equal input + attention + MLP updates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmscope.errors import LmscopeError
from lmscope.models._architectures import FAMILIES, Architecture, Family, architecture_of

__all__ = [
    "GuessedLayoutWarning",
    "bind_architecture",
    "check_attention_hookable",
    "check_weights_readable",
    "describe",
    "discover",
    "is_guessed",
]

_HOW_TO_ADD = "add an entry for it to lmscope's architecture table (README: 'Models the table does not know')"


class GuessedLayoutWarning(UserWarning):
    """A model type missing from the table runs on a layout guessed from its module tree (verified)."""


def _in_table(model_type: str) -> bool:
    return any(model_type in family.model_types for family in FAMILIES)


def _unsupported() -> dict[str, str]:
    from lmscope.models import _architectures

    return getattr(_architectures, "UNSUPPORTED", {})


def is_guessed(arch: Architecture) -> bool:
    """Whether ``arch`` comes from the structural fallback rather than the architecture table."""
    return not any(arch.family is family for family in FAMILIES)  # identity: a guess may equal an entry


def bind_architecture(model: nn.Module) -> Architecture:
    """The table's layout for ``model``, else a guessed one (to be verified by the caller)."""
    check_attention_hookable(model)
    model_type = getattr(model.config, "model_type", "") or type(model).__name__
    if _in_table(model_type) or model_type in _unsupported() or getattr(model.config, "is_encoder_decoder", False):
        return architecture_of(model)  # the table's entry, or its reason for refusing (no guessed seq2seq layouts)
    return discover(model)


# Attention implementations whose functions take a tensor mask (or none) that lmscope can read.
def check_attention_hookable(model: nn.Module) -> None:
    """Raise, naming it, if the model's attention implementation cannot be hooked."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    implementation = implementation.removeprefix("lmscope+")
    if implementation == "flex_attention" or (
        implementation != "eager" and implementation not in ALL_ATTENTION_FUNCTIONS
    ):
        raise LmscopeError(
            f"{type(model).__name__} uses the {implementation!r} attention implementation, which lmscope cannot "
            "hook (its masks are not tensors lmscope can read): load it with attn_implementation='sdpa' or 'eager'"
        )


def check_weights_readable(arch: Architecture) -> None:
    """Raise if the output projections' weights are quantized (the flow graph and components read them).

    For a mixture of experts, the experts' fused ``down_proj [expert, d_model, neuron]`` is read.
    """
    experts = next((e for e in map(arch.experts, range(arch.n_layers)) if e is not None), None)
    second = arch.mlp_down(0) if experts is None else experts
    for module, name, ndim in (
        (arch.o_proj(0), "weight", 2),
        (second, "weight" if experts is None else "down_proj", 2 if experts is None else 3),
    ):
        weight = getattr(module, name, None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != ndim:
            kind = type(weight).__name__ if weight is not None else "no weight"
            method = getattr(getattr(arch.model.config, "quantization_config", None), "quant_method", None)
            how = f" ({method})" if method else ""
            raise LmscopeError(
                f"{type(arch.model).__name__}'s weights are quantized{how} ({type(module).__name__} holds {kind}), so "
                "the flow graph, components and neuron contributions cannot read them: the logit lens, rankings, "
                "saliency, attention and activations still work, or load the model unquantized"
            )


def describe(arch: Architecture) -> str:
    """The layout in one line: ``blocks=layers, attn=self_attn (o_proj), mlp=mlp (down_proj), ...``."""
    f = arch.family
    parts = [
        f"blocks={f.blocks}",
        f"attn={f.attn} (out {f.o_proj})",
        f"mlp={f.mlp_out} (down {f.mlp_down})",
        f"norms={f.ln_attn}/{f.ln_mlp or '-'}/{f.final_norm or '-'}",
        "parallel" if arch.parallel else "sequential",
    ]
    if f.attn_out != f.attn:
        parts.append(f"attn update={f.attn_out}")
    return ", ".join(parts)


# --- discovery ----------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, (torch.Tensor, nn.Parameter))
        and weight.ndim == 2
        and not isinstance(module, nn.Embedding)
        and not any(True for _ in module.children())
    )


def _first(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@dataclass
class _Call:
    path: str
    module: nn.Module
    order: int  # when it started
    end: int = -1  # when it returned
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


@dataclass
class _Record:
    calls: list[_Call] = field(default_factory=list)
    clock: int = 0

    def by_path(self, path: str) -> _Call | None:
        return next((c for c in self.calls if c.path == path), None)


@contextmanager
def _watch(modules: dict[str, nn.Module], record: _Record) -> Iterator[None]:
    """Forward hooks that log each module's first call: order, first input, first output."""
    handles = []

    def before(path: str, module: nn.Module):
        def hook(mod, args, kwargs):
            if record.by_path(path) is None:
                given = kwargs.get("hidden_states", next(iter(kwargs.values()), None))
                tensor = _first(args) if args else _first(given)
                record.calls.append(_Call(path, mod, record.clock, input=tensor))
                record.clock += 1

        return hook

    def after(path: str):
        def hook(mod, args, kwargs, output):
            call = record.by_path(path)
            if call is not None and call.end < 0:
                call.end, call.output = record.clock, _first(output)
                record.clock += 1

        return hook

    try:
        for path, module in modules.items():
            handles.append(module.register_forward_pre_hook(before(path, module), with_kwargs=True))
            handles.append(module.register_forward_hook(after(path), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max())))


def _path_of(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in root.named_modules() if module is target and name), None)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    base = model.base_model
    wanted = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if len({type(m) for m in module}) != 1 or (wanted and len(module) != wanted):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def _attention_path(block: nn.Module) -> str | None:
    """The innermost ``...Attention`` module of a block (the one the attention function receives)."""
    found = [
        (name, module)
        for name, module in block.named_modules()
        if name and "attention" in type(module).__name__.lower() and not _is_linear(module)
    ]
    inner = [
        (name, module)
        for name, module in found
        if not any(other is not module and other_name.startswith(name + ".") for other_name, other in found)
    ]
    return inner[0][0] if inner else None


def _uses_attention_interface(module: nn.Module) -> bool:
    source = sys.modules.get(type(module).__module__)
    return source is not None and hasattr(source, "eager_attention_forward")


def _fail(model: nn.Module, missing: list[str]) -> LmscopeError:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return LmscopeError(
        f"model type {model_type!r} is not in lmscope's architecture table and its layout could not be "
        f"guessed: could not find {'; '.join(missing)}; {_HOW_TO_ADD}"
    )


@torch.no_grad()
def discover(model: nn.Module) -> Architecture:
    """A layout for ``model`` read from its module tree and one short forward pass.

    Raises :class:`LmscopeError` naming every part that could not be found.
    """
    config = model.config
    model_type = getattr(config, "model_type", "") or type(model).__name__
    base = model.base_model
    found = _find_blocks(model)
    if found is None:
        raise _fail(model, ["the list of Transformer blocks (an nn.ModuleList of identical blocks)"])
    blocks_path, blocks = found
    block = blocks[0]
    embed_path = _path_of(base, model.get_input_embeddings())
    attn_path = _attention_path(block)
    missing = []
    if embed_path is None:
        missing.append("the token embedding")
    if attn_path is None:
        missing.append(f"an attention module in each block ({type(block).__name__} has none)")
    elif not _uses_attention_interface(block.get_submodule(attn_path)):
        attn = block.get_submodule(attn_path)
        raise LmscopeError(
            f"model type {model_type!r}: the attention of {type(attn).__name__} cannot be hooked (its modeling code "
            "does not dispatch through transformers' AttentionInterface), so lmscope cannot see its attention "
            "probabilities without changing the model's code"
        )
    mixed = [i for i, b in enumerate(blocks) if attn_path and _attention_path(b) != attn_path]
    if mixed:
        missing.append(f"attention at {attn_path!r} in blocks {mixed[:5]} (the blocks differ: a hybrid model)")
    if missing:
        raise _fail(model, missing)

    # One forward pass over a few token ids, watching block 0, the modules outside the blocks and the last block.
    watched = {f"b.{name}": module for name, module in block.named_modules() if name}
    watched["block0"] = block
    watched["blockN"] = blocks[-1]
    watched.update({f"o.{name}": m for name, m in base.named_modules() if name and not name.startswith(blocks_path)})
    record = _Record()
    vocab = int(getattr(config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    ids = (torch.arange(7) * 37 + 11) % vocab
    device = next(model.parameters()).device
    try:
        with _watch(watched, record):
            model(input_ids=ids[None].to(device), use_cache=False)
    except Exception as error:  # a model that does not run on plain token ids
        detail = " ".join(f"{type(error).__name__}: {error}".split())
        raise LmscopeError(
            f"model type {model_type!r} is not in lmscope's architecture table and its layout could not be guessed: "
            f"the model did not run on token ids alone ({detail}); {_HOW_TO_ADD}"
        ) from error

    def call(path: str) -> _Call | None:
        return record.by_path(path)

    first, last = call("block0"), call("blockN")
    attn = call(f"b.{attn_path}")
    if first is None or attn is None or first.output is None or first.input is None:
        raise _fail(model, ["a forward pass through the blocks (the blocks or their attention never ran)"])
    pre, post = first.input, first.output
    d_model = post.shape[-1]
    inside = lambda c, parent: c.path.startswith(parent + ".")  # noqa: E731
    # attention output projection: the last linear map in the attention that returns d_model features
    o_calls = [c for c in record.calls if inside(c, f"b.{attn_path}") and _is_linear(c.module) and c.output is not None]
    o_calls = [c for c in o_calls if c.output.shape[-1] == d_model]
    # direct children of the block, in the order they ran
    children = sorted(
        (c for c in record.calls if c.path.startswith("b.") and "." not in c.path[2:]), key=lambda c: c.order
    )
    attn_child = next((c for c in children if attn_path == c.path[2:] or attn_path.startswith(c.path[2:] + ".")), None)
    after = [c for c in children if attn_child is not None and c.order > attn_child.end]
    mlp = next(
        (
            c
            for c in after
            if not _is_norm(c.module)
            and any(_is_linear(m) for m in c.module.modules())
            and c.output is not None
            and c.output.shape[-1] == d_model
        ),
        None,
    )
    if not o_calls:
        missing.append(f"the attention output projection (a linear map in <block>.{attn_path})")
    if mlp is None:
        missing.append("the MLP (a child of the block after the attention that returns d_model features)")
    if missing:
        raise _fail(model, missing)
    mlp_path = mlp.path[2:]
    if any(
        isinstance(m, nn.ModuleList) or "expert" in n.lower() or "moe" in type(m).__name__.lower()
        for n, m in mlp.module.named_modules()
    ):
        raise _fail(model, [f"a single MLP output projection (<block>.{mlp_path} is a mixture of experts)"])
    down_calls = [
        c for c in record.calls if (inside(c, mlp.path) or c is mlp) and _is_linear(c.module) and c.output is not None
    ]
    down_calls = [c for c in down_calls if c.output.shape[-1] == d_model]
    if not down_calls:
        raise _fail(model, [f"the MLP output projection (a linear map in <block>.{mlp_path})"])
    o_proj = max(o_calls, key=lambda c: c.order).path[2:]
    mlp_down = max(down_calls, key=lambda c: c.order).path[2:]

    norms = [c for c in children if _is_norm(c.module)]
    attn_update, attn_out = attn.output, attn_path
    sandwich = next(
        (n for n in norms if n.order > attn.end and n.order < mlp.order and _close(n.input, attn.output)), None
    )
    if sandwich is not None:
        attn_update, attn_out = sandwich.output, sandwich.path[2:]
    mlp_update, mlp_out = mlp.output, mlp_path
    mlp_sandwich = next((n for n in norms if n.order > mlp.end and _close(n.input, mlp.output)), None)
    if mlp_sandwich is not None:
        mlp_update, mlp_out = mlp_sandwich.output, mlp_sandwich.path[2:]
    ln_attn = next((n for n in reversed(norms) if n.end < attn.order and _close(n.output, attn.input)), None)
    ln_mlp = next(
        (n for n in reversed(norms) if n.end < mlp.order and n is not sandwich and _close(n.output, mlp.input)), None
    )
    ln_attn = ln_attn or sandwich  # norms after each sublayer only (OLMo 2 style)
    if ln_attn is None:
        missing.append("the norm in front of the attention")
    if attn_update is None or mlp_update is None or attn_update.shape != pre.shape:
        missing.append("the attention and MLP updates to the residual stream")
    if missing:
        raise _fail(model, missing)
    if ln_mlp is not None and ln_mlp is not ln_attn:
        parallel = _close(ln_mlp.input, pre) and not _close(ln_mlp.input, pre + attn_update)
        reads_residual = parallel or _close(ln_mlp.input, pre + attn_update)
    else:
        ln_mlp = None
        parallel = _close(mlp.input, attn.input)  # one norm for both (Phi)
        reads_residual = parallel or _close(mlp.input, pre + attn_update)  # no norm in front (OLMo 2)
    if not reads_residual:
        raise _fail(model, ["what the MLP reads (neither the block input nor the block input plus attention)"])
    if not _close(post, pre + attn_update + mlp_update):
        raise _fail(
            model,
            [
                "a block whose output is its input plus the attention and MLP updates "
                "(post-norm blocks and other layouts need a table entry)"
            ],
        )

    final_norm = None
    if last is not None and last.output is not None:
        outside = [c for c in record.calls if c.path.startswith("o.") and _is_norm(c.module) and c.order > last.end]
        final_norm = next((c.path[2:] for c in outside if _close(c.input, last.output)), None)
    output_embeddings = model.get_output_embeddings()
    lm_head = "lm_head"
    if output_embeddings is not None:
        path = _path_of(model, output_embeddings) or "lm_head"
        lm_head = path.split(".")[0]
    family = Family(
        name=model_type,
        model_types=(model_type,),
        blocks=blocks_path,
        embed=embed_path,
        final_norm=final_norm,
        attn=attn_path,
        attn_out=attn_out,
        o_proj=o_proj,
        mlp_out=mlp_out,
        mlp_down=mlp_down,
        ln_attn=ln_attn.path[2:],
        ln_mlp=None if ln_mlp is None else ln_mlp.path[2:],
        lm_head=lm_head,
        parallel=parallel,
        conv1d=type(block.get_submodule(o_proj)).__name__ == "Conv1D",
    )
    paths = (attn_path, attn_out, o_proj, mlp_out, mlp_down, family.ln_attn, family.ln_mlp)
    differ = sorted({p for b in blocks for p in paths if p and _get(b, p) is None})
    if differ:
        raise _fail(model, [f"{', '.join(differ)} in every block (the blocks differ, e.g. dense and expert layers)"])
    return _bind(model, family, d_model)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _bind(model: nn.Module, family: Family, d_model: int) -> Architecture:
    config = model.config
    blocks = model.base_model.get_submodule(family.blocks)
    o_proj = blocks[0].get_submodule(family.o_proj)
    weight = o_proj.weight.T if family.conv1d else o_proj.weight  # [d_model, head·d_head]
    width = int(weight.shape[1])
    n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    d_head = int(getattr(config, "head_dim", None) or (width // n_heads if n_heads else 0))
    if n_heads and n_heads * d_head != width and width % n_heads == 0:
        d_head = width // n_heads  # values narrower than queries and keys (multi-head latent attention)
    if not n_heads or n_heads * d_head != width:
        raise _fail(model, [f"the number of attention heads (config says {n_heads}, the output projection is {width})"])
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    lm_head = next((m for n, m in model.named_children() if n == family.lm_head), None)
    return Architecture(
        family=family,
        model=model,
        blocks=tuple(blocks),
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_model=d_model,
        d_head=d_head,
        parallel=bool(family.parallel),
        lm_head=lm_head,
    )
