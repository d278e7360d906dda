"""The architecture table: where each model family keeps its parts.

Model families are data, not code branches. A :class:`Family` names, by module path, the
pieces lmscope hooks and reads weights from; :func:`architecture_of` binds a family to one
loaded model and checks that every path exists, so a model that does not fit fails early with
a message naming what could not be found.

Paths are dotted attribute paths. ``blocks``, ``embed`` and ``final_norm`` are relative to the
model's base model (``model.base_model``: the same object for a bare ``BertModel`` and for the
``BertForMaskedLM`` around it); all per-block paths are relative to one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmscope.errors import LmscopeError

__all__ = ["FAMILIES", "Architecture", "Family", "architecture_of", "family_of"]


@dataclass(frozen=True)
class Family:
    """Module paths and flags of one model family.

    Attributes:
        name: the family's lmscope name (used by ``tiny-<name>``).
        model_types: the ``config.model_type`` values this family covers.
        blocks: the ``nn.ModuleList`` of Transformer blocks (base-model relative).
        embed: the token embedding (base-model relative).
        final_norm: the norm applied before the unembedding, or ``None``.
        attn: the attention module whose attention function receives q, k, v (block relative).
        attn_out: the module whose output (first element) is the attention update added to the
            residual stream.
        o_proj: the attention output projection (``W_O``, all heads side by side).
        mlp_out: the module whose output is the MLP update added to the residual stream.
        mlp_down: the MLP output projection; its input is ``mlp_act``.
        ln_attn, ln_mlp: the norms in front of attention and MLP (after them, for post-norm).
        lm_head: the module (relative to the top model) that maps the final-normed residual
            state to logits: the unembedding, or a whole MLM head for BERT-style models.
        resid_mid: for post-norm blocks, the module whose output is the residual state between
            attention and MLP.
        parallel: attention and MLP read the same input and are added together
            (``resid_post = resid_pre + attn_out + mlp_out``). A string names a boolean config
            attribute that decides it.
        post_norm: the residual stream is normalized after each sublayer (BERT), so
            ``resid_mid = ln_attn(resid_pre + attn_out)``.
        conv1d: weights are stored ``[in, out]`` (GPT-2's ``Conv1D``) instead of ``[out, in]``.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str | None
    attn: str
    attn_out: str
    o_proj: str
    mlp_out: str
    mlp_down: str
    ln_attn: str
    ln_mlp: str | None
    lm_head: str = "lm_head"
    resid_mid: str | None = None
    parallel: bool | str = False
    post_norm: bool = False
    conv1d: bool = False


def _llama_like(name: str, *model_types: str) -> Family:
    return Family(
        name=name,
        model_types=model_types or (name,),
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.o_proj",
        mlp_out="mlp",
        mlp_down="mlp.down_proj",
        ln_attn="input_layernorm",
        ln_mlp="post_attention_layernorm",
    )


def _bert_like(name: str, lm_head: str) -> Family:
    return Family(
        name=name,
        model_types=(name,),
        blocks="encoder.layer",
        embed="embeddings.word_embeddings",
        final_norm=None,
        attn="attention.self",
        attn_out="attention.output.dense",
        o_proj="attention.output.dense",
        mlp_out="output.dense",
        mlp_down="output.dense",
        ln_attn="attention.output.LayerNorm",
        ln_mlp="output.LayerNorm",
        lm_head=lm_head,
        resid_mid="attention",
        post_norm=True,
    )


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    _llama_like("gemma"),
    _llama_like("olmo"),
    Family(
        name="gemma2",
        model_types=("gemma2",),
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="post_attention_layernorm",
        o_proj="self_attn.o_proj",
        mlp_out="post_feedforward_layernorm",
        mlp_down="mlp.down_proj",
        ln_attn="input_layernorm",
        ln_mlp="pre_feedforward_layernorm",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="h",
        embed="wte",
        final_norm="ln_f",
        attn="attn",
        attn_out="attn",
        o_proj="attn.c_proj",
        mlp_out="mlp",
        mlp_down="mlp.c_proj",
        ln_attn="ln_1",
        ln_mlp="ln_2",
        conv1d=True,
    ),
    Family(
        name="gpt-neox",
        model_types=("gpt_neox",),
        blocks="layers",
        embed="embed_in",
        final_norm="final_layer_norm",
        attn="attention",
        attn_out="attention",
        o_proj="attention.dense",
        mlp_out="mlp",
        mlp_down="mlp.dense_4h_to_h",
        ln_attn="input_layernorm",
        ln_mlp="post_attention_layernorm",
        parallel="use_parallel_residual",
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="decoder.layers",
        embed="decoder.embed_tokens",
        final_norm="decoder.final_layer_norm",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.out_proj",
        mlp_out="fc2",
        mlp_down="fc2",
        ln_attn="self_attn_layer_norm",
        ln_mlp="final_layer_norm",
    ),
    Family(
        name="phi",
        model_types=("phi",),
        blocks="layers",
        embed="embed_tokens",
        final_norm="final_layernorm",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.dense",
        mlp_out="mlp",
        mlp_down="mlp.fc2",
        ln_attn="input_layernorm",
        ln_mlp=None,
        parallel=True,
    ),
    _bert_like("bert", lm_head="cls"),
    _bert_like("roberta", lm_head="lm_head"),
)


def family_of(model_type: str) -> Family:
    """The family covering ``config.model_type``, or a clear error listing the known ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted({t for f in FAMILIES for t in f.model_types}))
    raise LmscopeError(
        f"unsupported architecture {model_type!r}: lmscope's architecture table has no entry for it "
        f"(supported model types: {known})"
    )


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


@dataclass(frozen=True)
class Architecture:
    """A :class:`Family` bound to one model: resolved modules and the model's dimensions.

    Shapes use lmscope's axis vocabulary (``layer, pos, head, kv_head, d_model, d_head, neuron,
    vocab``).
    """

    family: Family
    model: nn.Module
    blocks: tuple[nn.Module, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    parallel: bool
    lm_head: nn.Module | None = None

    def block_part(self, layer: int, path: str | None) -> nn.Module | None:
        """The module at ``path`` inside block ``layer`` (``None`` for ``None``)."""
        return None if path is None else _get(self.blocks[layer], path)

    def attn(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.attn)

    @property
    def final_norm(self) -> nn.Module | None:
        if self.family.final_norm is None:
            return None
        return self.model.base_model.get_submodule(self.family.final_norm)

    @property
    def embed(self) -> nn.Module:
        return self.model.base_model.get_submodule(self.family.embed)

    @property
    def unembedding(self) -> nn.Module | None:
        """The output embedding (``[vocab, d_model]`` weight), or ``None`` for models without a head."""
        return self.model.get_output_embeddings()

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        """A projection's weight as ``[out, in]``, whatever the family stores."""
        weight = module.weight
        return weight.T if self.family.conv1d else weight

    def o_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.o_proj)

    def mlp_down(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.mlp_down)

    @property
    def n_neurons(self) -> int:
        """MLP hidden units: the input width of the MLP's output projection (``mlp_act``'s last axis)."""
        down = self.mlp_down(0)
        return int(getattr(down, "in_features", 0) or self.linear_weight(down).shape[-1])


def architecture_of(model: nn.Module) -> Architecture:
    """Bind the family of ``model`` to it, checking that every path in the table resolves."""
    config = model.config
    family = family_of(getattr(config, "model_type", "") or type(model).__name__)
    base = model.base_model
    blocks = _get(base, family.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise LmscopeError(
            f"{type(model).__name__}: could not find the Transformer blocks at {family.blocks!r} "
            f"(family {family.name!r})"
        )
    missing = [p for p in (family.embed, family.final_norm) if p and _get(base, p) is None]
    per_block = (family.attn, family.attn_out, family.o_proj, family.mlp_out, family.mlp_down)
    missing += [f"<block>.{p}" for p in per_block if _get(blocks[0], p) is None]
    if family.resid_mid and _get(blocks[0], family.resid_mid) is None:
        missing.append(f"<block>.{family.resid_mid}")
    if missing:
        raise LmscopeError(
            f"{type(model).__name__} does not match lmscope's {family.name!r} family: "
            f"could not find {', '.join(missing)}"
        )
    lm_head = _get(model, family.lm_head)

    n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    n_kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
    d_model = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    parallel = family.parallel
    if isinstance(parallel, str):
        parallel = bool(getattr(config, parallel, False))
    return Architecture(
        family=family,
        model=model,
        blocks=tuple(blocks),
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_model=d_model,
        d_head=d_head,
        parallel=bool(parallel),
        lm_head=lm_head,
    )
