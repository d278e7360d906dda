"""Falcon's attention, checked against its definition rather than transformers' eager path.

transformers' ``output_attentions=True`` path for Falcon is not the attention the model runs: it
adds the boolean SDPA mask to the scores (so queries see future keys), and with ALiBi adds the bias
a second time (once itself, once in the mask it is given); the model's logits change under it. So
lmscope's probabilities for Falcon are checked against ``softmax(q·kᵀ/√d + alibi/√d + causal mask)``
computed by hand from the model's fused projection (split by the model's own ``_split_heads``),
rotary embedding and ALiBi slopes (Penedo et al. 2023, "The RefinedWeb Dataset for Falcon LLM";
Press et al. 2022 for ALiBi), and against what the model computes: the attention update equals
``dense(probs · v)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb, build_alibi_tensor

import lmscope
from conftest import tiny
from lmscope.analysis.attention import neuron_scores_of
from lmscope.models._tiny import TINY_FAMILIES

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."
FALCONS = tuple(name for name, (model_type, _, _) in TINY_FAMILIES.items() if model_type == "falcon")
ATOL = 1e-5


def reference_probs(lm: lmscope.LM, ids: torch.Tensor) -> torch.Tensor:
    """Falcon's attention ``[layer, head, pos_q, pos_k]`` from its weights, by hand."""
    arch, config = lm.arch, lm.model.config
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        arch.attn(layer).query_key_value.register_forward_pre_hook(
            lambda module, args, layer=layer: inputs.setdefault(layer, args[0])
        )
        for layer in range(arch.n_layers)
    ]
    try:
        with torch.no_grad():
            lm.model(ids[None])
    finally:
        for handle in handles:
            handle.remove()
    n, d = ids.shape[0], arch.d_head
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    out = []
    with torch.no_grad():
        for layer in range(arch.n_layers):
            module, h = arch.attn(layer), inputs[layer]
            q, k, _ = module._split_heads(module.query_key_value(h))  # [batch, pos, head or kv_head, d_head]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if not config.alibi:
                cos, sin = lm.model.transformer.rotary_emb(h, position_ids=torch.arange(n)[None])
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [batch, head, pos_q, pos_k]
            if config.alibi:
                alibi = build_alibi_tensor(torch.ones(1, n), arch.n_heads, torch.float32)  # [head, 1, pos_k]
                scores = scores + alibi.view(1, arch.n_heads, 1, n) / math.sqrt(d)
            out.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("name", FALCONS)
def test_attention_probabilities_equal_the_definition_and_what_the_model_adds(name: str) -> None:
    lm = tiny(name)
    out = lm.trace(TEXT, sites=["attn_probs", "v", "attn_out"])
    probs = out.trace.get("attn_probs")  # [layer, head, pos_q, pos_k]
    torch.testing.assert_close(probs, reference_probs(lm, out.token_ids), atol=ATOL, rtol=0)
    arch = lm.arch
    v = out.trace.get("v")  # [layer, pos, kv_head, d_head]
    for layer in range(arch.n_layers):
        values = v[layer].repeat_interleave(arch.n_heads // arch.n_kv_heads, dim=1).transpose(0, 1)  # [head, pos, d]
        mixed = (probs[layer] @ values).transpose(0, 1).reshape(len(out.tokens), -1)  # [pos, head·d_head]
        with torch.no_grad():
            update = arch.o_proj(layer)(mixed)
        torch.testing.assert_close(update, out.trace.at("attn_out", layer), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ("falcon", "falcon-alibi"))
def test_neuron_view_reproduces_the_attention(name: str) -> None:
    """Rotary queries and keys (multi-query), or ALiBi's bias recorded as ``position_bias``."""
    lm = tiny(name)
    result = lm.trace(TEXT).attention(view="neuron")
    reference = reference_probs(lm, lm.trace(TEXT).token_ids).numpy()
    for layer in result.layers:
        for head in range(lm.arch.n_heads):
            for query in range(len(result.tokens)):
                scores = neuron_scores_of(result, layer, head, query)
                np.testing.assert_allclose(scores.probs, reference[layer, head, query], atol=2e-6, rtol=0)


def test_the_layouts_are_what_their_configs_say() -> None:
    shapes = {name: (tiny(name).arch.n_kv_heads, tiny(name).arch.parallel) for name in FALCONS}
    assert shapes == {
        "falcon": (1, True),
        "falcon-sequential": (4, False),
        "falcon-alibi": (1, False),
        "falcon-40b": (2, True),
    }
