"""State-space models (Mamba, Mamba-2, Falcon-Mamba): no attention, but the residual stream, gradients and
activations are there. lmscope offers the logit lens, rankings, saliency and block activations on them and
refuses the attention analyses in one line that says why (issue 18)."""

from __future__ import annotations

import functools

import pytest
import torch

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import lens_logits
from lmscope.models._support import model_support

TEXT = "The keys to the cabinet are on the table"
WHY = "is a state-space model without attention: the logit lens, rankings, saliency and activations apply"


@functools.cache
def traced(name: str) -> tuple[lmscope.Output, torch.Tensor]:
    lm = tiny(name)
    out = lm.trace(TEXT)
    with torch.no_grad():
        logits = lm.model(out.token_ids[None]).logits[0]
    return out, logits


@pytest.mark.parametrize("name", ("mamba", "mamba2", "falcon_mamba"))
def test_residual_stream_lens_and_activations_are_the_models(name: str) -> None:
    out, logits = traced(name)
    lm, trace = tiny(name), out.trace
    assert lm.arch.n_heads == 0 and set(trace.tensors) == {"resid_pre", "resid_post", "mlp_out", "mlp_act", "logits"}
    assert (out.logits - logits).abs().max() <= 1e-5
    pre, post, mixer = trace.get("resid_pre"), trace.get("resid_post"), trace.get("mlp_out")
    torch.testing.assert_close(pre[1:], post[:-1], atol=0, rtol=0)
    torch.testing.assert_close(post, pre + mixer, atol=1e-5, rtol=0)  # each block adds its mixer's update
    lens = torch.softmax(lens_logits(trace, lm.unembed)[-1], dim=-1)
    torch.testing.assert_close(lens, torch.softmax(logits, dim=-1), atol=1e-6, rtol=1e-4)
    # block activations: the mixer's output projection's input
    out_proj = lm.arch.mlp_down(0)
    torch.testing.assert_close(trace.at("mlp_act", 0) @ out_proj.weight.T, mixer[0], atol=1e-5, rtol=0)
    assert out.rankings().ranks.shape[0] == lm.arch.n_layers
    assert out.activations(layers=0).values.shape[1] == out_proj.in_features


def test_saliency_and_generation_work() -> None:
    lm = tiny("mamba")
    out = lm.generate("The keys to the", generate=2)
    ids = lm.encode("The keys to the")[None]
    with torch.no_grad():
        reference = lm.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)[0]
    assert out.token_ids.tolist() == reference.tolist()
    attributions = out.saliency().attributions
    assert len(attributions) == 2 and all(abs(float(a.sum()) - 1) < 1e-5 for a in attributions)


def test_attention_analyses_say_why_in_one_line() -> None:
    lm = tiny("mamba")
    out, _ = traced("mamba")
    for call in (out.attention, out.flow, lambda: lm.trace(TEXT, sites=["attn_probs"])):
        with pytest.raises(LmscopeError, match=WHY) as caught:
            call()
        assert "\n" not in str(caught.value)
    with pytest.raises(LmscopeError, match="has no attention"):
        out.trace.get("attn_probs")


def test_models_all_says_which_analyses_apply() -> None:
    rows = {row.model_type: row for row in model_support()}
    for model_type in ("mamba", "mamba2", "falcon_mamba"):
        assert rows[model_type].status == "table"
        assert "logit lens, rankings, saliency and activations apply" in rows[model_type].note
