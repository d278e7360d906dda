"""Seeded random-weight models for every supported family (``tiny-<family>``).

Built with ``from_config`` from a fixed seed, so the same name always gives the same weights;
tests use them for breadth across architectures without downloading checkpoints. Causal families
share the embedded model's byte-level BPE tokenizer; BERT-style families share MiniLM's WordPiece.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel

__all__ = ["TINY_FAMILIES", "build_tiny"]

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


def build_tiny(family: str, vocab_size: int, special: dict[str, int | None]) -> PreTrainedModel:
    """A random model of ``family`` with a fixed seed, in eval mode, float32."""
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
