"""Seeded random-weight models for every supported family (``tiny-<family>``).

Built with ``from_config`` from a fixed seed, so the same name always gives the same weights;
tests use them for breadth across architectures without downloading checkpoints. Causal families
share the embedded model's byte-level BPE tokenizer; BERT-style families share MiniLM's WordPiece.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    PreTrainedModel,
)

__all__ = ["TINY_FAMILIES", "TINY_SEQ2SEQ", "build_tiny"]

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "initializer_range": 0.1,
}

# model_type, masked LM?, config overrides
TINY_FAMILIES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "llama": ("llama", False, {"num_key_value_heads": 2}),
    "mistral": ("mistral", False, {"num_key_value_heads": 2, "sliding_window": 16}),
    "qwen2": ("qwen2", False, {"num_key_value_heads": 2}),
    "gemma": ("gemma", False, {"num_key_value_heads": 1, "head_dim": 16}),
    "gpt2": (
        "gpt2",
        False,
        {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_inner": 128, "n_positions": 1024},
    ),
    "gpt-neox": ("gpt_neox", False, {"use_parallel_residual": True, "rotary_pct": 0.5}),
    "opt": ("opt", False, {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "phi": ("phi", False, {"partial_rotary_factor": 0.5}),
    "bert": ("bert", True, {}),
    "roberta": ("roberta", True, {"max_position_embeddings": 1026}),
}

_GQA: dict[str, Any] = {"num_key_value_heads": 2, "head_dim": 16}
_GPTJ: dict[str, Any] = {"n_inner": 128, "rotary_dim": 8}

# Families added for breadth: each verified by tests/test_families.py.
TINY_FAMILIES.update(
    {
        "qwen3": ("qwen3", False, _GQA),
        "olmo": ("olmo", False, {}),
        "smollm3": ("smollm3", False, {**_GQA, "no_rope_layer_interval": 2}),
        "helium": ("helium", False, _GQA),
        "granite": (
            "granite",
            False,
            {
                **_GQA,
                "logits_scaling": 4.0,
                "residual_multiplier": 0.5,
                "embedding_multiplier": 2.0,
                "attention_multiplier": 0.2,
            },
        ),
        "seed_oss": ("seed_oss", False, _GQA),
        "ernie4_5": ("ernie4_5", False, _GQA),
        "arcee": ("arcee", False, _GQA),
        "ministral": ("ministral", False, {**_GQA, "sliding_window": 16}),
        "hunyuan_v1_dense": ("hunyuan_v1_dense", False, _GQA),
        "nemotron": ("nemotron", False, {**_GQA, "partial_rotary_factor": 0.5}),
        "vaultgemma": ("vaultgemma", False, {**_GQA, "final_logit_softcapping": 30.0}),
        "apertus": ("apertus", False, _GQA),
        "cwm": ("cwm", False, {**_GQA, "sliding_window": 16}),
        "jais2": ("jais2", False, _GQA),
        "ministral3": ("ministral3", False, {**_GQA, "sliding_window": 16}),
        "nanochat": ("nanochat", False, _GQA),
        "hyperclovax": ("hyperclovax", False, {**_GQA, "logits_scaling": 0.5, "residual_multiplier": 0.5}),
        "modernbert-decoder": ("modernbert-decoder", False, {"global_attn_every_n_layers": 2, "local_attention": 8}),
        "camembert": ("camembert", True, {"max_position_embeddings": 1026}),
        "data2vec-text": ("data2vec-text", True, {"max_position_embeddings": 1026}),
        "ernie": ("ernie", True, {}),
        "layoutlm": ("layoutlm", True, {}),
        "roc_bert": ("roc_bert", True, {}),
        "xlm-roberta-xl": ("xlm-roberta-xl", True, {"max_position_embeddings": 1026}),
        "esm": ("esm", True, {"max_position_embeddings": 1026}),
        "distilbert": ("distilbert", True, {"dim": 64, "n_layers": 3, "n_heads": 4, "hidden_dim": 128}),
        "eurobert": ("eurobert", True, _GQA),
        "nomic_bert": ("nomic_bert", True, {}),
        "gte": ("gte", True, {}),
        "stablelm": ("stablelm", False, {"num_key_value_heads": 2, "use_parallel_residual": True}),
        "starcoder2": ("starcoder2", False, {"num_key_value_heads": 2}),
        "phi3": ("phi3", False, {"num_key_value_heads": 2}),
        "glm": ("glm", False, _GQA),
        "cohere": ("cohere", False, {"num_key_value_heads": 2, "logit_scale": 0.5}),
        "cohere2": ("cohere2", False, {"num_key_value_heads": 2, "logit_scale": 0.5, "sliding_window": 16}),
        "persimmon": ("persimmon", False, {"partial_rotary_factor": 0.5}),
        "gemma2": ("gemma2", False, {**_GQA, "final_logit_softcapping": 30.0, "sliding_window": 16}),
        "gemma3": ("gemma3_text", False, {**_GQA, "sliding_window": 16, "final_logit_softcapping": 30.0}),
        "olmo2": ("olmo2", False, {"num_key_value_heads": 2}),
        "olmo3": ("olmo3", False, {"num_key_value_heads": 2, "sliding_window": 16}),
        "exaone4": ("exaone4", False, {**_GQA, "sliding_window": 16}),
        "glm4": ("glm4", False, _GQA),
        "gptj": ("gptj", False, _GPTJ),
        "codegen": ("codegen", False, _GPTJ),
        "gpt-bigcode": ("gpt_bigcode", False, {"n_inner": 128, "multi_query": True}),
        "gpt-neo": (
            "gpt_neo",
            False,
            {"num_layers": 3, "attention_types": [[["global", "local", "global"], 1]], "window_size": 8},
        ),
        "xglm": ("xglm", False, {"ffn_dim": 128}),
        "bloom": ("bloom", False, {"n_layer": 3, "n_head": 4}),
        # Falcon's layouts: multi-query with attention and MLP in parallel (7B), sequential multi-head with
        # biases, ALiBi instead of rotary embeddings, and the new decoder architecture (40B: grouped key-value heads)
        "falcon": ("falcon", False, {"ffn_hidden_size": 128}),
        "falcon-sequential": (
            "falcon",
            False,
            {"ffn_hidden_size": 128, "multi_query": False, "parallel_attn": False, "bias": True},
        ),
        "falcon-alibi": ("falcon", False, {"ffn_hidden_size": 128, "alibi": True, "parallel_attn": False}),
        "falcon-40b": (
            "falcon",
            False,
            {"ffn_hidden_size": 128, "new_decoder_architecture": True, "num_kv_heads": 2},
        ),
        "mpt": ("mpt", False, {"n_layers": 3, "n_heads": 4, "d_model": 64, "expansion_ratio": 2, "max_seq_len": 1024}),
        "biogpt": ("biogpt", False, {}),
        "xlm-roberta": ("xlm-roberta", True, {"max_position_embeddings": 1026}),
        "electra": ("electra", True, {"embedding_size": 64}),
        # DeBERTa-v3's settings: relative positions in 16 log buckets, c2p and p2c terms sharing the key projection
        "deberta-v2": (
            "deberta-v2",
            True,
            {
                "relative_attention": True,
                "pos_att_type": ["p2c", "c2p"],
                "position_buckets": 16,
                "max_relative_positions": 64,
                "share_att_key": True,
                "norm_rel_ebd": "layer_norm",
                "position_biased_input": False,
            },
        ),
        "roberta-prelayernorm": ("roberta-prelayernorm", True, {"max_position_embeddings": 1026}),
        "modernbert": ("modernbert", True, {"global_attn_every_n_layers": 2, "local_attention": 8}),
    }
)


# Mixtures of experts (tests/test_moe.py): 4 small routed experts, top-2; DeepSeek with a dense first layer,
# a shared expert and multi-head latent attention, V3 with group-limited sigmoid routing.
_MOE: dict[str, Any] = {"num_key_value_heads": 2, "num_experts_per_tok": 2}
_DEEPSEEK: dict[str, Any] = {
    "num_key_value_heads": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}
TINY_FAMILIES.update(
    {
        "mixtral": ("mixtral", False, {**_MOE, "num_local_experts": 4}),
        "phimoe": ("phimoe", False, {**_MOE, "num_local_experts": 4}),
        "qwen2_moe": (
            "qwen2_moe",
            False,
            {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
        ),
        "qwen3_moe": ("qwen3_moe", False, {**_MOE, **_GQA, "num_experts": 4, "moe_intermediate_size": 32}),
        "olmoe": ("olmoe", False, {**_MOE, "num_experts": 4}),
        "deepseek_v2": ("deepseek_v2", False, {**_DEEPSEEK, "n_routed_experts": 4, "q_lora_rank": None}),
        "deepseek_v3": (
            "deepseek_v3",
            False,
            {**_DEEPSEEK, "n_routed_experts": 8, "q_lora_rank": 24, "n_group": 2, "topk_group": 1},
        ),
        "glm4_moe": (
            "glm4_moe",
            False,
            {
                **_MOE,
                **_GQA,
                "n_routed_experts": 4,
                "moe_intermediate_size": 32,
                "n_shared_experts": 1,
                "first_k_dense_replace": 1,
                "n_group": 1,
                "topk_group": 1,
            },
        ),
        "ernie4_5_moe": (
            "ernie4_5_moe",
            False,
            {
                **_MOE,
                **_GQA,
                "moe_num_experts": 4,
                "moe_intermediate_size": 32,
                "moe_num_shared_experts": 1,
                "moe_layer_start_index": 1,
            },
        ),
        "exaone_moe": ("exaone_moe", False, {**_MOE, **_GQA, "num_experts": 4, "moe_intermediate_size": 32}),
        "hunyuan_v1_moe": ("hunyuan_v1_moe", False, {**_MOE, **_GQA, "num_experts": 4, "moe_intermediate_size": 32}),
        "granitemoe": (
            "granitemoe",
            False,
            {
                **_MOE,
                **_GQA,
                "num_local_experts": 4,
                "intermediate_size": 32,
                "logits_scaling": 4.0,
                "residual_multiplier": 0.5,
                "embedding_multiplier": 2.0,
                "attention_multiplier": 0.2,
            },
        ),
        # Llama 4 (text): layers 0 and 2 route (top-2 of 4, sigmoid, the weight scaling each expert's input) beside
        # a shared expert, layer 1 is dense; layer 1 has no rotary embedding (temperature-tuned queries, full
        # attention) and the others chunked attention over 8 tokens with QK norm
        "llama4": (
            "llama4_text",
            False,
            {
                **_MOE,
                **_GQA,
                "num_local_experts": 4,
                "intermediate_size": 32,
                "intermediate_size_mlp": 128,
                "moe_layers": [0, 2],
                "no_rope_layers": [1, 0, 1],
                "attention_chunk_size": 8,
            },
        ),
        # state-space models without attention (tests/test_mamba.py)
        "mamba": ("mamba", False, {"state_size": 8, "expand": 2}),
        "falcon_mamba": ("falcon_mamba", False, {"state_size": 8, "expand": 2}),
        "mamba2": ("mamba2", False, {"state_size": 8, "expand": 2, "num_heads": 8, "head_dim": 16, "chunk_size": 16}),
    }
)


# Encoder-decoder models (tests/test_seq2seq.py): 3 encoder and 2 decoder layers, so that code mixing up
# the stacks fails; the decoder starts from the tokenizer's BOS token.
TINY_SEQ2SEQ: dict[str, tuple[str, dict[str, Any]]] = {
    "t5": ("t5", {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4}),
    "bart": (
        "bart",
        {
            "d_model": 64,
            "encoder_layers": 3,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 96,
            "max_position_embeddings": 256,
        },
    ),
    "marian": (
        "marian",
        {
            "d_model": 64,
            "encoder_layers": 3,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "max_position_embeddings": 256,
            "scale_embedding": True,
        },
    ),
}


def build_seq2seq(
    model_type: str, vocab_size: int, special: dict[str, int | None], **overrides: Any
) -> PreTrainedModel:
    """A random encoder-decoder model of ``model_type`` with a fixed seed, in eval mode, float32."""
    settings: dict[str, Any] = {"vocab_size": vocab_size, "initializer_factor": 1.0, "init_std": 0.1, **overrides}
    settings.update({k: v for k, v in special.items() if v is not None})
    start = special.get("bos_token_id") if special.get("bos_token_id") is not None else special.get("pad_token_id")
    settings.setdefault("decoder_start_token_id", start)
    if model_type == "marian":
        settings["decoder_vocab_size"] = vocab_size
    config = AutoConfig.for_model(model_type, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config.decoder_start_token_id = settings["decoder_start_token_id"]
    return model.eval()


def build_tiny(family: str, vocab_size: int, special: dict[str, int | None]) -> PreTrainedModel:
    """A random model of ``family`` with a fixed seed, in eval mode, float32."""
    if family in TINY_SEQ2SEQ:
        model_type, overrides = TINY_SEQ2SEQ[family]
        return build_seq2seq(model_type, vocab_size, special, **overrides)
    model_type, masked, overrides = TINY_FAMILIES[family]
    settings = {**_COMMON, **overrides, "vocab_size": vocab_size}
    settings.update({k: v for k, v in special.items() if v is not None})
    if model_type == "gpt2":
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            settings.pop(key)
        settings.pop("max_position_embeddings")
    config = AutoConfig.for_model(model_type, **settings)
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config)
    return model.eval()
