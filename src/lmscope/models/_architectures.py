"""The architecture table: where each model family keeps its parts.

Model families are data, not code branches. A :class:`Family` names, by module path, the
pieces lmscope hooks and reads weights from; :func:`architecture_of` binds a family to one
loaded model and checks that every path exists, so a model that does not fit fails early with
a message naming what could not be found.

Paths are dotted attribute paths. ``blocks``, ``embed`` and ``final_norm`` are relative to the
model's base model (``model.base_model``: the same object for a bare ``BertModel`` and for the
``BertForMaskedLM`` around it); all per-block paths are relative to one block.

Where a family packs several projections into one linear map (``qkv_proj``, ``query_key_value``,
``c_attn``, ``Wqkv``, ``gate_up_proj``), a :class:`Fused` entry says how its output axis splits,
and :meth:`Architecture.split` returns the separate weights. Model types that cannot work are in
:data:`UNSUPPORTED` with the reason, which the error for them names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lmscope.errors import LmscopeError
from lmscope.models._placement import tensor_of

__all__ = [
    "FAMILIES",
    "NO_ATTENTION",
    "UNSUPPORTED",
    "Architecture",
    "Experts",
    "Family",
    "Fused",
    "architecture_of",
    "family_of",
]


@dataclass(frozen=True)
class Fused:
    """One linear map that computes several projections at once, and how to split its output.

    The output axis is laid out ``[group, part, size / groups]``: ``groups`` blocks, each holding
    a slice of every part in ``parts`` order. ``groups=1`` is plain concatenation (Phi-3's
    ``qkv_proj``, ``gate_up_proj``); ``"heads"`` / ``"kv_heads"`` mean one block per (key-value)
    head (Persimmon's ``query_key_value``; GPT-BigCode's ``c_attn``, which is concatenation under
    multi-query attention); an integer is a fixed count (CodeGen packs 4 blocks of q, v, k).

    Part sizes: ``q`` is ``head·d_head``, ``k`` and ``v`` are ``kv_head·d_head``, ``gate`` and
    ``up`` are ``neuron``. ``gate`` is the half that goes through the activation function
    (``mlp_act = act(gate) * up``).

    Attributes:
        path: the fused module (block relative).
        parts: the projections in storage order, from ``q, k, v, gate, up``.
        groups: how many blocks the output axis is cut into (see above).
    """

    path: str
    parts: tuple[str, ...]
    groups: int | str = 1


_QKV = ("q", "k", "v")
_GATE_UP = ("gate", "up")


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts FFN keeps its router, experts and shared experts (block relative).

    transformers 5.x stores a block's routed experts as fused 3-D parameters of one module:
    ``gate_up_proj [expert, 2·neuron, d_model]`` (the ``gate`` half first, then ``up``;
    ``mlp_act = act(gate) * up``) and ``down_proj [expert, d_model, neuron]``. The experts module
    is called as ``experts(x, top_k_index, top_k_weights)`` and returns ``Σ_j w_j · E_{i_j}(x)``,
    so each routed expert's update is its router weight times its output. The router's own code
    (softmax or sigmoid scores, top-k, renormalization, scaling, group-limited choice) is run, not
    re-implemented; the config attributes below are named so that views can show them.

    Layers whose FFN is dense (DeepSeek's ``first_k_dense_replace``, Qwen2-MoE's
    ``mlp_only_layers``) have no ``experts`` module; their FFN is one component as usual.

    Attributes:
        experts: the module holding the routed experts' fused weights.
        router: the module that returns ``(router_logits, top_k_weights, top_k_index)``.
        shared: the shared expert (an MLP every token goes through), or ``None``.
        shared_gate: a linear map whose sigmoid scales the shared expert's output (Qwen2-MoE).
        n_experts: the config attribute holding the number of routed experts.
        top_k: the config attribute holding how many experts each token is routed to.
        scoring: how router scores are made (``softmax``, ``sigmoid``, ``sparsemixer``).
        normalize: the config attribute that says whether the top-k weights are renormalized to
            sum 1 (``True``: always; ``None``: never).
        scaling: the config attribute the top-k weights are multiplied by, or ``None``.
        input_scaled: the router weight scales each chosen expert's input, not its output
            (Llama 4: ``Σ_j E_{i_j}(w_j · x)``, the experts module called once on every expert's
            scaled copy of the tokens, zero for experts not chosen); its fused weights are then
            stored ``[expert, d_model, 2·neuron]`` and ``[expert, neuron, d_model]``, and the
            router returns ``(scores [pos, expert], router_logits)``.
    """

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    shared: str | None = None
    shared_gate: str | None = None
    n_experts: str = "num_local_experts"
    top_k: str = "num_experts_per_tok"
    scoring: str = "softmax"
    normalize: str | bool | None = True
    scaling: str | None = None
    input_scaled: bool = False


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
        ln_attn, ln_mlp: the norms in front of attention and MLP (after them, for post-norm);
            ``None`` where the block has none (OLMo 2 normalizes sublayer outputs instead).
        lm_head: the module (relative to the top model) that maps the final-normed residual
            state to logits: the unembedding, or a whole MLM head for BERT-style models. A tuple
            of paths is applied in order (ELECTRA's generator head, then its unembedding).
        encoder: for an encoder-decoder (seq2seq) model, the encoder stack's own Family (paths
            relative to the same base model); this Family is then the decoder stack's.
        cross_attn, cross_attn_out, cross_o_proj: the decoder block's cross-attention module
            (queries from the decoder, keys and values from the encoder output), the module whose
            output is the cross-attention update, and its output projection.
        ln_cross: the norm in front of cross-attention (after it, for post-norm).
        resid_cross: for post-norm blocks, the module whose output is the residual state between
            cross-attention and MLP.
        n_heads_attr: the config attribute holding this stack's head count, where the stacks
            differ (BART's ``encoder_attention_heads`` / ``decoder_attention_heads``).
        unembed_rescale: a boolean config attribute that, when true, means the final-normed state
            is multiplied by ``d_model ** -0.5`` before a tied unembedding (T5).
        logits_bias: a buffer of the top model added to the logits (BART's ``final_logits_bias``).
        resid_mid: for post-norm blocks, the module whose output is the residual state between
            attention and MLP.
        parallel: attention and MLP read the same input and are added together
            (``resid_post = resid_pre + attn_out + mlp_out``). A string names a boolean config
            attribute that decides it.
        post_norm: the residual stream is normalized after each sublayer (BERT), so
            ``resid_mid = ln_attn(resid_pre + attn_out)``.
        conv1d: weights are stored ``[in, out]`` (GPT-2's ``Conv1D``) instead of ``[out, in]``.
        fused: the block's fused projections and how to split them (:class:`Fused`).
        multi_query: a boolean config attribute that, when true, means one key-value head.
        logit_scale: a config attribute the model multiplies its logits by (Cohere).
        logit_divisor: a config attribute the model divides its logits by (Granite).
        residual_scale: a config attribute the block multiplies each sublayer's output by before
            adding it to the residual stream (Granite's ``residual_multiplier``); ``attn_out`` and
            ``mlp_out`` are recorded scaled, as added.
        qkv: for a family whose attention module computes its own eager attention instead of
            calling transformers' attention interface (GPT-Neo), the q, k, v projections (block
            relative) whose outputs are the queries, keys and values (no rotary embedding), or
            one fused projection listed in ``fused`` (BLOOM, MPT); the module's second output is
            then its attention probabilities.
        alibi: for such a module, the keyword argument that carries its ALiBi bias (Press et al.
            2022, "Train Short, Test Long": ``scores = q·kᵀ·scaling + m_h·j`` with one slope
            ``m_h`` per head and ``j`` the key position), any shape that reshapes to ``[batch or
            1, head, 1 or pos_q, pos_k]`` once its trailing keys are kept; recorded as the
            ``position_bias`` site, so ``softmax(q·kᵀ·scaling + position_bias + mask)`` is the
            module's attention.
        alibi_in_mask: the model folds the (scaled) ALiBi bias into the attention mask it gives
            the module (Falcon), so that mask, with the float minimum on masked keys, is the
            recorded ``position_bias``.
        scaling_attr, qkv_clip: attributes of such a module holding the factor it multiplies
            ``q·kᵀ`` by and the bound it clamps its fused projection's output to (MPT's
            ``softmax_scale`` and ``clip_qkv``; ``None`` values mean the default and no clamp).
        eager_differs: why transformers' eager ``output_attentions`` path is not the attention this
            family runs (Falcon), so ``lmscope verify`` compares its probabilities with the attention
            output they make (the blocks check) instead of with eager attention.
        output_attentions: such a module returns its probabilities only when called with
            ``output_attentions=True`` (DeBERTa-v2), which the recorder then passes it (its output
            is otherwise the same).
        rotary: the module rotates the fused projection's queries and keys with its model file's
            ``apply_rotary_pos_emb`` and the ``position_embeddings`` it is given, when no ALiBi
            bias is passed (Falcon). Where such a module returns no probabilities (SDPA), they are
            ``softmax(q·kᵀ·scaling + mask)`` from the queries, keys and mask it used.
        attn_scaling: the factor such a module multiplies ``q·kᵀ`` by (GPT-Neo: 1, no ``1/√d``;
            ``None``: ``1/√d_head``, applied by XGLM to the query projection's output).
        attn, attn_out, o_proj: ``None`` for a state-space model without attention (Mamba): its
            mixer is then the block's one sublayer, recorded as the "MLP" (``mlp_out`` the mixer's
            update, ``mlp_act`` its output projection's input), and only analyses of the residual
            stream, gradients and activations apply (:data:`NO_ATTENTION`).
        experts: a mixture-of-experts FFN (:class:`Experts`). ``mlp_down`` is then the FFN module
            itself, so ``mlp_act`` records the FFN's input ``[pos, d_model]`` in every layer (dense
            or routed), from which each expert's activations are recomputed.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str | None
    attn: str | None
    attn_out: str | None
    o_proj: str | None
    mlp_out: str
    mlp_down: str
    ln_attn: str | None
    ln_mlp: str | None
    lm_head: str | tuple[str, ...] = "lm_head"
    encoder: Family | None = None
    cross_attn: str | None = None
    cross_attn_out: str | None = None
    cross_o_proj: str | None = None
    ln_cross: str | None = None
    resid_cross: str | None = None
    n_heads_attr: str | None = None
    unembed_rescale: str | None = None
    logits_bias: str | None = None
    resid_mid: str | None = None
    parallel: bool | str = False
    post_norm: bool = False
    conv1d: bool = False
    fused: tuple[Fused, ...] = ()
    multi_query: str | None = None
    logit_scale: str | None = None
    logit_divisor: str | None = None
    residual_scale: str | None = None
    qkv: tuple[str, ...] | None = None
    attn_scaling: float | None = None
    alibi: str | None = None
    alibi_in_mask: bool = False
    rotary: bool = False
    output_attentions: bool = False
    eager_differs: str | None = None
    scaling_attr: str | None = None
    qkv_clip: str | None = None
    experts: Experts | None = None


def _llama_like(name: str, *model_types: str, **changes: Any) -> Family:
    """Llama's layout (``model.layers[i].self_attn.o_proj`` …), with ``changes`` to any field."""
    family = Family(
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
    return replace(family, **changes)


def _sandwich(name: str, *model_types: str, **changes: Any) -> Family:
    """Llama's layout with each sublayer's output normalized before it joins the residual (Gemma 2/3, OLMo 2)."""
    changes = {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm", **changes}
    return _llama_like(name, *model_types, **changes)


def _moe(name: str, experts: Experts, **changes: Any) -> Family:
    """Llama's layout with a mixture-of-experts FFN (``mlp_act`` is the FFN's input; see :class:`Experts`)."""
    return _llama_like(name, experts=experts, **{"mlp_down": "mlp", **changes})


def _state_space(name: str, *model_types: str) -> Family:
    """Mamba's layout: one norm and one mixer per block, no attention (the mixer stands in the MLP's place)."""
    return Family(
        name=name,
        model_types=model_types or (name,),
        blocks="layers",
        embed="embeddings",
        final_norm="norm_f",
        attn=None,
        attn_out=None,
        o_proj=None,
        mlp_out="mixer",
        mlp_down="mixer.out_proj",
        ln_attn=None,
        ln_mlp="norm",
    )


def _gptj_like(name: str, **changes: Any) -> Family:
    """GPT-J's parallel block: one norm, attention and MLP side by side (CodeGen too)."""
    family = Family(
        name=name,
        model_types=(name,),
        blocks="h",
        embed="wte",
        final_norm="ln_f",
        attn="attn",
        attn_out="attn",
        o_proj="attn.out_proj",
        mlp_out="mlp",
        mlp_down="mlp.fc_out",
        ln_attn="ln_1",
        ln_mlp=None,
        parallel=True,
    )
    return replace(family, **changes)


def _t5_stack(stack: str, ffn: int, **changes: Any) -> Family:
    """One stack of T5 (``layer.0`` self-attention, ``layer.1`` cross-attention in the decoder, then the FFN).

    The FFN's output projection ``wo`` is the same in the ReLU (v1.0) and gated-GELU (v1.1, Flan)
    layouts, whose ``wi_0``/``wi_1`` pair only changes what ``mlp_act`` (``wo``'s input) is.
    """
    family = Family(
        name="t5",
        model_types=(),
        blocks=f"{stack}.block",
        embed=f"{stack}.embed_tokens",
        final_norm=f"{stack}.final_layer_norm",
        attn="layer.0.SelfAttention",
        attn_out="layer.0.SelfAttention",
        o_proj="layer.0.SelfAttention.o",
        mlp_out=f"layer.{ffn}.DenseReluDense",
        mlp_down=f"layer.{ffn}.DenseReluDense.wo",
        ln_attn="layer.0.layer_norm",
        ln_mlp=f"layer.{ffn}.layer_norm",
        lm_head="lm_head",
    )
    return replace(family, **changes)


def _bart_like(name: str, *model_types: str, pre_norm: bool, final_norm: bool) -> Family:
    """BART's two stacks (``self_attn``, ``encoder_attn``, ``fc1``/``fc2``): post-norm (BART, Marian) or
    pre-norm with a final norm per stack (mBART, Pegasus); logits get ``final_logits_bias``."""
    encoder = Family(
        name=name,
        model_types=(),
        blocks="encoder.layers",
        embed="encoder.embed_tokens",
        final_norm="encoder.layer_norm" if final_norm else None,
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.out_proj",
        mlp_out="fc2",
        mlp_down="fc2",
        ln_attn="self_attn_layer_norm",
        ln_mlp="final_layer_norm",
        lm_head="lm_head",
        resid_mid=None if pre_norm else "self_attn_layer_norm",
        post_norm=not pre_norm,
        n_heads_attr="encoder_attention_heads",
    )
    return replace(
        encoder,
        model_types=model_types or (name,),
        blocks="decoder.layers",
        embed="decoder.embed_tokens",
        final_norm="decoder.layer_norm" if final_norm else None,
        encoder=encoder,
        cross_attn="encoder_attn",
        cross_attn_out="encoder_attn",
        cross_o_proj="encoder_attn.out_proj",
        ln_cross="encoder_attn_layer_norm",
        resid_cross=None if pre_norm else "encoder_attn_layer_norm",
        n_heads_attr="decoder_attention_heads",
        logits_bias="final_logits_bias",
    )


def _bert_like(name: str, lm_head: str | tuple[str, ...], *model_types: str) -> Family:
    return Family(
        name=name,
        model_types=model_types or (name,),
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
    _llama_like("smollm3"),
    _llama_like("helium"),
    _llama_like("granite", logit_divisor="logits_scaling", residual_scale="residual_multiplier"),
    _llama_like("seed_oss"),
    _llama_like("ernie4_5"),
    _llama_like("arcee"),
    _llama_like("ministral"),
    _llama_like("hunyuan_v1_dense"),
    _llama_like("nemotron", mlp_down="mlp.down_proj"),
    _llama_like("vaultgemma", ln_mlp="pre_feedforward_layernorm"),
    _llama_like("apertus", ln_attn="attention_layernorm", ln_mlp="feedforward_layernorm"),
    _llama_like("cwm"),
    _llama_like("jais2"),
    _llama_like("ministral3"),
    _llama_like("nanochat", mlp_down="mlp.fc2"),
    _llama_like("stablelm", parallel="use_parallel_residual"),
    _llama_like("starcoder2", mlp_down="mlp.c_proj"),
    _llama_like("phi3", fused=(Fused("self_attn.qkv_proj", _QKV), Fused("mlp.gate_up_proj", _GATE_UP))),
    _llama_like("glm", fused=(Fused("mlp.gate_up_proj", _GATE_UP),)),
    _llama_like("cohere", "cohere", "cohere2", ln_mlp=None, parallel=True, logit_scale="logit_scale"),
    _llama_like(
        "persimmon",
        final_norm="final_layernorm",
        o_proj="self_attn.dense",
        mlp_down="mlp.dense_4h_to_h",
        fused=(Fused("self_attn.query_key_value", _QKV, groups="heads"),),
    ),
    _sandwich("gemma2", ln_mlp="pre_feedforward_layernorm"),
    _sandwich("gemma3", "gemma3_text", ln_mlp="pre_feedforward_layernorm"),
    _sandwich("olmo2", "olmo2", "olmo3", ln_attn=None, ln_mlp=None),
    _sandwich("exaone4", ln_attn=None, ln_mlp=None),
    _sandwich(
        "hyperclovax",
        attn_out="post_norm1",
        mlp_out="post_norm2",
        logit_scale="logits_scaling",
        residual_scale="residual_multiplier",
    ),
    _sandwich(
        "glm4",
        attn_out="post_self_attn_layernorm",
        mlp_out="post_mlp_layernorm",
        fused=(Fused("mlp.gate_up_proj", _GATE_UP),),
    ),
    _moe("mixtral", Experts()),
    _moe("phimoe", Experts(router="mlp.router", scoring="sparsemixer", normalize=None)),
    _moe(
        "qwen2_moe",
        Experts(
            n_experts="num_experts",
            normalize="norm_topk_prob",
            shared="mlp.shared_expert",
            shared_gate="mlp.shared_expert_gate",
        ),
    ),
    _moe("qwen3_moe", Experts(n_experts="num_experts", normalize="norm_topk_prob")),
    _moe("olmoe", Experts(n_experts="num_experts", normalize="norm_topk_prob")),
    _moe(
        "deepseek_v2",
        Experts(
            n_experts="n_routed_experts", normalize=None, scaling="routed_scaling_factor", shared="mlp.shared_experts"
        ),
    ),
    _moe(
        "glm4_moe",
        Experts(
            n_experts="n_routed_experts",
            scoring="sigmoid",
            normalize="norm_topk_prob",
            scaling="routed_scaling_factor",
            shared="mlp.shared_experts",
        ),
    ),
    _moe("ernie4_5_moe", Experts(n_experts="moe_num_experts", shared="mlp.shared_experts")),
    _moe(
        "exaone_moe",
        Experts(
            n_experts="num_experts",
            scoring="sigmoid",
            normalize="norm_topk_prob",
            scaling="routed_scaling_factor",
            shared="mlp.shared_experts",
        ),
    ),
    _moe("hunyuan_v1_moe", Experts(n_experts="num_experts", shared="mlp.shared_mlp")),
    _moe(
        "granitemoe",
        Experts(experts="block_sparse_moe.experts", router="block_sparse_moe.router", normalize=None),
        mlp_out="block_sparse_moe",
        mlp_down="block_sparse_moe",
        logit_divisor="logits_scaling",
        residual_scale="residual_multiplier",
    ),
    _moe(
        "deepseek_v3",
        Experts(
            n_experts="n_routed_experts",
            scoring="sigmoid",
            normalize="norm_topk_prob",
            scaling="routed_scaling_factor",
            shared="mlp.shared_experts",
        ),
    ),
    _moe(
        "llama4",
        Experts(
            experts="feed_forward.experts",
            router="feed_forward.router",
            shared="feed_forward.shared_expert",
            scoring="sigmoid",
            normalize=None,
            input_scaled=True,
        ),
        model_types=("llama4_text",),
        blocks="model.layers",  # its base_model_prefix names no attribute: paths from the top model
        embed="model.embed_tokens",
        final_norm="model.norm",
        mlp_out="feed_forward",
        mlp_down="feed_forward",
    ),
    _state_space("mamba", "mamba", "falcon_mamba"),
    _state_space("mamba2"),
    _gptj_like("gptj"),
    _gptj_like("codegen", fused=(Fused("attn.qkv_proj", ("q", "v", "k"), groups=4),)),
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
    Family(
        name="gpt-bigcode",
        model_types=("gpt_bigcode",),
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
        fused=(Fused("attn.c_attn", _QKV, groups="kv_heads"),),
        multi_query="multi_query",
    ),
    Family(
        name="gpt-neo",
        model_types=("gpt_neo",),
        blocks="h",
        embed="wte",
        final_norm="ln_f",
        attn="attn.attention",
        attn_out="attn.attention",
        o_proj="attn.attention.out_proj",
        mlp_out="mlp",
        mlp_down="mlp.c_proj",
        ln_attn="ln_1",
        ln_mlp="ln_2",
        qkv=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
        attn_scaling=1.0,
    ),
    Family(
        name="bloom",
        model_types=("bloom",),
        blocks="h",
        embed="word_embeddings",
        final_norm="ln_f",
        attn="self_attention",
        attn_out="self_attention.dense",  # the attention module returns its update plus the residual
        o_proj="self_attention.dense",
        mlp_out="mlp.dense_4h_to_h",  # so does the MLP
        mlp_down="mlp.dense_4h_to_h",
        ln_attn="input_layernorm",
        ln_mlp="post_attention_layernorm",
        fused=(Fused("self_attention.query_key_value", _QKV, groups="heads"),),
        qkv=("self_attention.query_key_value",),
        alibi="alibi",
    ),
    Family(
        name="mpt",
        model_types=("mpt",),
        blocks="blocks",
        embed="wte",
        final_norm="norm_f",
        attn="attn",
        attn_out="attn",
        o_proj="attn.out_proj",
        mlp_out="ffn.down_proj",  # the MLP module returns its update plus the residual
        mlp_down="ffn.down_proj",
        ln_attn="norm_1",
        ln_mlp="norm_2",
        fused=(Fused("attn.Wqkv", _QKV),),
        qkv=("attn.Wqkv",),
        alibi="position_bias",
        scaling_attr="softmax_scale",
        qkv_clip="clip_qkv",
    ),
    Family(
        name="falcon",
        model_types=("falcon",),
        blocks="h",
        embed="word_embeddings",
        final_norm="ln_f",
        attn="self_attention",
        attn_out="self_attention",
        o_proj="self_attention.dense",
        mlp_out="mlp",
        mlp_down="mlp.dense_4h_to_h",
        ln_attn="input_layernorm",  # the new (40B) architecture: ln_attn and ln_mlp
        ln_mlp="post_attention_layernorm",  # none where attention and MLP share one norm
        parallel="parallel_attn",
        multi_query="multi_query",
        # [kv_head, q·(head / kv_head) + k + v]: one key-value head (multi-query), one per head, or groups (40B)
        fused=(Fused("self_attention.query_key_value", _QKV, groups="kv_heads"),),
        qkv=("self_attention.query_key_value",),
        alibi="alibi",
        alibi_in_mask=True,
        rotary=True,
        eager_differs="adds the boolean SDPA mask to its scores, and with ALiBi adds the bias a second time",
    ),
    Family(
        name="xglm",
        model_types=("xglm",),
        blocks="layers",
        embed="embed_tokens",
        final_norm="layer_norm",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.out_proj",
        mlp_out="fc2",
        mlp_down="fc2",
        ln_attn="self_attn_layer_norm",
        ln_mlp="final_layer_norm",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    Family(
        name="biogpt",
        model_types=("biogpt",),
        blocks="layers",
        embed="embed_tokens",
        final_norm="layer_norm",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.out_proj",
        mlp_out="fc2",
        mlp_down="fc2",
        ln_attn="self_attn_layer_norm",
        ln_mlp="final_layer_norm",
        lm_head="output_projection",
    ),
    _t5_stack(
        "decoder",
        2,
        model_types=("t5", "mt5", "umt5"),  # umT5: a relative position bias of its own in every layer
        encoder=_t5_stack("encoder", 1),
        cross_attn="layer.1.EncDecAttention",
        cross_attn_out="layer.1.EncDecAttention",
        cross_o_proj="layer.1.EncDecAttention.o",
        ln_cross="layer.1.layer_norm",
        unembed_rescale="scale_decoder_outputs",
    ),
    _bart_like("bart", pre_norm=False, final_norm=False),
    _bart_like("marian", pre_norm=False, final_norm=False),
    _bart_like("mbart", pre_norm=True, final_norm=True),
    _bart_like("pegasus", pre_norm=True, final_norm=True),
    _bert_like("bert", lm_head="cls"),
    _bert_like("roberta", "lm_head", "roberta", "xlm-roberta", "camembert", "data2vec-text"),
    _bert_like("ernie", "cls", "ernie", "layoutlm", "roc_bert"),
    _bert_like("electra", ("generator_predictions", "generator_lm_head")),
    replace(  # disentangled attention (He et al. 2021): content and relative-position terms, its own softmax
        _bert_like("deberta-v2", "cls"),
        qkv=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
        output_attentions=True,
    ),
    replace(
        _bert_like("roberta-prelayernorm", "lm_head"),
        final_norm="LayerNorm",
        resid_mid=None,
        post_norm=False,
        ln_attn="attention.LayerNorm",
        ln_mlp="intermediate.LayerNorm",
    ),
    replace(
        _bert_like("xlm-roberta-xl", "lm_head"),
        final_norm="encoder.LayerNorm",
        resid_mid=None,
        post_norm=False,
        ln_attn="attention.self_attn_layer_norm",
        ln_mlp="LayerNorm",
    ),
    replace(
        _bert_like("esm", "lm_head"),
        final_norm="encoder.emb_layer_norm_after",
        resid_mid=None,
        post_norm=False,
        ln_attn="attention.LayerNorm",
        ln_mlp="LayerNorm",
    ),
    Family(
        name="distilbert",
        model_types=("distilbert",),
        blocks="transformer.layer",
        embed="embeddings.word_embeddings",
        final_norm=None,
        attn="attention",
        attn_out="attention.out_lin",
        o_proj="attention.out_lin",
        mlp_out="ffn.lin2",
        mlp_down="ffn.lin2",
        ln_attn="sa_layer_norm",
        ln_mlp="output_layer_norm",
        lm_head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
        resid_mid="sa_layer_norm",
        post_norm=True,
    ),
    _llama_like("eurobert"),
    *(
        _llama_like(
            name,
            embed="embeddings.word_embeddings",
            final_norm=None,
            ln_attn="post_attention_layernorm",
            ln_mlp="post_mlp_layernorm",
            resid_mid="post_attention_layernorm",
            post_norm=True,
            lm_head=lm_head,
        )
        for name, lm_head in (("nomic_bert", "cls"), ("gte", "lm_head"))
    ),
    Family(
        name="modernbert-decoder",
        model_types=("modernbert-decoder",),
        blocks="layers",
        embed="embeddings.tok_embeddings",
        final_norm="final_norm",
        attn="attn",
        attn_out="attn",
        o_proj="attn.Wo",
        mlp_out="mlp",
        mlp_down="mlp.Wo",
        ln_attn="attn_norm",
        ln_mlp="mlp_norm",
        lm_head=("lm_head", "decoder"),
        fused=(Fused("mlp.Wi", _GATE_UP),),
    ),
    Family(
        name="modernbert",
        model_types=("modernbert",),
        blocks="layers",
        embed="embeddings.tok_embeddings",
        final_norm="final_norm",
        attn="attn",
        attn_out="attn",
        o_proj="attn.Wo",
        mlp_out="mlp",
        mlp_down="mlp.Wo",
        ln_attn="attn_norm",
        ln_mlp="mlp_norm",
        lm_head=("head", "decoder"),
        fused=(Fused("attn.Wqkv", _QKV), Fused("mlp.Wi", _GATE_UP)),
    ),
)

NO_ATTENTION = (
    "is a state-space model without attention: the logit lens, rankings, saliency and activations apply to it; "
    "attention views, the flow graph, head and neuron contributions and attention edits do not"
)
"""Why an attention-less family (``attn=None``) refuses the analyses that need attention."""

UNSUPPORTED: dict[str, str] = {
    "ctrl": "it scales its input embeddings in place, so gradients with respect to them (saliency) cannot be taken",
    "granite_swa": "its learnable per-head attention sinks rescale each head's output after the softmax, which "
    "lmscope's attention probabilities and per-head contributions do not include yet",
    "bitnet": "its attention normalizes the heads' mixed values before the output projection, so per-head "
    "updates are not linear in the values",
}
"""Model types known not to work, each with the reason (named in the error)."""


def family_of(model_type: str) -> Family:
    """The family covering ``config.model_type``, or a clear error listing the known ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in UNSUPPORTED:
        raise LmscopeError(f"unsupported architecture {model_type!r}: {UNSUPPORTED[model_type]}")
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


class _Chain(nn.Sequential):
    """An LM head made of several of the model's modules, applied in order (ELECTRA, ModernBERT).

    A hook on its input is placed on its first module, which the model itself calls.
    """

    def register_forward_pre_hook(self, hook, **kwargs):  # type: ignore[override]
        return self[0].register_forward_pre_hook(hook, **kwargs)


@dataclass(frozen=True)
class Architecture:
    """A :class:`Family` bound to one model: resolved modules and the model's dimensions.

    Shapes use lmscope's axis vocabulary (``layer, pos, head, kv_head, d_model, d_head, neuron,
    vocab``). ``lm_head`` maps final-normed states to logits before ``logit_scale``, the factor
    the model multiplies them by afterwards (1 for most families). ``residual_scale`` multiplies
    attention and MLP outputs (``o_proj``'s and ``mlp_down``'s) before they join the residual.
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
    logit_scale: float = 1.0
    residual_scale: float = 1.0
    # Encoder-decoder models: the decoder's Architecture holds the encoder stack's; ``stack``
    # names which one this is ("" for decoder-only and encoder-only models).
    encoder: Architecture | None = None
    stack: str = ""
    unembed_scale: float = 1.0  # T5: d_model ** -0.5 before a tied unembedding

    @property
    def is_seq2seq(self) -> bool:
        """Whether this is a stack of an encoder-decoder model (either stack)."""
        return self.stack != ""

    @property
    def logits_bias(self) -> torch.Tensor | None:
        """``[vocab]`` added to the logits after the unembedding (BART's ``final_logits_bias``), or ``None``."""
        name = self.family.logits_bias
        bias = getattr(self.model, name, None) if name else None
        return None if bias is None else bias.reshape(-1)

    def cross_attn(self, layer: int) -> nn.Module:
        """The cross-attention module of decoder block ``layer``."""
        return self.blocks[layer].get_submodule(self._cross("cross_attn"))

    def cross_o_proj(self, layer: int) -> nn.Module:
        """Cross-attention's output projection (``W_O`` over all heads) in decoder block ``layer``."""
        return self.blocks[layer].get_submodule(self._cross("cross_o_proj"))

    def _cross(self, field: str) -> str:
        path = getattr(self.family, field)
        if path is None:
            raise LmscopeError(f"the {self.stack or self.family.name} stack has no cross-attention")
        return path

    def block_part(self, layer: int, path: str | None) -> nn.Module | None:
        """The module at ``path`` inside block ``layer`` (``None`` for ``None``)."""
        return None if path is None else _get(self.blocks[layer], path)

    def attn(self, layer: int) -> nn.Module:
        if self.family.attn is None:
            raise LmscopeError(f"{type(self.model).__name__} {NO_ATTENTION}")
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
        """A projection's weight as ``[out, in]``, whatever the family stores (read from accelerate's offload too)."""
        weight = tensor_of(module)
        return weight.T if self.family.conv1d else weight

    def o_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.o_proj)

    def mlp_down(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.mlp_down)

    def _layout(self, path: str) -> tuple[Fused, int, list[int]]:
        """The fused projection at ``path``, its group count and each part's size within a group."""
        fused = next((f for f in self.family.fused if f.path == path), None)
        if fused is None:
            raise LmscopeError(f"the {self.family.name!r} family has no fused projection {path!r}")
        size = {"q": self.n_heads * self.d_head, "k": self.n_kv_heads * self.d_head, "v": self.n_kv_heads * self.d_head}
        groups = int({"heads": self.n_heads, "kv_heads": self.n_kv_heads}.get(fused.groups, fused.groups))
        return fused, groups, [size.get(part, self.n_neurons) // groups for part in fused.parts]

    def split_output(self, path: str, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fused projection's ``output [..., out]`` cut into its parts (``q [..., head·d_head]`` …)."""
        fused, groups, sizes = self._layout(path)
        blocks = output.reshape(*output.shape[:-1], groups, sum(sizes))  # [..., group, part·size]
        pieces = blocks.split(sizes, dim=-1)
        return {part: piece.reshape(*output.shape[:-1], -1) for part, piece in zip(fused.parts, pieces, strict=True)}

    def split(self, layer: int, path: str) -> dict[str, torch.Tensor]:
        """The separate ``[out, in]`` weights (and ``<part>.bias``) of the fused projection at ``path``."""
        fused, groups, sizes = self._layout(path)
        module = self.blocks[layer].get_submodule(path)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in (("", self.linear_weight(module)), (".bias", getattr(module, "bias", None))):
            if tensor is None:
                continue
            blocks = tensor.reshape(groups, sum(sizes), *tensor.shape[1:])  # [group, part·size, ...]
            for part, piece in zip(fused.parts, blocks.split(sizes, dim=1), strict=True):
                out[part + name] = piece.reshape(-1, *tensor.shape[1:])
        return out

    @property
    def n_neurons(self) -> int:
        """MLP hidden units: the input width of the MLP's output projection (``mlp_act``'s last axis).

        For a mixture of experts ``mlp_act`` is the FFN's input, so this is ``d_model``.
        """
        if self.family.experts is not None:
            return self.d_model
        down = self.mlp_down(0)
        return int(getattr(down, "in_features", 0) or self.linear_weight(down).shape[-1])

    def experts(self, layer: int) -> nn.Module | None:
        """The routed experts of layer ``layer`` (fused 3-D weights), or ``None`` where its FFN is dense."""
        moe = self.family.experts
        return None if moe is None else _get(self.blocks[layer], moe.experts)

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0 for dense families)."""
        moe = self.family.experts
        return 0 if moe is None else int(getattr(self.model.config, moe.n_experts, 0) or 0)

    @property
    def top_k(self) -> int:
        """Experts each token is routed to (0 for dense families)."""
        moe = self.family.experts
        return 0 if moe is None else int(getattr(self.model.config, moe.top_k, 0) or 0)


def architecture_of(model: nn.Module) -> Architecture:
    """Bind the family of ``model`` to it, checking that every path in the table resolves."""
    config = model.config
    family = family_of(getattr(config, "model_type", "") or type(model).__name__)
    if family.encoder is not None:
        return _seq2seq(model, family)
    base = model.base_model
    blocks = _get(base, family.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise LmscopeError(
            f"{type(model).__name__}: could not find the Transformer blocks at {family.blocks!r} "
            f"(family {family.name!r})"
        )
    missing = [p for p in (family.embed, family.final_norm) if p and _get(base, p) is None]
    per_block = (family.attn, family.attn_out, family.o_proj, family.mlp_out, family.mlp_down)
    missing += [f"<block>.{p}" for p in per_block if p and _get(blocks[0], p) is None]
    if family.resid_mid and _get(blocks[0], family.resid_mid) is None:
        missing.append(f"<block>.{family.resid_mid}")
    if missing:
        raise LmscopeError(
            f"{type(model).__name__} does not match lmscope's {family.name!r} family: "
            f"could not find {', '.join(missing)}"
        )
    heads = [_get(model, p) for p in ((family.lm_head,) if isinstance(family.lm_head, str) else family.lm_head)]
    lm_head = None if None in heads else heads[0] if len(heads) == 1 else _Chain(*heads)

    n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    n_heads = 0 if family.attn is None else n_heads  # a state-space model: no heads
    n_kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
    if family.multi_query:  # Falcon's count is num_kv_heads; its new (40B) decoder architecture ignores multi_query
        n_kv_heads = int(getattr(config, "num_kv_heads", None) or n_kv_heads)
        if getattr(config, family.multi_query, False) and not getattr(config, "new_decoder_architecture", False):
            n_kv_heads = 1
    logit_scale = float(getattr(config, family.logit_scale, None) or 1.0) if family.logit_scale else 1.0
    if family.logit_divisor:
        logit_scale /= float(getattr(config, family.logit_divisor, None) or 1.0)
    d_model = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads) if n_heads else 0
    o_proj = _get(blocks[0], family.o_proj) if family.o_proj else None
    width = getattr(o_proj, "in_features", None)
    if family.experts is not None and width and width != n_heads * d_head and width % n_heads == 0:
        d_head = width // n_heads  # values narrower than queries and keys (DeepSeek's latent attention)
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
        logit_scale=logit_scale,
        residual_scale=float(getattr(config, family.residual_scale, None) or 1.0) if family.residual_scale else 1.0,
    )


def _stack(model: nn.Module, family: Family, stack: str, encoder: Architecture | None) -> Architecture:
    """One stack of an encoder-decoder model, every path checked."""
    config, base = model.config, model.base_model
    blocks = _get(base, family.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise LmscopeError(
            f"{type(model).__name__}: could not find the {stack}'s blocks at {family.blocks!r} (family {family.name!r})"
        )
    missing = [p for p in (family.embed, family.final_norm) if p and _get(base, p) is None]
    per_block = (family.attn, family.attn_out, family.o_proj, family.mlp_out, family.mlp_down, family.resid_mid,
                 family.cross_attn, family.cross_attn_out, family.cross_o_proj, family.resid_cross)  # fmt: skip
    missing += [f"<{stack} block>.{p}" for p in per_block if p and _get(blocks[0], p) is None]
    if missing:
        raise LmscopeError(
            f"{type(model).__name__} does not match lmscope's {family.name!r} family: "
            f"could not find {', '.join(missing)}"
        )
    d_model = int(config.d_model)
    n_heads = int(getattr(config, family.n_heads_attr or "num_attention_heads"))
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    rescale = bool(family.unembed_rescale and getattr(config, family.unembed_rescale, False))
    return Architecture(
        family=family,
        model=model,
        blocks=tuple(blocks),
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        parallel=False,
        lm_head=_get(model, family.lm_head) if encoder is not None else None,
        encoder=encoder,
        stack=stack,
        unembed_scale=d_model**-0.5 if rescale else 1.0,
    )


def _seq2seq(model: nn.Module, family: Family) -> Architecture:
    """The decoder stack's Architecture of an encoder-decoder model, holding the encoder stack's."""
    assert family.encoder is not None
    return _stack(model, family, "decoder", _stack(model, family.encoder, "encoder", None))
